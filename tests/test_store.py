"""Artifact store: round trips, plain-peft loading, corruption/mismatch refusals, atomic writes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import cdm.store.artifact as artifact_module
import cdm.store.cards as cards_module
import cdm.store.io as io_module
from cdm.core.hashing import hash_state_dict, sha256_bytes
from cdm.core.names import ShardId
from cdm.store import (
    ArtifactStore,
    BackboneMismatchError,
    CorruptArtifactError,
    InvalidNameError,
    MissingArtifactError,
    StoreError,
    atomic_write_bytes,
    atomic_write_json,
    code_version,
    format_table,
    load_checkpoint,
    make_card,
    read_card,
    sha256_file,
)

if TYPE_CHECKING:
    from diffusers import UNet2DModel
    from peft import PeftModel

# diffusers and peft are imported inside the helpers, so the spawned writer processes, which
# import this module, start in seconds.

UNET_KWARGS: dict[str, Any] = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
)
EXP = "exp"


def tiny_unet(seed: int = 0) -> UNet2DModel:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNET_KWARGS)


def set_lora_weights(model: PeftModel, seed: int) -> None:
    """Random values in every LoRA tensor: peft zero-inits lora_B even with gaussian init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def add_lora(unet: UNet2DModel, seed: int = 1) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["conv1", "conv2"], init_lora_weights="gaussian"
    )
    model = get_peft_model(unet, config)
    set_lora_weights(model, seed)
    return model


def fixed_input() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([10, 500])


@torch.no_grad()
def outputs(model: Any) -> torch.Tensor:
    model.eval()
    x, t = fixed_input()
    return model(x, t).sample


def backbone_card() -> dict[str, Any]:
    return make_card(name="tiny", config=dict(UNET_KWARGS), metrics={"final_loss": 0.5})


def adapter_card(backbone_hash: str, **extra: Any) -> dict[str, Any]:
    return make_card(
        name="shard",
        manifest_hash="ab" * 32,
        backbone_hash=backbone_hash,
        parents=[{"kind": "backbone", "name": "tiny", "hash": backbone_hash}],
        metrics={"final_loss": 0.25, "steps": 10},
        wall_time_s=3.5,
        device="cpu",
        wandb_run_id=None,
        **extra,
    )


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def saved_backbone(store: ArtifactStore) -> dict[str, Any]:
    return store.save_backbone("tiny", tiny_unet(), backbone_card())


def hidden_entries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------


def test_names_are_validated(store: ArtifactStore) -> None:
    for bad in ["", "..", "a/b", "a\\b", "../x", ".hidden", "-x", "a..b", "x" * 200, "a b"]:
        with pytest.raises(InvalidNameError):
            store.backbone_dir(bad)
        with pytest.raises(InvalidNameError):
            store.adapter_dir(EXP, bad)
        with pytest.raises(InvalidNameError):
            store.manifest_path(bad, "safe")
    with pytest.raises(InvalidNameError):
        store.adapter_dir(EXP, "manifests")  # reserved
    with pytest.raises(ValueError, match="non-negative"):
        ShardId(-1)
    assert issubclass(InvalidNameError, ValueError)
    assert ShardId(3).name == "shard-03"
    root = store.root
    assert store.adapter_dir(EXP, "shard-03") == root / "experiments/exp/shards/shard-03"
    assert store.adapter_dir(EXP, "paragon") == root / "experiments/exp/paragon"
    assert store.manifest_path(EXP, "shard-00") == root / "experiments/exp/manifests/shard-00.json"
    assert store.backbone_dir("ddpm_tiny-8") == root / "backbones/ddpm_tiny-8"
    assert store.checkpoint_dir(EXP, "backbone") == root / "experiments/exp/checkpoints/backbone"
    assert store.slice_checkpoint_path(EXP, "shard-03", 2).name == "slice-02.ckpt"
    assert store.last_checkpoint_path(EXP, "paragon").name == "last.ckpt"
    assert store.log_dir(EXP) == root / "experiments/exp/logs"


