"""Every choice a user types, checked after composition and before anything heavy is loaded.

Config groups (``composition=``, ``sampler=``, ``stage=``, ...) are checked by Hydra itself; this
module checks the free-form values (``prior=``, ``device=``, ``shards=``, ``labels=``,
``evaluate.*``, ``table1.*``, ``fig2.*``, ``table2.*``). Torch-free: a typo is reported in well under a second.
Values that only the store knows (which shards exist) are checked by ``check_store``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cdm.core.names import ShardId

PRIORS = ("sizes", "uniform")
DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
FEATURE_SPACES = ("domain", "inception", "pixels")
CUDA_GRAPH = (False, True, "compiled")  # cdm.jobs.pipeline.CUDA_GRAPH
REFERENCES = ("private", "train", "test")
METRICS = ("FD", "KID")
EXACT_DIM = 4096  # cdm.attribution.divergence.MAX_EXACT_DIM (this module stays torch-free)


class ChoiceError(ValueError):
    """A value the user chose that does not exist; the message names the key and the choices."""


def check_choices(cfg: DictConfig) -> None:
    """Raise ``ChoiceError`` for the first free-form value of ``cfg`` that is not a valid choice
    (each command composes only the keys it uses; each check looks for its key)."""
    check_one_of(cfg, "prior", PRIORS)
    device = OmegaConf.select(cfg, "device")
    if device is not None and not DEVICE.match(str(device)):
        raise ChoiceError(f"device={device} is not a device: use device=cpu, cuda or cuda:K")
    graph = OmegaConf.select(cfg, "cuda_graph")
    if graph is not None and graph not in CUDA_GRAPH:
        raise ChoiceError(f"cuda_graph={graph}: use true, false or compiled")
    check_indices(cfg, "shards", upper=None)
    if OmegaConf.select(cfg, "labels") is not None:
        if not OmegaConf.select(cfg, "data.conditional", default=True):
            raise ChoiceError(
                "labels=... on an unconditional model (data.conditional=false): drop labels="
            )
        check_indices(cfg, "labels", upper=OmegaConf.select(cfg, "data.num_classes"))
    index = OmegaConf.select(cfg, "shard.index")
    if index is not None and not (isinstance(index, int) and index >= 0):
        raise ChoiceError(f"shard.index={index} is not a shard index: use shard.index=0, 1, ...")
    for key in ("evaluate.feature_spaces", "table1.feature_space", "fig2.feature_space",
                "table2.feature_space"):  # fmt: skip
        check_one_of(cfg, key, FEATURE_SPACES)
    check_one_of(cfg, "evaluate.memorization_space", FEATURE_SPACES)
    reference = OmegaConf.select(cfg, "evaluate.reference")
    if (
        reference is not None
        and str(reference) not in REFERENCES
        and not ShardId.is_shard(str(reference))
    ):
        raise ChoiceError(
            f"evaluate.reference={reference} does not exist: choose one of {', '.join(REFERENCES)} "
            "or a shard's own data (e.g. shard-01)"
        )
    for key in ("table1.metric", "fig2.metric"):
        check_one_of(cfg, key, METRICS)
    check_attribution(cfg)


def check_attribution(cfg: DictConfig) -> None:
    """``cdm-attribute``'s free-form values: the property's feature space, sizes, and a DDIM
    sampler wherever eq. 6 credit is computed (its path is the probability-flow ODE)."""
    if OmegaConf.select(cfg, "attribution") is None:
        return
    check_one_of(cfg, "attribution.property.space", FEATURE_SPACES)
    if OmegaConf.select(cfg, "composition.name") in ("paragon", "weight_merge"):
        raise ChoiceError(
            f"composition={cfg.composition.name} is one model, not shards composed by weights: "
            "attribute a composition of separate shards (e.g. composition=classifier)"
        )
    for key in ("attribution.credit_samples", "attribution.method.max_exact_shards",
                "attribution.method.n_permutations", "attribution.method.msr_samples",
                "attribution.divergence.n_probes", "num_samples", "batch_size", "steps"):  # fmt: skip
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ChoiceError(f"{key}={value} must be a positive integer")
    credit = OmegaConf.select(cfg, "attribution.method.credit", default=True)
    if credit and OmegaConf.select(cfg, "sampler.name") != "ddim":
        raise ChoiceError(
            f"sampler={OmegaConf.select(cfg, 'sampler.name')}: eq. 6 credit follows the "
            "probability-flow ODE, whose discretisation is DDIM (eta = 0): use sampler=ddim"
        )
    dim = int(cfg.data.channels) * int(cfg.data.resolution) ** 2
    if OmegaConf.select(cfg, "attribution.divergence.name") == "exact" and dim > EXACT_DIM:
        raise ChoiceError(
            f"attribution/divergence=exact needs one backward pass per dimension and the data "
            f"has {dim} > {EXACT_DIM}: use attribution/divergence=hutchinson"
        )


def check_one_of(cfg: DictConfig, key: str, choices: Iterable[str]) -> None:
    """``cfg.<key>`` (a value or a list; None = unset) must be among ``choices``."""
    value = OmegaConf.select(cfg, key)
    values = list(value) if isinstance(value, ListConfig) else [value]
    for v in values:
        if v is not None and str(v) not in choices:
            raise ChoiceError(f"{key}={v} does not exist: choose one of {', '.join(choices)}")


def check_indices(cfg: DictConfig, key: str, upper: Any) -> None:
    """``cfg.<key>`` is None or a non-empty list of integers in [0, upper)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    values = list(value) if isinstance(value, ListConfig) else [value]
    bad = [v for v in values if not isinstance(v, int) or v < 0]
    if upper is not None:
        bad += [v for v in values if isinstance(v, int) and v >= int(upper)]
    if bad or not values:
        limit = "" if upper is None else f" below {upper}"
        raise ChoiceError(
            f"{key}={OmegaConf.to_container(value) if isinstance(value, ListConfig) else value}: "
            f"{bad or 'empty'} not allowed; give a list of integers{limit}, e.g. {key}='[0,1]'"
        )


def check_store(cfg: DictConfig) -> None:
    """``shards=`` against the experiment's shards in the store, before any model is loaded."""
    if OmegaConf.select(cfg, "shards") is None:
        return
    from cdm.jobs.pipeline import allowed_shards, shard_indices
    from cdm.store import ArtifactStore

    allowed_shards(cfg, shard_indices(ArtifactStore(cfg.paths.artifacts), str(cfg.experiment_name)))
