"""The DiT backbone and deep prompts (VPT-deep): isolation, batched == loop, zero effect,
store round trip, and the shard job / composed sampling through the CLI entry points."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdm.models.backbone import (
    UNET_CLASSES,
    build_scheduler,
    build_unet,
    load_pretrained_unet,
    null_label,
    predict_epsilon,
)
from cdm.models.prompts import (
    PROMPTS_FILE,
    MultiShardPrompt,
    PromptedDiT,
    deep_prompt_adapter,
    merge_prompts,
    read_prompts,
)
from cdm.store import ArtifactStore, read_card
from cdm.store.io import sha256_file
from tests.conftest import TINY_ATTN_UNET, run_inprocess

TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": 2}
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
DIT = ["experiment=digits_4split", "debug=tiny", "backbone=dit_tiny"]
PROMPT = [*DIT, "adapter=deep_prompt", "stage=shard"]


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet("dit", TINY_DIT, sample_size=8, channels=1, num_classes=10).eval()


def inputs(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 11, (batch,), generator=g)  # 10 = the null label
    return x, t, y


def prompted(dit: torch.nn.Module, seed: int, **kwargs) -> PromptedDiT:
    torch.manual_seed(seed)
    return deep_prompt_adapter(copy.deepcopy(dit), init_std=0.5, **kwargs).eval()


# ---- the DiT backbone ---------------------------------------------------------------------


def test_dit_backbone_is_class_conditional_epsilon_only_and_loads_back(tmp_path):
    dit = tiny_dit()
    assert dit.config.num_embeds_ada_norm == 11 and null_label(dit) == 10  # 10 classes + null
    assert dit.config.out_channels == 1 and dit.config.sample_size == 8
    x, t, y = inputs()
    eps = predict_epsilon(dit, x, t, y)
    assert eps.shape == x.shape
    dit.save_pretrained(tmp_path, safe_serialization=True)
    for loaded in (
        UNET_CLASSES["dit"].from_pretrained(tmp_path, local_files_only=True),
        load_pretrained_unet(tmp_path, "dit"),
    ):
        assert torch.equal(predict_epsilon(loaded.eval(), x, t, y), eps)


def test_dit_has_no_global_rng_label_dropout_in_training_mode():
    """diffusers' DiT drops 10% of labels with the global RNG in train mode; cdm's does not."""
    dit = tiny_dit()
    x, t, _ = inputs(batch=128)
    y = torch.arange(128) % 10
    eval_eps = predict_epsilon(dit, x, t, y)
    dit.train()
    torch.manual_seed(123)
    assert torch.equal(predict_epsilon(dit, x, t, y), eval_eps)


def test_unconditional_dit_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="data.conditional=true"):
        build_unet("dit", TINY_DIT, sample_size=8, channels=1, num_classes=None)


@pytest.mark.parametrize(("preset", "millions"), [("dit_small", 0.59), ("dit_base", 35.24)])
def test_dit_presets_build_with_their_documented_size_and_shapes(preset, millions):
    """The shipped presets as the backbone job builds them (dit_base: DiT-B/2's depth, heads of
    64 and 2x2 patches at width 384, the UNet base's size; docs/architecture.md). The size counts
    at any resolution (fixed sin-cos positions); dit_base runs on 8x8x3 to stay fast."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"backbone={preset}", "stage=backbone"])
    assert cfg.backbone.kind == "dit" and cfg.backbone.preset == preset
    size, channels = (8, 1) if preset == "dit_small" else (8, 3)
    torch.manual_seed(0)
    dit = build_unet(cfg.backbone.kind, OmegaConf.to_container(cfg.backbone.unet),
                     sample_size=size, channels=channels, num_classes=10).eval()  # fmt: skip
    assert sum(p.numel() for p in dit.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=g)
    with torch.no_grad():
        eps = predict_epsilon(dit, x, torch.tensor([10, 900]), torch.tensor([3, 10]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()


# ---- deep prompts -------------------------------------------------------------------------


def test_prompts_have_the_vpt_deep_shape_and_are_the_only_trainable_parameters():
    dit = tiny_dit()
    model = deep_prompt_adapter(copy.deepcopy(dit), prompt_length=8)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompts"]
    assert model.prompts.shape == (2, 8, 32)  # [n_blocks, L, dim]
    per_class = deep_prompt_adapter(copy.deepcopy(dit), prompt_length=8, per_class=True)
    assert per_class.prompts.shape == (11, 2, 8, 32)  # [num_classes + 1, n_blocks, L, dim]


def test_a_unet_is_refused_by_deep_prompts():
    unet = build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10)
    with pytest.raises(ValueError, match="backbone=dit_tiny"):
        deep_prompt_adapter(unet)


def test_zero_length_or_absent_prompts_leave_the_backbone_exact():
    dit = tiny_dit()
    x, t, y = inputs()
    bare = predict_epsilon(dit, x, t, y)
    assert torch.equal(predict_epsilon(prompted(dit, 0, prompt_length=0), x, t, y), bare)
    model = prompted(dit, 0, prompt_length=4)
    with_prompts = predict_epsilon(model, x, t, y)
    assert with_prompts.shape == bare.shape  # the tokens are dropped at every block's output
    assert not torch.allclose(with_prompts, bare, atol=1e-4)  # ...after they acted
    assert torch.equal(predict_epsilon(model.dit, x, t, y), bare)  # hooks idle outside a call


def test_a_training_step_changes_only_the_shards_prompts():
    from cdm.training.jobs import ShardTraining

    dit = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    adapter = {"_target_": "cdm.models.prompts.deep_prompt_adapter", "kind": "deep_prompt",
               "prompt_length": 4, "per_class": True, "init_std": 0.02}  # fmt: skip
    module = ShardTraining(
        dit, build_scheduler(SCHEDULE).alphas_cumprod, adapter, dataset_size=16, lr=0.1,
        cond_drop_prob=0.5,
    )  # fmt: skip
    prompts_before = module.model.prompts.detach().clone()
    optimizer = module.configure_optimizers()
    x, _, y = inputs(batch=16)
    module.denoising_loss({"image": x, "label": y % 10}, step=0).backward()
    optimizer.step()
    after = module.model.dit.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # backbone bit-identical
    assert not torch.equal(module.model.prompts.detach(), prompts_before)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(module.model.prompts)
    }


@pytest.mark.parametrize("per_class", [False, True], ids=["shared", "per_class"])
def test_multi_shard_prompt_batched_equals_a_loop_over_shards(per_class):
    dit = tiny_dit()
    shards = [prompted(dit, seed, prompt_length=3, per_class=per_class) for seed in (1, 2, 3)]
    x, t, y = inputs(batch=7)
    index = torch.tensor([2, 0, 1, 1, 2, 0, 2])
    multi = MultiShardPrompt(copy.deepcopy(dit), [s.prompts.detach() for s in shards])
    with torch.no_grad():
        batched = multi(x, t, y, index)
        loop = torch.empty_like(batched)
        for k, shard in enumerate(shards):
            rows = index == k
            loop[rows] = predict_epsilon(shard, x[rows], t[rows], y[rows])
        dense = multi.dense(x, t, y)
        each = torch.stack([predict_epsilon(s, x, t, y) for s in shards])
    torch.testing.assert_close(batched, loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(dense, each, atol=1e-6, rtol=0)
    assert not torch.allclose(each[0], each[1], atol=1e-4)  # the shards differ


def test_merged_prompts_are_the_weighted_sum_and_shapes_must_agree():
    a, b = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(merge_prompts([a, b], [0.25, 0.75]), 0.25 * a + 0.75 * b)
    with pytest.raises(ValueError, match="different shapes"):
        MultiShardPrompt(tiny_dit(), [a, torch.randn(2, 4, 32)])
    with pytest.raises(ValueError, match="wrong backbone"):
        MultiShardPrompt(tiny_dit(), [torch.randn(3, 3, 32)])


def test_store_round_trip_is_bit_identical_with_a_card(tmp_path):
    dit = tiny_dit()
    model = prompted(dit, 5, prompt_length=4, per_class=True)
    store = ArtifactStore(tmp_path)
    card = store.save_adapter(
        "exp", "shard-00", model, {"kind": "shard", "backbone_hash": "b" * 64}, kind="deep_prompt"
    )
    directory, checked = store.checked_adapter("exp", "shard-00", backbone_hash="b" * 64)
    assert card["adapter_kind"] == checked["adapter_kind"] == "deep_prompt"
    assert card["weights_file"] == PROMPTS_FILE
    assert card["weights_sha256"] == sha256_file(directory / PROMPTS_FILE)
    assert sorted(p.name for p in directory.iterdir()) == ["card.json", PROMPTS_FILE]
    loaded = read_prompts(directory)
    assert torch.equal(loaded, model.prompts.detach())
    x, t, y = inputs()
    again = PromptedDiT(copy.deepcopy(dit), loaded).eval()
    assert torch.equal(predict_epsilon(again, x, t, y), predict_epsilon(model, x, t, y))


# ---- through the entry points -------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_store(tmp_path_factory) -> Path:
    """A store with a tiny DiT backbone and deep prompts for shards 0 and 1 (in process)."""
    root = tmp_path_factory.mktemp("dit-artifacts")
    run_inprocess(*DIT, "stage=backbone", artifacts=root)
    for k in (0, 1):
        run_inprocess(*PROMPT, f"shard.index={k}", artifacts=root)
    return root


def test_shard_job_writes_prompts_with_a_card_and_composed_sampling_uses_them(dit_store):
    from cdm.jobs.pipeline import CDMPipeline

    store = ArtifactStore(dit_store)
    card = read_card(store.adapter_dir("digits_4split", "shard-00"))
    assert card["adapter_kind"] == "deep_prompt" and card["weights_file"] == PROMPTS_FILE
    assert card["config"]["adapter"]["prompt_length"] == 8
    ckpts = sorted(p.name for p in store.checkpoint_dir("digits_4split", "shard-00").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "slice-00.ckpt", "slice-01.ckpt"]  # SISA slices
    (bdir,) = (dit_store / "backbones").iterdir()
    backbone, bcard = store.load_backbone(bdir.name, UNET_CLASSES["dit"])
    assert card["backbone_hash"] == bcard["backbone_hash"]
    pipe = CDMPipeline.from_store(
        dit_store, "digits_4split", composition="average", shards=[0, 1],
        overrides=["debug=tiny", "backbone=dit_tiny", "adapter=deep_prompt"],
    )  # fmt: skip
    assert isinstance(pipe.model, MultiShardPrompt) and pipe.model.n_shards == 2
    out = pipe(batch_size=4, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="pt")  # fmt: skip
    assert out.images.shape == (4, 1, 8, 8) and torch.isfinite(out.images).all()
    # the pipeline's shard k is the stored prompts on the backbone
    x, t, y = inputs(batch=4)
    index = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        eps = pipe.model(x, t, y, index)
        for k in (0, 1):
            prompts = read_prompts(store.adapter_dir("digits_4split", f"shard-0{k}"))
            alone = PromptedDiT(copy.deepcopy(backbone), prompts).eval()
            rows = index == k
            torch.testing.assert_close(eps[rows], predict_epsilon(alone, x[rows], t[rows], y[rows]),
                                       atol=1e-6, rtol=0)  # fmt: skip


def test_killed_and_resumed_deep_prompt_shard_ends_bit_identical(dit_store, cli):
    args = (*PROMPT, "shard.index=2", "optim.epochs_per_slice=2")
    run_inprocess(*args, "experiment_name=prompt-ref", artifacts=dit_store)
    killed = cli(*args, "experiment_name=prompt-res", "kill_at_step=5", artifacts=dit_store,
                 check=False)  # fmt: skip
    assert killed.returncode == 17, killed.stderr[-2000:]
    store = ArtifactStore(dit_store)
    assert not (store.adapter_dir("prompt-res", "shard-02") / "card.json").exists()
    resumed = cli(*args, "experiment_name=prompt-res", artifacts=dit_store)
    assert "resuming shard-02" in resumed.stdout
    ref = load_file(store.adapter_dir("prompt-ref", "shard-02") / PROMPTS_FILE)
    res = load_file(store.adapter_dir("prompt-res", "shard-02") / PROMPTS_FILE)
    assert ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)


def test_forgetting_ids_of_a_deep_prompt_shard_equals_training_from_scratch(tmp_path):
    """cdm-forget on prompts: SISA restart from the last clean slice, bit-identical to a fresh
    store's shard trained from scratch without the ids (the same machinery as LoRA's)."""
    import shutil

    from cdm.data.manifest import Manifest
    from cdm.store.records import add_forgotten_ids

    base = ["experiment=digits_2split", "debug=tiny", "backbone=dit_tiny", "sharding.n_slices=3"]
    exp = [*base, "adapter=deep_prompt", "stage=shard"]
    root, fresh = tmp_path / "store", tmp_path / "fresh"
    run_inprocess(*base, "stage=backbone", artifacts=root)
    run_inprocess(*exp, artifacts=root)
    store = ArtifactStore(root)
    shard = Manifest.from_json(store.load_manifest("digits_2split", "shard-00"))
    ids = [*shard.slice_ids(1)[:2], shard.slice_ids(2)[0]]
    cert = run_inprocess(
        "experiment=digits_2split", f"forget.ids=[{','.join(ids)}]", artifacts=root,
        config="forget",
    )  # fmt: skip
    assert cert["retrained"][0]["restarted_from"]["slice"] == 0
    shutil.copytree(root / "backbones", fresh / "backbones")
    add_forgotten_ids(ArtifactStore(fresh), "digits_2split", ids, "reference")
    run_inprocess(*exp, artifacts=fresh)
    forgotten, scratch = (
        sha256_file(ArtifactStore(r).adapter_dir("digits_2split", "shard-00") / PROMPTS_FILE)
        for r in (root, fresh)
    )
    assert forgotten == scratch
