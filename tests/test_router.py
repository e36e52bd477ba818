"""Routers f(x_t, t) -> P(shard | x_t) (paper Sec. 3.4, Prop. 3.1): networks, store, the job."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cdm.models.router import (
    BackboneHeadRouter,
    SmallRouter,
    build_router,
    router_from_artifact,
    unet_mid_features,
)
from cdm.store import (
    ArtifactStore,
    BackboneMismatchError,
    CorruptArtifactError,
    InvalidNameError,
    MissingArtifactError,
    StoreError,
    read_card,
)
from cdm.training.router import (
    RouterTraining,
    ShardSampler,
    band_name,
    fixed_validation_noise,
    timestep_bands,
    train_log_prior,
)

CONF = Path(__file__).resolve().parents[1] / "cdm" / "conf"
TINY = ["experiment=digits_4split", "debug=tiny"]
# a router small enough to train in seconds, still clearly learning at low noise
FAST_ROUTER = {
    "epochs": 8,
    "val_draws": 1,
    "model": {"widths": [16, 32, 32], "time_embed_dim": 32, "norm_groups": 8},
}


def tiny_unet(kind: str = "unet2d", num_classes: int | None = 10, seed: int = 0):
    from cdm.models.backbone import build_unet

    torch.manual_seed(seed)
    kwargs = dict(
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    if kind == "unet2d":
        kwargs.update(
            down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        )
    else:
        kwargs.update(
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=8,
        )
    return build_unet(kind, kwargs, sample_size=8, channels=1, num_classes=num_classes)


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g)


# ---------------------------------------------------------------------------------- networks


def test_small_router_gives_logits_per_shard_and_trains():
    router = SmallRouter(4, 1, 8, widths=(8, 16, 16), time_embed_dim=16, norm_groups=4)
    x, t = batch()
    logits = router(x, t)
    assert logits.shape == (6, 4) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(6) % 4).backward()
    assert all(p.grad is not None for p in router.parameters())
    # the time embedding matters: same image, other t, other logits
    assert not torch.allclose(router(x[:1], t[:1]), router(x[:1], t[:1] + 500))


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_mid_features_are_the_unets_own_mid_block_output(kind):
    from cdm.models.backbone import null_label, predict_epsilon

    unet = tiny_unet(kind).eval()
    x, t = batch()
    captured = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: captured.update(out=o))
    labels = torch.full((6,), null_label(unet))
    with torch.no_grad():
        predict_epsilon(unet, x, t, labels)
        ours = unet_mid_features(unet, x, t)  # null label by default
    assert ours.shape == captured["out"].shape == (6, 16, 4, 4)
    assert torch.equal(ours, captured["out"])  # bit for bit


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_mid_features_stop_the_forward_after_the_mid_block(kind):
    unet = tiny_unet(kind).eval()
    ran = []
    for block in unet.up_blocks:
        block.register_forward_hook(lambda m, i, o: ran.append(type(m).__name__))
    hooks_before = len(unet.mid_block._forward_hooks)
    x, t = batch()
    with torch.no_grad():
        feats = unet_mid_features(unet, x, t)
        again = unet_mid_features(unet, x, t, class_labels=torch.arange(6))
    assert ran == []  # the up path never ran
    assert len(unet.mid_block._forward_hooks) == hooks_before  # the hook is removed again
    assert not torch.equal(feats, again)  # explicit class labels reach the mid block


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_backbone_head_router_never_touches_the_backbone(kind):
    unet = tiny_unet(kind)
    unet.requires_grad_(True).train()  # the router must freeze it itself
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    router = build_router(
        {
            "model": {
                "_target_": "cdm.models.router.BackboneHeadRouter",
                "dim": 16,
                "heads": 2,
                "time_embed_dim": 16,
            }
        },
        n_shards=3,
        channels=1,
        resolution=8,
        backbone=unet,
    )
    router.train()
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert not any(k.startswith("backbone") for k in router.state_dict())
    assert {id(p) for p in router.parameters()}.isdisjoint(id(p) for p in unet.parameters())
    x, t = batch()
    optim = torch.optim.AdamW(router.parameters(), lr=1e-2)
    for _ in range(2):
        logits = router(x, t)
        assert logits.shape == (6, 3)
        optim.zero_grad()
        torch.nn.functional.cross_entropy(logits, torch.arange(6) % 3).backward()
        optim.step()
    assert all(p.grad is None for p in unet.parameters())
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    # the head trained; the unregistered backbone follows dtype casts
    router.double()
    assert next(unet.parameters()).dtype == torch.float64
    assert router(x.double(), t).dtype == torch.float64


def test_build_router_errors_are_clear():
    with pytest.raises(ValueError, match="router.model has no `_target_`"):
        build_router({"arch": "small"}, n_shards=2, channels=1, resolution=8)
    with pytest.raises(ImportError, match="KNNRouterNet"):
        build_router(
            {"model": {"_target_": "cdm.models.router.KNNRouterNet"}},
            n_shards=2, channels=1, resolution=8,
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs the backbone"):
        build_router(
            {"model": {"_target_": "cdm.models.router.BackboneHeadRouter"}},
            n_shards=2, channels=1, resolution=8,
        )  # fmt: skip


@pytest.mark.parametrize("option", ["small", "backbone_head"])
def test_shipped_router_configs_build(option):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "router" / f"{option}.yaml"))
    assert {"name", "model", "epochs", "batch_size", "lr", "sampling", "bands"} <= set(cfg)
    assert cfg["model"]["_target_"].startswith("cdm.models.router.")
    router = build_router(cfg, n_shards=4, channels=1, resolution=8, backbone=tiny_unet())
    assert router(*batch()).shape == (6, 4)


# ----------------------------------------------------------------------- sampling and bands


def test_balanced_sampler_draws_every_shard_equally_and_every_sample():
    groups = [list(range(0, 10)), list(range(10, 13)), list(range(13, 19))]
    s = ShardSampler(groups, sampling="balanced", seed=1, epoch=0)
    drawn = list(s)
    assert len(drawn) == 30
    per_shard = [sum(1 for i in drawn if i in g) for g in groups]
    assert per_shard == [10, 10, 10]
    assert set(drawn) == set(range(19))
    assert list(ShardSampler(groups, sampling="balanced", seed=1, epoch=0)) == drawn
    assert list(ShardSampler(groups, sampling="balanced", seed=1, epoch=1)) != drawn
    prior = list(ShardSampler(groups, sampling="by_prior", seed=1, epoch=0))
    assert sorted(prior) == list(range(19))
    ranks = [list(ShardSampler(groups, sampling="by_prior", seed=1, epoch=0, rank=r, world_size=2)) for r in (0, 1)]  # fmt: skip
    assert len(ranks[0]) == len(ranks[1]) == 10 and set(ranks[0] + ranks[1]) == set(range(19))


def test_bands_priors_and_fixed_validation_noise():
    assert timestep_bands(1000, 5)[0] == (0, 200) and timestep_bands(1000, 5)[-1] == (800, 1000)
    assert [band_name(lo, hi, 1000) for lo, hi in timestep_bands(1000, 2)] == ["t000-499", "t500-999"]  # fmt: skip
    assert train_log_prior([5, 15], "balanced") == pytest.approx([-0.6931472] * 2)
    assert train_log_prior([5, 15], "by_prior") == pytest.approx([-1.3862944, -0.2876821])
    a = fixed_validation_noise(torch.tensor([3, 7]), (1, 8, 8), (200, 400), 0, seed=0)
    b = fixed_validation_noise(torch.tensor([7]), (1, 8, 8), (200, 400), 0, seed=0)
    assert torch.equal(a[0][1], b[0][0]) and int(a[1][1]) == int(
        b[1][0]
    )  # per sample, not per batch
    assert ((a[1] >= 200) & (a[1] < 400)).all()


def test_router_module_loss_is_deterministic_per_step():
    router = SmallRouter(2, 1, 8, widths=(8,), time_embed_dim=8, norm_groups=4)
    from cdm.models.backbone import build_scheduler

    alphas = build_scheduler({"num_train_timesteps": 100}).alphas_cumprod
    module = RouterTraining(router, alphas, dataset_size=10, lr=1e-3, bands=4)
    b = {"image": torch.randn(4, 1, 8, 8), "label": torch.tensor([0, 1, 0, 1])}
    assert torch.equal(module.router_loss(b, 3), module.router_loss(b, 3))
    assert not torch.equal(module.router_loss(b, 3), module.router_loss(b, 4))
    assert module.band_names == ["t000-024", "t025-049", "t050-074", "t075-099"]


# ---------------------------------------------------------------------------------- store


def saved_router(tmp_path: Path, backbone_hash: str = "b" * 64):
    store = ArtifactStore(tmp_path)
    router = SmallRouter(3, 1, 8, widths=(8, 16), time_embed_dim=8, norm_groups=4)
    model = {"_target_": "cdm.models.router.SmallRouter", "widths": [8, 16], "time_embed_dim": 8,
             "norm_groups": 4}  # fmt: skip
    config = {"model": model, "n_shards": 3, "channels": 1, "resolution": 8}
    card = {"name": "router", "backbone_hash": backbone_hash, "metrics": {"acc": 0.5}}
    written = store.save_router("exp", router.state_dict(), config, card)
    return store, router, config, written


def test_a_stored_router_target_outside_cdm_is_refused(tmp_path):
    store, router, config, _ = saved_router(tmp_path)
    state = router.state_dict()
    for target in ("os.system", "collections.OrderedDict", None):
        bad = {**config, "model": {**config["model"], "_target_": target}}
        with pytest.raises(ValueError, match="not a cdm class: only cdm.* targets are rebuilt"):
            router_from_artifact(state, bad)


def test_store_round_trip_of_a_router(tmp_path):
    store, router, config, written = saved_router(tmp_path)
    directory = store.router_dir("exp")
    assert directory == tmp_path.absolute() / "experiments" / "exp" / "router"
    assert sorted(p.name for p in directory.iterdir()) == [
        "card.json",
        "router.safetensors",
        "router_config.json",
    ]
    assert written["kind"] == "router" and written["weights_file"] == "router.safetensors"
    assert written == read_card(directory) and store.has_router("exp")
    state, config_back, card = store.load_router("exp", backbone_hash="b" * 64)
    assert config_back == config and card["metrics"] == {"acc": 0.5}
    assert state.keys() == router.state_dict().keys()
    rebuilt = router_from_artifact(state, config_back)
    x, t = batch()
    torch.testing.assert_close(rebuilt(x, t), router.eval()(x, t))
    # no temp dirs left behind
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_store_refuses_corrupt_or_mismatched_routers(tmp_path):
    store, *_ = saved_router(tmp_path)
    with pytest.raises(BackboneMismatchError, match="another backbone"):
        store.load_router("exp", backbone_hash="c" * 64)
    config_path = store.router_dir("exp") / "router_config.json"
    original = config_path.read_bytes()
    config_path.write_text(json.dumps({"arch": "small", "n_shards": 30}))
    with pytest.raises(CorruptArtifactError, match="router config"):
        store.load_router("exp")
    config_path.write_bytes(original)
    weights = store.router_dir("exp") / "router.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        store.load_router("exp")
    with pytest.raises(MissingArtifactError, match="stage=router"):
        store.load_router("exp", "router-other")
    for bad in ("shard-01", "checkpoints", "../x", "paragon"):
        with pytest.raises(InvalidNameError):
            store.router_dir("exp", bad)
    with pytest.raises(StoreError, match="backbone_hash"):
        store.save_router("exp", {"w": torch.zeros(1)}, {}, {"name": "router"})


# ------------------------------------------------------------------------------ the job


def compose_router_cfg(artifacts: Path, router: str = "small", *overrides: str, **router_updates):
    """conf/train.yaml with stage=router router=<router> (conf/stage/router.yaml pulls the group)."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*TINY, "stage=router", f"router={router}", *overrides,
                       f"paths.artifacts={artifacts}"],
        )  # fmt: skip
    for key, value in router_updates.items():  # a dict (model) keeps the option's _target_
        OmegaConf.update(cfg, f"router.{key}", value, merge=isinstance(value, dict))
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny safe backbone for digits_4split and a small router trained on its 4 shards."""
    from cdm.jobs.router import run_router_job
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("router-artifacts")
    run_inprocess(*TINY, "stage=backbone", artifacts=root)
    cfg = compose_router_cfg(root, "small", **FAST_ROUTER)
    return root, cfg, run_router_job(cfg)


def test_router_card_lists_every_shard_manifest_and_the_backbone(trained):
    root, cfg, card = trained
    store = ArtifactStore(root)
    assert card["kind"] == "router" and card["arch"] == "cdm.models.router.SmallRouter"
    listed = {m["name"]: m["hash"] for m in card["shard_manifests"]}
    assert listed == {
        f"shard-{k:02d}": store.load_manifest("digits_4split", f"shard-{k:02d}")["hash"]
        for k in range(4)
    }
    backbone = read_card(store.backbone_dir(cfg.backbone.id))
    assert card["backbone_hash"] == backbone["backbone_hash"]
    assert card["parents"] == [
        {"kind": "backbone", "name": cfg.backbone.id, "hash": backbone["backbone_hash"]}
    ]
    assert card["train_log_prior"] == pytest.approx([-1.3862944] * 4)  # balanced: uniform
    assert card["validation"]["kind"] == "test_split_by_class"
    assert card["n_samples_fed"] == sum(m["n_train"] for m in card["shard_manifests"])
    assert (
        card["code_version"]
        and card["wall_time_s"] > 0
        and card["config"]["router"]["model"]["_target_"]
    )
    bands = ["t000-199", "t200-399", "t400-599", "t600-799", "t800-999"]
    assert card["bands"] == bands and list(card["metrics"]["band_accuracy"]) == bands
    assert all(f"router/acc_{b}" in card["metrics"] for b in bands)
    # only the router's weights are stored; they load back into the same network
    from cdm.jobs.router import load_router_model

    weights = load_file(store.router_dir("digits_4split") / "router.safetensors")
    assert not any("down_blocks" in k or "backbone" in k for k in weights)
    router, _ = load_router_model(store, "digits_4split")
    assert router(*batch()).shape == (6, 4)


def test_router_learns_the_shard_at_low_noise_only(trained):
    _, _, card = trained
    acc = card["metrics"]["band_accuracy"]
    print("router band accuracy:", acc)
    low, high = acc["t000-199"], acc["t800-999"]
    assert low > 0.6, acc  # chance is 0.25 (4 shards, balanced training)
    assert low > high + 0.3, acc
    assert high < 0.45, acc  # nearly pure noise: close to chance


def test_trained_router_is_kept_unless_retrain(trained, caplog):
    from cdm.jobs.router import run_router_job

    root, cfg, card = trained
    caplog.set_level(logging.INFO, logger="cdm")
    again = run_router_job(cfg)
    assert again == card and "already trained" in caplog.text


def test_backbone_head_router_job_saves_only_the_head(trained):
    from cdm.jobs.router import load_router_model, run_router_job
    from cdm.models.backbone import UNET_CLASSES

    root, _, _ = trained
    cfg = compose_router_cfg(root, "backbone_head", epochs=1, name="router-head", val_draws=1)
    head = {"_target_": "cdm.models.router.BackboneHeadRouter", "dim": 16, "heads": 2,
            "time_embed_dim": 16}  # fmt: skip
    OmegaConf.update(cfg, "router.model", head, merge=False)
    card = run_router_job(cfg)
    assert card["arch"] == "cdm.models.router.BackboneHeadRouter" and card["name"] == "router-head"
    store = ArtifactStore(root)
    unet, bcard = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
    weights = load_file(store.router_dir("digits_4split", "router-head") / "router.safetensors")
    n_backbone = sum(p.numel() for p in unet.parameters())
    assert sum(v.numel() for v in weights.values()) < n_backbone
    assert not set(weights) & set(unet.state_dict())
    router, _ = load_router_model(store, "digits_4split", "router-head", backbone=unet)
    assert isinstance(router, BackboneHeadRouter) and router(*batch()).shape == (6, 4)
    with pytest.raises(BackboneMismatchError):
        load_router_model(store, "digits_4split", "router-head", backbone=tiny_unet(), expected_backbone_hash="0" * 64)  # fmt: skip


def test_card_accuracies_are_those_of_the_saved_router(trained):
    """Recompute the per-band validation accuracy from the stored router, outside Lightning."""
    from cdm.core.diffusion import q_sample
    from cdm.jobs.context import load_data, split_data
    from cdm.jobs.router import backbone_alphas_cumprod, load_router_model, router_data

    root, cfg, card = trained
    store = ArtifactStore(root)
    dataset = load_data(cfg)
    data = router_data(dataset, split_data(cfg, dataset), seed=int(cfg.seed))
    assert data.validation == card["validation"]
    router, _ = load_router_model(store, "digits_4split")
    alphas = backbone_alphas_cumprod(cfg, read_card(store.backbone_dir(cfg.backbone.id)))
    idx = torch.tensor([i for i, _ in data.val_items])
    labels = torch.tensor([k for _, k in data.val_items])
    x0 = torch.stack([dataset[i]["image"] for i in idx.tolist()])
    for (lo, hi), name in zip(timestep_bands(1000, 5), card["bands"], strict=True):
        noise, t = fixed_validation_noise(idx, x0.shape[1:], (lo, hi), 0, int(cfg.seed))
        with torch.no_grad():
            pred = router(q_sample(x0, noise, t, alphas), t).argmax(dim=1)
        acc = (pred == labels).float().mean().item()
        assert acc == pytest.approx(card["metrics"]["band_accuracy"][name], abs=1e-6)


def run_router_main(root: str, *overrides: str) -> None:
    """Entry point for the subprocess of the resume test (the kill is an ``os._exit``)."""
    from cdm.jobs.router import run_router_job

    run_router_job(
        compose_router_cfg(Path(root), "small", *overrides, **{**FAST_ROUTER, "epochs": 3})
    )


@pytest.mark.slow
def test_killed_router_job_resumes_bit_identical(trained):
    import subprocess
    import sys

    root, _, _ = trained
    repo = Path(__file__).resolve().parents[1]

    def run(*overrides: str) -> int:
        code = "import sys; from tests.test_router import run_router_main; run_router_main(*sys.argv[1:])"  # fmt: skip
        cmd = [
            sys.executable,
            "-c",
            code,
            str(root),
            "trainer.enable_progress_bar=false",
            *overrides,
        ]
        return subprocess.run(cmd, cwd=repo, capture_output=True, timeout=300).returncode

    assert run("experiment_name=resume", "kill_at_step=15") == 17
    store = ArtifactStore(root)
    assert store.last_checkpoint_path("resume", "router").is_file()
    assert not store.has_router("resume")
    assert run("experiment_name=resume") == 0
    assert run("experiment_name=straight") == 0
    a = load_file(store.router_dir("resume") / "router.safetensors")
    b = load_file(store.router_dir("straight") / "router.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card_a, card_b = read_card(store.router_dir("resume")), read_card(store.router_dir("straight"))
    assert card_a["metrics"]["band_accuracy"] == card_b["metrics"]["band_accuracy"]
