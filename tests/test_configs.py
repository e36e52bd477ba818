"""Every shipped config composes, every `_target_` in it resolves, each stage composes only the
groups it uses, a misspelled choice fails at composition, and every experiment instantiates
under debug=tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_object
from omegaconf import OmegaConf

from cdm.jobs.config import config_dir, register_resolvers
from cdm.jobs.context import build_loggers, load_data, split_data

register_resolvers()
CONF = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STAGES = sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))
# The config (and overrides) in which each group is chosen: the groups only some stages use are
# pulled in by those stages (conf/stage/*.yaml), the sampling groups by conf/sample.yaml.
GROUP_CONTEXT = {
    "data": ("train", []),
    "sharding": ("train", []),
    "sharding/scorer": ("train", ["sharding=by_score"]),  # nested: by_score's score source
    "backbone": ("train", []),
    "stage": ("train", []),
    "trainer": ("train", []),
    "logger": ("train", []),
    "callbacks": ("train", []),
    "paths": ("train", []),
    "debug": ("train", []),
    "adapter": ("train", ["stage=shard"]),
    "router": ("train", ["stage=router"]),
    "knn": ("train", ["stage=knn"]),
    "feature_net": ("train", ["stage=feature_net"]),
    "composition": ("sample", []),
    "sampler": ("sample", []),
}
NOT_CHOSEN_ALONE = {
    "experiment",
    "hydra",
}  # deltas over other groups / Hydra's own (launchers below)
GROUP_OPTIONS = [
    (group, p.stem) for group in GROUP_CONTEXT for p in sorted((CONF / group).glob("*.yaml"))
]
# Options that need a user-given local path or size: composing must leave exactly these unset.
REQUIRED = {
    ("data", "cifar10"): {"data.root"},
    ("data", "cub200"): {"data.root"},
    ("data", "stanford_cars"): {"data.root"},
    ("data", "oxford_pets"): {"data.root"},
    ("data", "image_folder"): {"data.root", "data.num_classes"},
    ("data", "npz"): {"data.root", "data.num_classes"},
    ("data", "captioned_folder"): {"data.root"},
    ("sharding", "manifest"): {"sharding.manifest_path"},
    ("sharding/scorer", "file"): {"sharding.scorer.path"},
    ("backbone", "pretrained"): {"backbone.pretrained_path"},
    ("backbone", "sd_local"): {"backbone.pretrained_path"},
    ("knn", "clip"): {"knn.embedder.path"},
}
# The groups that only some stages use, and the stages that use each.
STAGE_GROUPS = {
    "adapter": {"shard", "paragon"},
    "router": {"router", "head"},
    "knn": {"knn"},
    "feature_net": {"feature_net"},
}


def compose_config(name: str, overrides: list[str], with_hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=with_hydra)


def compose_train(overrides: list[str], with_hydra: bool = False):
    return compose_config("train", overrides, with_hydra)


def missing_keys(cfg, prefix: str = "") -> set[str]:
    out = set()
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            out.add(path)
        elif OmegaConf.is_interpolation(cfg, key):  # ${backbone.pretrained_path}: counted there
            continue
        elif OmegaConf.is_dict(cfg[key]):
            out |= missing_keys(cfg[key], path + ".")
    return out


def targets(node, path: str = "") -> dict[str, str]:
    """Every ``_target_`` in a plain container: ``{path of its node: dotted target}``."""
    found = {}
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            found[path or "<root>"] = node["_target_"]
        for key, value in node.items():
            found |= targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            found |= targets(value, f"{path}[{k}]")
    return found


def resolved_or_raw(cfg, key: str):
    """``cfg[key]`` as a plain container: resolved, or as written when it points at a ``???``."""
    if not OmegaConf.is_config(cfg[key]):
        return cfg[key]
    try:
        return OmegaConf.to_container(cfg[key], resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation to a required (???) key
        return OmegaConf.to_container(cfg[key], resolve=False)


def assert_targets_resolve(cfg) -> dict[str, str]:
    """Each ``_target_`` names an importable object (nothing is built); a section is read resolved
    where it resolves (knn=default's keys come from a resolver), else as written."""
    found = targets({key: resolved_or_raw(cfg, key) for key in cfg})
    for path, target in found.items():
        try:
            get_object(target)
        except Exception as err:  # noqa: BLE001 - the message names the config path
            raise AssertionError(f"{path}._target_ = {target!r} does not resolve: {err}") from err
    return found


def test_there_are_configs_to_check():
    assert {f"digits_{n}split" for n in (1, 2, 4, 8)} <= set(EXPERIMENTS)
    assert {f"fashion_{n}split" for n in (1, 2, 4, 8)} <= set(EXPERIMENTS)
    assert set(STAGES) == {"backbone", "shard", "paragon", "router", "head", "knn", "feature_net"}
    assert len(GROUP_OPTIONS) >= 40


def test_every_group_is_checked():
    """A new config group must be added to GROUP_CONTEXT (or it is never composed here)."""
    groups = {
        str(p.parent.relative_to(CONF))
        for p in CONF.rglob("*.yaml")
        if p.parent != CONF
        and not str(p.parent.relative_to(CONF)).startswith(("debug/", "attribution", "hydra/"))
    }
    assert groups - NOT_CHOSEN_ALONE == set(GROUP_CONTEXT)


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS]
)
def test_every_group_option_composes_resolves_and_names_importable_targets(group, option):
    name, context = GROUP_CONTEXT[group]
    cfg = compose_config(name, [*context, f"{group}={option}"])
    required = REQUIRED.get((group, option), set())
    assert missing_keys(cfg) == required
    # everything else resolves (interpolations, resolvers)
    for key in cfg:
        if key not in {k.split(".")[0] for k in required} and OmegaConf.is_config(cfg[key]):
            OmegaConf.to_container(cfg[key], resolve=True)
    found = assert_targets_resolve(cfg)
    assert "job" in found  # every composed config names the job of its stage
    chosen = {"data": "data", "router": "router.model", "adapter": "adapter", "stage": "job",
              "knn": "knn.embedder", "composition": "composition", "sampler": "sampler"}  # fmt: skip
    if group in chosen:
        assert chosen[group] in found, f"{group}={option} chooses nothing by _target_"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("debug", [[], ["debug=tiny"]], ids=["full", "debug_tiny"])