def test_atomic_writes(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "x.json"
    digest = atomic_write_json(path, {"a": 1, "p": Path("/x"), "t": torch.tensor(2.0)})
    assert json.loads(path.read_text()) == {"a": 1, "p": "/x", "t": 2.0}
    assert digest == sha256_bytes(path.read_bytes()) == sha256_file(path)
    atomic_write_bytes(path, b"replaced")
    assert path.read_bytes() == b"replaced"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_manifest_round_trip(store: ArtifactStore) -> None:
    manifest = {"name": "safe", "manifest_hash": "cd" * 32, "ids": ["d/train/000001"]}
    path = store.save_manifest(EXP, manifest)
    assert path == store.manifest_path(EXP, "safe")
    assert store.load_manifest(EXP, "safe") == manifest
    assert store.list_manifests(EXP) == ["safe"]
    with pytest.raises(MissingArtifactError, match="cdm-train"):
        store.load_manifest(EXP, "private")


def test_backbone_round_trip(store: ArtifactStore, saved_backbone: dict[str, Any]) -> None:
    unet = tiny_unet()
    directory = store.backbone_dir("tiny")
    assert (directory / "config.json").is_file()
    weights = directory / "diffusion_pytorch_model.safetensors"
    card = read_card(directory)
    assert card == saved_backbone
    assert card["weights_sha256"] == sha256_bytes(weights.read_bytes())
    assert card["backbone_hash"] == hash_state_dict(unet.state_dict())
    assert card["kind"] == "backbone" and card["metrics"] == {"final_loss": 0.5}
    loaded, loaded_card = store.load_backbone("tiny", verify_state_hash=True)
    assert loaded_card == card
    torch.testing.assert_close(outputs(loaded), outputs(unet), rtol=0, atol=0)
    with pytest.raises(MissingArtifactError, match="cdm-train stage=backbone"):
        store.load_backbone("other")


def test_lora_adapter_round_trip(store: ArtifactStore, saved_backbone: dict[str, Any]) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    model = add_lora(store.load_backbone("tiny")[0])
    expected = outputs(model)
    assert not torch.allclose(expected, outputs(tiny_unet())), "LoRA must change the outputs"
    card = store.save_adapter(EXP, "shard-03", model, adapter_card(bb_hash, kind="shard", shard=3))
    directory = store.adapter_dir(EXP, "shard-03")
    assert (directory / "adapter_config.json").is_file()
    assert card["weights_sha256"] == sha256_file(directory / "adapter_model.safetensors")
    assert card["kind"] == "shard" and card["adapter_kind"] == "lora" and card["shard"] == 3
    assert card["job"] == "shard-03" and card["experiment"] == EXP
    assert read_card(directory) == card

    loaded, loaded_card = store.load_adapter(
        EXP, "shard-03", store.load_backbone("tiny")[0], backbone_hash=bb_hash
    )
    from peft import PeftModel

    assert isinstance(loaded, PeftModel)
    assert loaded_card == card
    torch.testing.assert_close(outputs(loaded), expected)


def test_adapter_loads_with_plain_peft(
    store: ArtifactStore, saved_backbone: dict[str, Any], tmp_path: Path
) -> None:
    from diffusers import UNet2DModel
    from peft import PeftModel

    model = add_lora(store.load_backbone("tiny")[0])
    expected = outputs(model)
    store.save_adapter(EXP, "shard-00", model, adapter_card(saved_backbone["backbone_hash"]))
    backbone_dir = store.backbone_dir("tiny")
    adapter_dir = store.adapter_dir(EXP, "shard-00")

    # In a fresh process that never imports cdm (started first: its imports take seconds).
    code = (
        "import json, sys, torch\n"
        "from diffusers import UNet2DModel\n"
        "from peft import PeftModel\n"
        "base = UNet2DModel.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "model = PeftModel.from_pretrained(base, sys.argv[2]).eval()\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([10, 500])\n"
        "with torch.no_grad():\n"
        "    out = model(x, t).sample\n"
        "print(json.dumps(out.flatten().tolist()))\n"
    )
    fresh_process = subprocess.Popen(
        [sys.executable, "-c", code, str(backbone_dir), str(adapter_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )

    # In this process, through diffusers/peft only.
    base = UNet2DModel.from_pretrained(backbone_dir, local_files_only=True)
    plain = PeftModel.from_pretrained(base, adapter_dir)
    torch.testing.assert_close(outputs(plain), expected)

    stdout, stderr = fresh_process.communicate(timeout=120)
    assert fresh_process.returncode == 0, stderr
    fresh = torch.tensor(json.loads(stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(fresh, expected.flatten(), rtol=1e-5, atol=1e-6)


def test_several_adapters_on_one_peft_model(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    expected = {}
    for k in range(2):
        model = add_lora(store.load_backbone("tiny")[0], seed=10 + k)
        expected[k] = outputs(model)
        store.save_adapter(EXP, ShardId(k).name, model, adapter_card(bb_hash))
    base = store.load_backbone("tiny")[0]
    model, _ = store.load_adapter(EXP, "shard-00", base, backbone_hash=bb_hash, adapter_name="s0")
    same, _ = store.load_adapter(EXP, "shard-01", model, backbone_hash=bb_hash)
    assert same is model and set(model.peft_config) == {"s0", "shard-01"}
    model.set_adapter("s0")
    torch.testing.assert_close(outputs(model), expected[0])
    model.set_adapter("shard-01")
    torch.testing.assert_close(outputs(model), expected[1])


def test_non_default_adapter_name_is_saved_at_top_level(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    unet = store.load_backbone("tiny")[0]
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["conv1", "conv2"])
    model = get_peft_model(unet, config, adapter_name="shard-02")
    set_lora_weights(model, 5)
    expected = outputs(model)
    store.save_adapter(EXP, "shard-02", model, adapter_card(saved_backbone["backbone_hash"]))
    directory = store.adapter_dir(EXP, "shard-02")
    assert (directory / "adapter_model.safetensors").is_file()
    assert not (directory / "shard-02").exists()
    plain = PeftModel.from_pretrained(store.load_backbone("tiny")[0], directory)
    torch.testing.assert_close(outputs(plain), expected)


def test_full_adapter_round_trip(store: ArtifactStore, saved_backbone: dict[str, Any]) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    finetuned = tiny_unet(seed=7)
    card = store.save_adapter(EXP, "paragon", finetuned, adapter_card(bb_hash), kind="full")
    assert card["kind"] == card["adapter_kind"] == "full"
    assert (store.adapter_dir(EXP, "paragon") / "diffusion_pytorch_model.safetensors").is_file()
    loaded, _ = store.load_adapter(EXP, "paragon", tiny_unet(), backbone_hash=bb_hash)
    torch.testing.assert_close(outputs(loaded), outputs(finetuned), rtol=0, atol=0)


def test_save_adapter_checks_its_inputs(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    with pytest.raises(StoreError, match="backbone_hash"):
        store.save_adapter(EXP, "shard-00", add_lora(tiny_unet()), {"name": "x"})
    with pytest.raises(StoreError, match="PeftModel"):
        store.save_adapter(EXP, "shard-00", tiny_unet(), adapter_card(bb_hash), kind="lora")
    with pytest.raises(StoreError, match="kind"):
        store.save_adapter(EXP, "shard-00", tiny_unet(), adapter_card(bb_hash), kind="dora")
    assert not store.has_adapter(EXP, "shard-00")


def test_missing_adapter_names_the_command(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    with pytest.raises(MissingArtifactError) as info:
        store.load_adapter(EXP, "shard-03", tiny_unet(), backbone_hash="x")
    assert "cdm-train stage=shard shard.index=3 experiment=exp" in str(info.value)
    assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_adapter_is_refused(
    store: ArtifactStore, saved_backbone: dict[str, Any], damage: str
) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    store.save_adapter(EXP, "shard-01", add_lora(tiny_unet()), adapter_card(bb_hash))
    weights = store.adapter_dir(EXP, "shard-01") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError) as info:
        store.load_adapter(EXP, "shard-01", tiny_unet(), backbone_hash=bb_hash)
    message = str(info.value)
    assert "corrupt" in message and str(weights) in message
    assert "cdm-train stage=shard shard.index=1 experiment=exp" in message


def test_unparseable_weights_are_refused(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    """Bytes that match the card but are not safetensors (e.g. a card rewritten by hand)."""
    bb_hash = saved_backbone["backbone_hash"]
    store.save_adapter(EXP, "shard-01", add_lora(tiny_unet()), adapter_card(bb_hash))
    directory = store.adapter_dir(EXP, "shard-01")
    weights = directory / "adapter_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    card = read_card(directory)
    card["weights_sha256"] = sha256_file(weights)
    atomic_write_json(directory / "card.json", card)
    with pytest.raises(CorruptArtifactError, match="safetensors cannot parse"):
        store.load_adapter(EXP, "shard-01", tiny_unet(), backbone_hash=bb_hash)


def test_corrupted_backbone_is_refused(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    weights = store.backbone_dir("tiny") / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError) as info:
        store.load_backbone("tiny")
    message = str(info.value)
    assert "corrupt" in message and str(weights) in message
    assert "cdm-train stage=backbone" in message


def test_backbone_mismatch_is_refused(store: ArtifactStore, saved_backbone: dict[str, Any]) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    store.save_adapter(EXP, "shard-00", add_lora(tiny_unet()), adapter_card(bb_hash))
    other = store.save_backbone("other", tiny_unet(seed=3), backbone_card())["backbone_hash"]
    assert other != bb_hash
    with pytest.raises(BackboneMismatchError) as info:
        store.load_adapter(EXP, "shard-00", tiny_unet(seed=3), backbone_hash=other)
    message = str(info.value)
    assert bb_hash in message and other in message and "another backbone" in message


def test_replace_keeps_no_leftovers(store: ArtifactStore, saved_backbone: dict[str, Any]) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    first = add_lora(tiny_unet(), seed=1)
    second = add_lora(tiny_unet(), seed=2)
    store.save_adapter(EXP, "shard-00", first, adapter_card(bb_hash, version=1))
    store.save_adapter(EXP, "shard-00", second, adapter_card(bb_hash, version=2))
    loaded, card = store.load_adapter(EXP, "shard-00", tiny_unet(), backbone_hash=bb_hash)
    assert card["version"] == 2
    torch.testing.assert_close(outputs(loaded), outputs(second))
    assert hidden_entries(store.root) == []


def test_replace_without_atomic_exchange(
    store: ArtifactStore, saved_backbone: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portable set-aside path, and recovery from a crash between its two renames."""
    monkeypatch.setattr(io_module, "_renameat2_exchange", lambda a, b: False)
    bb_hash = saved_backbone["backbone_hash"]
    store.save_adapter(EXP, "shard-00", add_lora(tiny_unet(), 1), adapter_card(bb_hash, version=1))
    store.save_adapter(EXP, "shard-00", add_lora(tiny_unet(), 2), adapter_card(bb_hash, version=2))
    assert store.read_adapter_card(EXP, "shard-00")["version"] == 2
    assert hidden_entries(store.root) == []

    # A writer (pid that cannot exist) died after setting the old version aside.
    final = store.adapter_dir(EXP, "shard-00")
    os.rename(final, final.with_name(".old-shard-00-999999999-deadbeef"))
    assert store.list_artifacts(EXP) == []
    _, card = store.load_adapter(EXP, "shard-00", tiny_unet(), backbone_hash=bb_hash)
    assert card["version"] == 2
    assert hidden_entries(store.root) == []


@pytest.mark.parametrize(
    ("module", "failing_step"), [(artifact_module, "write_card"), (io_module, "fsync_tree")]
)
def test_interrupted_write_keeps_previous_artifact(
    store: ArtifactStore,
    saved_backbone: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    failing_step: str,
) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    first = add_lora(tiny_unet(), seed=1)
    store.save_adapter(EXP, "shard-00", first, adapter_card(bb_hash, version=1))
    seen_tmp: list[Path] = []

    def crash(directory: Path, *args: Any) -> None:
        seen_tmp.append(directory)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(module, failing_step, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.save_adapter(EXP, "shard-00", add_lora(tiny_unet(), 2), adapter_card(bb_hash))
    monkeypatch.undo()

    assert seen_tmp and seen_tmp[0].name.startswith(".tmp-") and not seen_tmp[0].exists()
    loaded, card = store.load_adapter(EXP, "shard-00", tiny_unet(), backbone_hash=bb_hash)
    assert card["version"] == 1
    torch.testing.assert_close(outputs(loaded), outputs(first))
    assert hidden_entries(store.root) == []
    assert [e["job"] for e in store.list_artifacts(EXP)] == ["shard-00"]


def test_hard_crash_leftovers_are_invisible(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    """A writer killed before cleanup leaves a hidden temp dir: ignored, then cleaned."""
    bb_hash = saved_backbone["backbone_hash"]
    store.save_adapter(EXP, "shard-00", add_lora(tiny_unet()), adapter_card(bb_hash))
    final = store.adapter_dir(EXP, "shard-00")
    stale = final.with_name(".tmp-shard-01-12345-abc")
    stale.mkdir()
    (stale / "card.json").write_text("{")  # half-written
    stale_file = store.manifest_path(EXP, "safe").with_name(".tmp-safe.json-1-x")
    stale_file.parent.mkdir(parents=True)
    stale_file.write_text("{")
    entries = store.list_artifacts()
    assert [e["artifact"] for e in entries] == ["backbone", "adapter"]
    assert store.clean_temp(max_age_s=3600) == []
    assert sorted(store.clean_temp(max_age_s=0)) == sorted([stale, stale_file])
    assert hidden_entries(store.root) == []


class _StateDictModel:
    """Stands in for a diffusers model in the writer processes: a ``save_pretrained`` that writes
    the diffusers layout with safetensors alone, so the workers need not import diffusers."""

    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.config, self.state = config, state

    def save_pretrained(self, directory: str, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        save_file(self.state, os.path.join(directory, "diffusion_pytorch_model.safetensors"))
        Path(directory, "config.json").write_text(json.dumps(self.config))


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sorted(state.items())}


def _concurrent_writer(root: str, index: int, n_iter: int, barrier: Any) -> None:
    """Spawned worker: write shard ``index`` ``n_iter`` times, the weights changing each time."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    store = ArtifactStore(root)
    backbone_dir = store.backbone_dir("tiny")
    config = json.loads((backbone_dir / "config.json").read_text())
    state = load_file(backbone_dir / "diffusion_pytorch_model.safetensors")
    backbone_hash = read_card(backbone_dir)["backbone_hash"]
    barrier.wait(timeout=120)
    for i in range(n_iter):
        model = _StateDictModel(config, _perturbed(state, seed=1000 * index + i))
        card = adapter_card(backbone_hash, iteration=i, writer=index)
        store.save_adapter(EXP, ShardId(index).name, model, card, kind="full")
        store.save_manifest(EXP, {"name": ShardId(index).name, "iteration": i})


def test_concurrent_writers_of_different_shards(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    """Two spawned processes replace shard-00 and shard-01 of one experiment, many times at once."""
    n_iter, n_proc = 20, 2
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_proc)
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(store.root), k, n_iter, barrier))
        for k in range(n_proc)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
    assert [proc.exitcode for proc in procs] == [0] * n_proc

    bb_hash = saved_backbone["backbone_hash"]
    backbone_state = tiny_unet().state_dict()
    for k in range(n_proc):
        loaded, card = store.load_adapter(EXP, ShardId(k).name, tiny_unet(), backbone_hash=bb_hash)
        assert card["iteration"] == n_iter - 1 and card["writer"] == k
        assert card["adapter_kind"] == "full"
        reference = tiny_unet()
        reference.load_state_dict(_perturbed(backbone_state, seed=1000 * k + n_iter - 1))
        torch.testing.assert_close(outputs(loaded), outputs(reference), rtol=0, atol=0)
        assert store.load_manifest(EXP, ShardId(k).name)["iteration"] == n_iter - 1
    assert hidden_entries(store.root) == []
    jobs = [e.get("job") for e in store.list_artifacts(EXP) if e["artifact"] == "adapter"]
    assert jobs == ["shard-00", "shard-01"]


def test_list_artifacts_and_table(store: ArtifactStore, saved_backbone: dict[str, Any]) -> None:
    bb_hash = saved_backbone["backbone_hash"]
    store.save_manifest(EXP, {"name": "shard-00", "manifest_hash": "ab" * 32, "ids": ["a", "b"]})
    store.save_adapter(EXP, "paragon", add_lora(tiny_unet()), adapter_card(bb_hash, kind="paragon"))
    store.save_adapter(EXP, "shard-01", add_lora(tiny_unet()), adapter_card(bb_hash))
    store.save_adapter(EXP, "shard-00", add_lora(tiny_unet()), adapter_card(bb_hash))
    store.save_adapter("exp2", "shard-00", add_lora(tiny_unet()), adapter_card(bb_hash))
    store.log_dir(EXP).mkdir(parents=True)  # not an artifact
    entries = store.list_artifacts()
    described = [
        (e["artifact"], e.get("experiment"), e.get("job") or e.get("name")) for e in entries
    ]
    assert described == [
        ("backbone", None, "tiny"),
        ("manifest", EXP, "shard-00"),
        ("adapter", EXP, "paragon"),
        ("adapter", EXP, "shard-00"),
        ("adapter", EXP, "shard-01"),
        ("adapter", "exp2", "shard-00"),
    ]
    assert entries[1]["n_samples"] == 2 and entries[1]["manifest_hash"] == "ab" * 32
    assert all(Path(e["path"]).exists() for e in entries)
    assert len(store.list_artifacts("exp2")) == 1
    table = format_table(entries)
    lines = table.splitlines()
    assert len(lines) == 1 + len(entries)
    assert "exp/shard-01" in table and "final_loss=0.25" in table and "3.5s" in table
    assert "ababababab" in table and bb_hash[:10] in table and "paragon/lora" in table
    assert format_table([]) == "(no artifacts)"


def test_unreadable_card_is_listed_with_error(
    store: ArtifactStore, saved_backbone: dict[str, Any]
) -> None:
    (store.backbone_dir("tiny") / "card.json").write_text("{not json")
    (entry,) = store.list_artifacts()
    assert "corrupt" in entry["error"]
    assert "ERROR" in format_table([entry])
    with pytest.raises(CorruptArtifactError):
        store.load_backbone("tiny")


def test_make_card_and_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    card = make_card(kind="lora", name="shard-00", metrics={"loss": 1.0})
    for key in ("created", "code_version", "host", "torch"):
        assert card[key]
    assert card["created"].endswith("Z") and card["torch"] == torch.__version__
    assert make_card(code_version="abc")["code_version"] == "abc"
    assert isinstance(code_version(), str) and code_version()

    # Outside git (no git binary at all): falls back to the package version, never raises.
    monkeypatch.setenv("PATH", "")
    code_version.cache_clear()
    try:
        assert code_version() == cards_module._package_version()
    finally:
        code_version.cache_clear()


def test_load_checkpoint(store: ArtifactStore) -> None:
    path = store.slice_checkpoint_path(EXP, "shard-00", 1)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    torch.save({"state_dict": {}}, store.last_checkpoint_path(EXP, "shard-00"))
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    assert store.list_slice_checkpoints(EXP, "shard-00") == {1: path}
    assert store.clear_checkpoints(EXP, "shard-00") and not path.parent.exists()
    assert not store.clear_checkpoints(EXP, "shard-00")
    bad = path.with_name("slice-02.ckpt")
    bad.parent.mkdir(parents=True)
    torch.save({"obj": ArtifactStore("x")}, bad)  # arbitrary pickled object: refused
    with pytest.raises(StoreError, match="weights_only"):
        load_checkpoint(bad)
    with pytest.raises(MissingArtifactError):
        load_checkpoint(path.with_name("slice-09.ckpt"))
