"""``adapter=full`` (a full fine-tuned copy of the backbone per shard) through every path a LoRA
shard takes: composed sampling (every composition), serving, forgetting samples (bit-exact) and a
whole source, adding a source, and Table 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.jobs.pipeline import CDMPipeline
from cdm.models.backbone import build_unet, predict_epsilon
from cdm.models.multi_adapter import MultiShardFull, merge_full, read_full_model
from cdm.store import ArtifactStore, CorruptArtifactError, StoreError, read_card, sha256_file
from cdm.store.records import add_forgotten_ids
from tests.conftest import TINY_ATTN_UNET, run_inprocess

EXP = "digits_2split"
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_slices=3"]
FULL = ["adapter=full"]  # only the stages that train an adapter (shard, paragon) have the group
SAMPLE = [*TINY, "num_samples=6", "batch_size=4", "steps=3", "progress=false"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits_2split whose shards and paragon are full copies; router and k-NN centroids."""
    root = tmp_path_factory.mktemp("full")
    run_inprocess(*TINY, "stage=backbone", artifacts=root)
    for k in (0, 1):
        run_inprocess(*TINY, *FULL, "stage=shard", f"shard.index={k}", artifacts=root)
    run_inprocess(*TINY, *FULL, "stage=paragon", artifacts=root)
    for stage in ("router", "knn"):
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    return root


@pytest.fixture
def root(trained, tmp_path) -> Path:
    """A private copy of the trained store (for tests that change it)."""
    return Path(shutil.copytree(trained, tmp_path / "artifacts"))


def weights_sha(root: Path, job: str) -> str:
    return sha256_file(ArtifactStore(root).adapter_dir(EXP, job) / WEIGHTS)


def tiny_unets(n: int) -> list[torch.nn.Module]:
    out = []
    for k in range(n):
        torch.manual_seed(k)
        out.append(
            build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10).eval()
        )
    return out


# ------------------------------------------------------------------------------ the model


def test_each_sample_runs_on_its_own_copy_and_no_other():
    models = tiny_unets(3)

    def refuse(*_):
        raise AssertionError("shard 2 has no sample in this batch: it must not run")

    models[2].register_forward_pre_hook(refuse)
    multi = MultiShardFull(models)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 500, 900, 3]), torch.tensor([1, 2, 3, 4])
    index = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        eps = multi(x, t, y, index)
        for b, k in enumerate(index.tolist()):
            alone = predict_epsilon(models[k], x[b : b + 1], t[b : b + 1], y[b : b + 1])
            torch.testing.assert_close(eps[b : b + 1], alone, rtol=1e-5, atol=1e-6)
        # a batch on one copy is exactly that model's forward
        one = multi(x, t, y, torch.ones(4, dtype=torch.long))
        assert torch.equal(one, predict_epsilon(models[1], x, t, y))
        dense = MultiShardFull(models[:2]).dense(x, t, y)
        assert dense.shape == (2, 4, 1, 8, 8) and torch.equal(dense[1], one)
    with pytest.raises(ValueError, match=r"shard_index must lie in \[0, 3\)"):
        multi(x, t, y, torch.tensor([0, 1, 3, 0]))


def test_weight_merge_of_full_copies_is_the_weighted_average_of_their_weights():
    a, b = tiny_unets(2)
    merged = merge_full([a, b], [0.25, 0.75])
    for name, p in merged.state_dict().items():
        expected = (
            0.25 * a.state_dict()[name].double() + 0.75 * b.state_dict()[name].double()
        ).float()
        assert torch.equal(p, expected), name
    only_a = merge_full([a, b], [1.0, 0.0])
    assert all(torch.equal(p, a.state_dict()[n]) for n, p in only_a.state_dict().items())


# ------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    "composition",
    ["classifier", "average", "random", "fixed", "topk", "weight_merge", "knn", "paragon"],
)
def test_every_composition_samples_full_shards(trained, composition):
    extra = ["fixed_weights=[0.3,0.7]"] if composition == "fixed" else []
    card = run_inprocess(
        *SAMPLE, f"composition={composition}", f"name=full-{composition}", *extra,
        artifacts=trained, config="sample",
    )  # fmt: skip
    trace = np.load(f"{read_card(card['path'])['path']}/trace.npz")["weights"]
    n = 1 if composition in ("weight_merge", "paragon") else 2
    assert trace.shape == (6, 3, n)
    np.testing.assert_allclose(trace.sum(-1), 1.0, rtol=1e-5)
    images = np.load(f"{card['path']}/samples.npz")["images"]
    assert images.shape == (6, 1, 8, 8) and images.std() > 0
    store = ArtifactStore(trained)
    jobs = ["paragon"] if composition == "paragon" else ["shard-00", "shard-01"]
    adapters = [p for p in card["parents"] if p["kind"] == "adapter"]
    assert [p["name"] for p in adapters] == jobs
    for p in adapters:  # the full copies' weights, as stored
        assert p["hash"] == store.read_adapter_card(EXP, p["name"])["weights_sha256"]
    if composition == "random":  # one shard per sample and step
        assert set(np.unique(trace)) <= {0.0, 1.0}