def test_each_stage_composes_only_the_groups_it_uses(stage, debug):
    cfg = compose_train(["experiment=digits_4split", f"stage={stage}", *debug])
    assert cfg.stage == stage and get_object(cfg.job._target_)
    for group, users in STAGE_GROUPS.items():
        assert (group in cfg) == (stage in users), f"stage={stage} and group {group}"


def test_stage_groups_stay_overridable_from_the_command_line():
    cfg = compose_train(["stage=router", "router=backbone_head", "debug=tiny"])
    assert cfg.router.model._target_ == "cdm.models.router.BackboneHeadRouter"
    assert cfg.router.epochs == 2  # debug=tiny's router settings still apply
    cfg = compose_train(["stage=knn", "knn=feature_net"])
    assert cfg.knn.embedder._target_ == "cdm.models.knn_router.FeatureNetEmbedder"
    cfg = compose_train(["stage=shard", "shard.index=2", "adapter=full"])
    assert cfg.shard.index == 2 and cfg.adapter.kind == "full"
    assert cfg.job._target_ == "cdm.jobs.run.run_training_job"
    # debug=tiny shrinks a LoRA adapter and leaves a full one as it is
    assert compose_train(["stage=paragon", "debug=tiny"]).adapter.rank == 2
    full = compose_train(["stage=shard", "adapter=full", "debug=tiny"]).adapter
    assert set(full) == {"_target_", "kind"}


@pytest.mark.parametrize(
    ("overrides", "group", "choices"),
    [
        (["stage=rooter"], "stage", {"backbone", "shard", "paragon", "router", "knn"}),
        (["data=digitz"], "data", {"digits", "fashion_mnist", "npz", "image_folder"}),
        (["stage=router", "router=foo"], "router", {"small", "backbone_head"}),
        (["stage=knn", "knn=pixel"], "knn", {"pixels", "clip", "feature_net"}),
        (["stage=shard", "adapter=lorra"], "adapter", {"lora", "full"}),
        (["backbone=smal"], "backbone", {"small", "tiny", "base"}),
    ],
)
def test_a_misspelled_choice_fails_at_composition_listing_the_choices(overrides, group, choices):
    with pytest.raises(MissingConfigException) as err:
        compose_train(overrides)
    message = str(err.value)
    assert f"Available options in '{group}'" in message
    listed = {line.strip() for line in message.splitlines()}
    assert choices <= listed, message


def test_a_group_the_stage_does_not_use_cannot_be_chosen_silently():
    with pytest.raises(ConfigCompositionException, match="Could not override 'router'"):
        compose_train(["stage=shard", "router=backbone_head"])


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "slurm"])
def test_launchers_compose(launcher):
    cfg = compose_train([f"hydra/launcher={launcher}"], with_hydra=True)
    assert cfg.hydra.launcher._target_


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_under_every_stage_with_importable_targets(experiment):
    for stage in STAGES:
        cfg = compose_train([f"experiment={experiment}", f"stage={stage}"])
        assert cfg.experiment_name == experiment and missing_keys(cfg) == user_paths(cfg)
        assert_targets_resolve(cfg)


def user_paths(cfg) -> set[str]:
    """The keys an experiment leaves for the user to give: a local dataset's path (CIFAR-10)."""
    return REQUIRED.get(("data", str(cfg.data.name)), set())


