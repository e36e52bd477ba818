"""Where the shipped Hydra configs live, and the resolvers they use (torch-free: the CLIs import it
before anything heavy; the pipeline calls `register_resolvers` itself)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.identity import job_identity
from cdm.core.names import job_name

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
# knn=default: the k-NN option each data.conditioning defaults to (any other: KNN_FALLBACK)
KNN_DEFAULTS = {"text": "feature_net"}  # captions: the domain embedder, offline (issue 14)
KNN_FALLBACK = "pixels"  # class-conditional and unconditional data (Table 1)


def register_resolvers() -> None:
    """``${job_name:stage,index}`` -> ``backbone`` | ``paragon`` | ``shard-03``;
    ``${identity:backbone}`` -> 8 hex of that job's identity (``identity_hash``);
    ``${slurm_gpus:accelerator,devices}`` -> GPUs per SLURM node (``slurm_gpus``);
    ``${knn_default:key}`` -> the data's default k-NN option's ``key`` (``knn_default``)."""
    if not OmegaConf.has_resolver("job_name"):
        OmegaConf.register_new_resolver("job_name", lambda stage, index: job_name(stage, index))
    if not OmegaConf.has_resolver("identity"):
        OmegaConf.register_new_resolver("identity", identity_hash)
    if not OmegaConf.has_resolver("slurm_gpus"):
        OmegaConf.register_new_resolver("slurm_gpus", slurm_gpus)
    if not OmegaConf.has_resolver("knn_default"):
        OmegaConf.register_new_resolver("knn_default", knn_default)


def knn_option(conditioning: str | None) -> str:
    """The ``knn`` option ``knn=default`` stands for on data with this ``data.conditioning``."""
    return KNN_DEFAULTS.get(str(conditioning), KNN_FALLBACK)


def knn_default(key: str, *, _root_: DictConfig) -> Any:
    """``${knn_default:key}``: ``key`` of the data's default k-NN option (``knn_option``), read
    from its file in ``conf/knn``, so ``knn=default`` composes exactly as that option does."""
    option = knn_option(OmegaConf.select(_root_, "data.conditioning"))
    return copy.deepcopy(knn_option_config(option)[key])  # the cached file stays as it was


@functools.cache
def knn_option_config(option: str) -> DictConfig:
    """``conf/knn/<option>.yaml`` (the config group, not the store's ``knn/``), read once: OmegaConf
    resolves ``${knn_default:...}`` on every access."""
    return OmegaConf.load(Path(config_dir(), "knn", f"{option}.yaml"))


def slurm_gpus(accelerator: str, devices: int | str) -> int:
    """GPUs a SLURM node must grant a trainer: ``devices`` for a GPU accelerator, else 0."""
    if str(accelerator) not in ("gpu", "cuda", "auto"):
        return 0
    if not str(devices).isdigit():
        raise ValueError(
            f"trainer.devices={devices!r} under SLURM: give a device count (e.g. trainer.devices=4)"
        )
    return int(devices)


def identity_hash(stage: str, *, _root_: DictConfig) -> str:
    """8 hex of the ``stage`` job's identity in the whole config, without its run settings
    (``JobIdentity.content_short``: a shard may run under another trainer than its backbone).

    ``backbone.id`` is left out (it is the backbone job's output name and carries this hash), so
    the config is copied without it before being resolved.
    """
    copy = OmegaConf.create(OmegaConf.to_container(_root_, resolve=False))
    if OmegaConf.select(copy, "backbone") is not None:
        copy.backbone.id = None
    return job_identity(OmegaConf.to_container(copy, resolve=True), str(stage)).content_short()


def config_dir() -> str:
    """Absolute path of the shipped configs, ``cdm/conf`` (package data: editable or not)."""
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise FileNotFoundError(
            f"cdm's configs are not at {CONFIG_DIR}: the installation is incomplete; reinstall "
            "cdm (`make install`, or `pip install .` from its checkout)"
        )
    return str(CONFIG_DIR)