def pipeline(root: Path, composition: str) -> CDMPipeline:
    return CDMPipeline.from_store(
        root, EXP, composition=composition, overrides=["debug=tiny", "sharding.n_slices=3"]
    )


def test_composed_sampling_evaluates_only_the_copies_with_weight(trained):
    pipe = pipeline(trained, "random")
    assert isinstance(pipe.denoiser.model, MultiShardFull) and pipe.denoiser.model.n_shards == 2
    fed = []
    for copy_ in pipe.denoiser.model.shards:
        copy_.register_forward_pre_hook(lambda _, args: fed.append(args[0].shape[0]))
    out = pipe(batch_size=4, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.weights.shape == (4, 3, 2)
    assert pipe.denoiser.evaluated_pairs == 4 * 3 and sum(fed) == 4 * 3  # random: 1 copy/sample


def test_weight_merge_composes_the_lambda_average_of_the_stored_copies(trained):
    pipe = pipeline(trained, "weight_merge")
    (merged,) = pipe.denoiser.model.shards
    store = ArtifactStore(trained)
    a, b = (read_full_model(store.adapter_dir(EXP, f"shard-0{k}"), merged) for k in (0, 1))
    sizes = [len(store.load_manifest(EXP, f"shard-0{k}")["ids"]) for k in (0, 1)]
    w = [s / sum(sizes) for s in sizes]
    name, p = next(iter(merged.state_dict().items()))
    expected = w[0] * a.state_dict()[name].double() + w[1] * b.state_dict()[name].double()
    torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a.state_dict()[name], b.state_dict()[name])


def test_full_and_lora_shards_are_not_composed_together(trained, tmp_path):
    from omegaconf import OmegaConf

    from cdm.core.composition import Average
    from cdm.jobs.pipeline import StoredAdapter, mixture

    stored = [StoredAdapter(tmp_path / "a", "full"), StoredAdapter(tmp_path / "b", "lora")]
    manifests = {0: {"ids": ["x"]}, 1: {"ids": ["y"]}}
    with pytest.raises(StoreError, match=r"mix adapter kinds \['full', 'lora'\].*retrain"):
        mixture(OmegaConf.create({"prior": "sizes"}), Average(), [0, 1], manifests, None, stored)


# ------------------------------------------------------------------------------ serving


def test_serving_never_reads_a_disallowed_full_copy(root, tmp_path):
    import json

    from tests.test_serving import audit, request

    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"users": {"alice": ["shard-01"], "bob": ["*"]}}))
    path = ArtifactStore(root).adapter_dir(EXP, "shard-00") / WEIGHTS
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\x00" * 8)
    args = ("composition=average", "sharding.n_slices=3")
    card = request(root, policy, "alice", None, *args, "name=full-a")
    assert card["shards"] == [1]
    assert [p["name"] for p in card["parents"] if p["kind"] == "adapter"] == ["shard-01"]
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        request(root, policy, "bob", None, *args, "name=full-b")
    assert audit(root)[-1]["decision"] == "error"
    # cdm-sample too: a request for shard 1 alone is served from the store with shard 0 corrupt
    card = run_inprocess(*SAMPLE, "composition=classifier", "shards=[1]", "name=full-1", artifacts=root, config="sample")  # fmt: skip
    assert card["shards"] == [1]


# ------------------------------------------------------------------------------ forgetting


def forget(root: Path, *overrides: str) -> dict:
    from tests.test_forgetting import forget as run

    return run(root, "debug=tiny", "sharding.n_slices=3", *overrides)