def random_cifar10(root: Path, per_file: int = 40) -> Path:
    """Random images in CIFAR-10's binary layout (labels cycling through the 10 classes)."""
    base = root / "cifar-10-batches-bin"
    base.mkdir(parents=True)
    (base / "batches.meta.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n")
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(per_file, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(per_file) % 10
        (base / name).write_bytes(records.tobytes())
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates_under_debug_tiny(experiment, tmp_path):
    from hydra.utils import instantiate

    from cdm.data.loaders import FASHION_DEFAULT_ROOT
    from cdm.models.backbone import build_scheduler, build_unet
    from cdm.training.jobs import BackbonePretraining

    overrides = [f"experiment={experiment}", "debug=tiny", f"paths.artifacts={tmp_path}"]
    if experiment.startswith("fashion"):
        overrides.append("data.kwargs.limit_per_split=300")
    if experiment.startswith("cifar10"):  # a local copy is the user's: a random one in its format
        overrides.append(f"data.root={random_cifar10(tmp_path / 'cifar10')}")
    cfg = compose_train(overrides)
    needs_fashion = "load_fashion_mnist" in str(OmegaConf.to_container(cfg.data))
    if needs_fashion and not Path(FASHION_DEFAULT_ROOT).is_dir():
        pytest.skip("Fashion-MNIST is not installed: `make data-fashion`")
    assert cfg.experiment_name == experiment
    assert cfg.backbone.preset == "tiny"
    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    assert len(split.shards) == cfg.sharding.n_shards
    unet = build_unet(
        cfg.backbone.kind,
        OmegaConf.to_container(cfg.backbone.unet),
        sample_size=cfg.data.resolution,
        channels=cfg.data.channels,
        num_classes=cfg.data.num_classes,
    )
    module = BackbonePretraining(
        unet,
        build_scheduler(cfg.backbone.scheduler).alphas_cumprod,
        dataset_size=len(dataset),
        lr=cfg.pretrain.lr,
    )
    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in ("image", "label", "index")}
    loss = module.denoising_loss(batch, step=0)
    assert torch.isfinite(loss)
    trainer = instantiate(cfg.trainer, max_epochs=1, logger=build_loggers(cfg, tmp_path) or False)
    assert trainer.max_epochs == 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_sample_config_composes_for_every_experiment(experiment):
    cfg = compose_config("sample", [f"experiment={experiment}", "composition=average"])
    assert cfg.experiment_name == experiment and cfg.name == "average"
    assert missing_keys(cfg) == user_paths(cfg)
    assert_targets_resolve(cfg)


@pytest.mark.parametrize("config", ["eval", "table1", "fig2"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_eval_and_table1_configs_compose_for_every_experiment(config, experiment):
    cfg = compose_config(config, [f"experiment={experiment}"])
    assert missing_keys(cfg) == user_paths(cfg)
    assert set(cfg.evaluate.feature_spaces) <= {"domain", "inception", "pixels"}
    if config == "table1":
        assert cfg.table1.feature_space in cfg.evaluate.feature_spaces
        # null datasets: the config's own data; a cell without a shipped experiment config is
        # derived from the data with sharding.n_shards=n (tests/test_table1_user_data.py)
        datasets = cfg.table1.datasets or [cfg.data.name]
        assert all(isinstance(d, str) and d for d in datasets) and cfg.table1.splits
    if config == "fig2":
        assert cfg.fig2.feature_space in cfg.evaluate.feature_spaces
        # null: <data name>_<fig2.shards>split, a shipped experiment or one derived from the data
        assert cfg.fig2.experiment in [None, *EXPERIMENTS] and int(cfg.fig2.shards) >= 2


TOP_LEVEL = sorted(p.stem for p in CONF.glob("*.yaml"))
USER_GIVEN = {  # no sensible default
    "serve": ["serve.user=alice", "serve.policy=policy.yaml"],
    "verify": ["verify.certificate=certificate.json"],
}


@pytest.mark.parametrize("config", TOP_LEVEL)
def test_every_top_level_config_composes(config):
    """Each entry point's config (cdm-train, -sample, -eval, -table1, -forget, -add-source, ...)
    composes with every value set, on an experiment where it takes one, and its targets resolve."""
    assert {"train", "sample", "forget", "add_source", "serve"} <= set(TOP_LEVEL)
    extra = USER_GIVEN.get(config, [])
    try:
        cfg = compose_config(config, ["experiment=digits_4split", *extra])
        assert cfg.experiment_name == "digits_4split"
    except ConfigCompositionException as err:  # a store-wide tool (no experiment group)
        assert "No match in the defaults list" in str(err)
        cfg = compose_config(config, extra)
    assert missing_keys(cfg) == set()
    assert_targets_resolve(cfg)