def test_forgetting_samples_of_a_full_shard_equals_training_it_from_scratch(root, tmp_path):
    from cdm.data.manifest import Manifest

    store = ArtifactStore(root)
    old0 = Manifest.from_json(store.load_manifest(EXP, "shard-00"))
    ids = [*old0.slice_ids(1)[:2], old0.slice_ids(2)[0]]  # earliest affected slice: 1
    before0, before1 = weights_sha(root, "shard-00"), weights_sha(root, "shard-01")
    cert = forget(root, f"forget.ids=[{','.join(ids)}]", "forget.retrain_router=false")
    (retrained,) = cert["retrained"]
    assert retrained["restarted_from"]["kind"] == "slice_checkpoint"
    assert retrained["restarted_from"]["slice"] == 0
    # the same shard trained from scratch, in a fresh store whose split leaves the ids out
    fresh = tmp_path / "fresh"
    shutil.copytree(root / "backbones", fresh / "backbones")
    add_forgotten_ids(ArtifactStore(fresh), EXP, ids, "reference")
    run_inprocess(*TINY, *FULL, "stage=shard", artifacts=fresh)
    assert weights_sha(root, "shard-00") == weights_sha(fresh, "shard-00") != before0
    assert retrained["new_weights_sha256"] == read_card(store.adapter_dir(EXP, "shard-00"))["weights_sha256"]  # fmt: skip
    assert store.read_adapter_card(EXP, "shard-00")["adapter_kind"] == "full"
    assert weights_sha(root, "shard-01") == before1  # the other copy is untouched
    card = run_inprocess(*SAMPLE, "composition=average", "name=after-forget", artifacts=root, config="sample")  # fmt: skip
    assert card["shards"] == [0, 1]


def test_forgetting_a_whole_source_deletes_its_full_copy(root):
    cert = forget(root, "forget.source=1", "forget.retrain_router=false")
    store = ArtifactStore(root)
    assert not store.adapter_dir(EXP, "shard-01").exists()
    assert cert["request"]["shard"] == "shard-01"
    card = run_inprocess(*SAMPLE, "composition=average", "name=after-source", artifacts=root, config="sample")  # fmt: skip
    assert card["shards"] == [0]


# ------------------------------------------------------------------------------ adding a source


def test_an_added_source_is_trained_as_a_full_copy_like_its_siblings(root, tmp_path):
    from tests.test_sources import new_source

    before = {k: weights_sha(root, k) for k in ("shard-00", "shard-01")}
    src = new_source(tmp_path / "b.npz")
    every = [*TINY, "source.name=batch5", f"source.path={src}", "add.num_samples=6", "add.steps=2"]
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.lifecycle.add_source import run_add_source

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        # no adapter=full here: the new shard must still compose with the experiment's full copies
        cfg = compose("add_source", overrides=[*every, f"paths.artifacts={root}"])
        record = run_add_source(cfg, [*every, f"paths.artifacts={root}"])
    store = ArtifactStore(root)
    assert record["job"] == "shard-02"
    assert store.read_adapter_card(EXP, "shard-02")["adapter_kind"] == "full"
    assert {k: weights_sha(root, k) for k in before} == before
    assert record["samples"]["shards"] == [0, 1, 2]
    trace = np.load(Path(record["samples"]["path"]) / "trace.npz")["weights"]
    assert trace.shape[-1] == 3


# ------------------------------------------------------------------------------ Table 1


def test_table1_with_full_shards(tmp_path):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.paper.table1 import current_adapter, run_table1, stage_config

    register_resolvers()
    overrides = ["debug=tiny", "adapter=full", "num_samples=8", "batch_size=8", "steps=2",
                 f"paths.artifacts={tmp_path}"]  # fmt: skip
    table = ["table1.splits=[2]", "table1.compositions=[average]", "table1.n_jobs=1"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="table1", overrides=[*overrides, *table])
        card = run_table1(cfg, overrides)
        store = ArtifactStore(tmp_path)
        for job in ("shard-00", "shard-01", "paragon"):
            assert store.read_adapter_card("digits_2split", job)["adapter_kind"] == "full"
        assert {c["method"] for c in card["cells"]} == {"paragon", "average"}
        assert all(np.isfinite(c["value"]) for c in card["cells"])
        # a stored full shard is current for adapter=full, not for a LoRA table
        lora = [o for o in overrides if o != "adapter=full"]
        assert current_adapter(store, "digits_2split", 0, stage_config("digits_2split", overrides, "shard", 0))  # fmt: skip
        assert not current_adapter(store, "digits_2split", 0, stage_config("digits_2split", lora, "shard", 0))  # fmt: skip
