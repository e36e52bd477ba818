"""The router stage: train f(x_t, t) -> P(z = shard | x_t) on every shard's data (paper Sec. 3.4).

``run_router_job(cfg)`` reads the same data, split, manifests and safe backbone as the shard
jobs (``cdm.training``), trains a router with ``RouterTraining`` and saves its own weights (never
the backbone's) through the store, with a card naming every shard manifest and the backbone it
depends on. Its softmax gives the weights w_i(x_t, t) of the mixture score (Prop. 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import hash_ids
from cdm.core.identity import JobIdentity
from cdm.core.logging import get_logger
from cdm.core.runtime import configure_runtime
from cdm.data.datasets import SampleDataset
from cdm.data.manifest import Split, held_out, indices_of
from cdm.jobs.context import (
    build_trainer,
    check_backbone_config,
    denoised_shape,
    device_description,
    fit_resumable,
    identity_of,
    job_dataset,
    load_backbone_for_shards,
    load_data,
    record_manifests,
    reuse_stored,
    split_data,
    trainer_device,
)
from cdm.models.backbone import backbone_hash, build_scheduler
from cdm.models.router import build_router, router_from_artifact, router_model_config
from cdm.store import ArtifactStore, make_card, read_card, stale_reason
from cdm.training.callbacks import SliceCheckpoint, validation_stopping
from cdm.training.router import (
    RouterDataModule,
    RouterTraining,
    RouterWriter,
    train_log_prior,
)

log = get_logger(__name__)

_TAG_ROUTER_VAL = 4  # numpy RNG stream for the held-out part (sharding uses tags 1-3)


@dataclass(frozen=True)
class RouterData:
    """Which samples train the router (per shard) and which validate it (never trained on)."""

    train_groups: list[list[int]]
    val_items: list[tuple[int, int]]
    validation: dict[str, Any]
    shard_manifests: list[dict[str, Any]] = field(default_factory=list)


def router_data(
    dataset: SampleDataset, split: Split, *, seed: int, val_fraction: float = 0.1
) -> RouterData:
    """Router training samples (label = shard index) and its validation set.

    Validation: the dataset's "test" samples whose class belongs to exactly one shard (label =
    that shard) when the shards are by class; otherwise (or if that leaves nothing) a
    deterministic ``val_fraction`` of each shard, held out from router training only.
    """
    shards = [indices_of(dataset, m) for m in split.shards]
    labels = np.asarray(dataset.labels)
    by_class = all(m.meta.get("strategy") == "by_class" for m in split.shards)
    val: list[tuple[int, int]] = []
    train = [list(s) for s in shards]
    kind = "holdout"
    if by_class:
        owners: dict[int, list[int]] = {}
        for k, m in enumerate(split.shards):
            for c in m.classes:
                owners.setdefault(int(c), []).append(k)
        val = [
            (i, owners[int(labels[i])][0])
            for i in held_out(dataset)
            if len(owners.get(int(labels[i]), [])) == 1
        ]
        kind = "test_split_by_class" if val else kind
    if not val:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"router.val_fraction must be in (0, 1), got {val_fraction}")
        train = []
        for k, idx in enumerate(shards):
            ordered = sorted(idx, key=lambda i: dataset.ids[i])
            n_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
            picked = np.random.default_rng([seed, _TAG_ROUTER_VAL, k]).permutation(len(ordered))
            chosen = {ordered[j] for j in picked[:n_val]}
            val += [(i, k) for i in ordered if i in chosen]
            train.append([i for i in idx if i not in chosen])
    val_ids = [dataset.ids[i] for i, _ in val]
    validation = {
        "kind": kind,
        "n_samples": len(val),
        "per_shard": [sum(1 for _, k in val if k == s) for s in range(len(shards))],
        "hash": hash_ids(val_ids, [dataset.content_hashes[i] for i, _ in val]),
    }
    if kind == "holdout":
        validation["fraction"] = float(val_fraction)
    records = [
        {
            "name": m.name,
            "hash": m.hash,
            "n_samples": len(m),
            "n_train": len(train[k]),
            "classes": list(m.classes),
        }
        for k, m in enumerate(split.shards)
    ]
    return RouterData(train, val, validation, records)


def backbone_alphas_cumprod(cfg: DictConfig, backbone_card: dict) -> torch.Tensor:
    """The backbone's own noise schedule (from its card), checked against ``cfg.backbone``: the
    router must see x_t as the shard adapters do."""
    check_backbone_config(cfg, backbone_card)
    ours = OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
    theirs = ((backbone_card.get("config") or {}).get("backbone") or {}).get("scheduler")
    return build_scheduler(theirs or ours).alphas_cumprod


def run_router_job(cfg: DictConfig) -> dict:
    """Train the experiment's router on the union of its shards and return its card."""
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    if cfg.get("router") is None:
        raise ValueError(
            "no router config: add `- router: small` to the defaults or pass +router=small"
        )
    rcfg: dict[str, Any] = OmegaConf.to_container(cfg.router, resolve=True)
    if rcfg.get("kind") == "compartmental":
        raise ValueError(
            "router=compartmental is one head per shard, trained with its shard: "
            "cdm-train -m stage=head shard.index=0,1,... (not stage=router)"
        )
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    name = str(rcfg.get("name") or "router")

    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    record_manifests(store, experiment, split)
    artifact = store.router_dir(experiment, name)
    retrain = bool(cfg.retrain)
    identity = identity_of(cfg, "router")
    if store.has_router(experiment, name) and not retrain:
        card = read_card(artifact)
        stale = stale_reason(store, experiment, card)
        kept = reuse_stored(card, identity, f"router {name}", artifact, stale=stale)
        if kept is not None:
            return kept
        retrain = True
    if retrain:
        store.clear_checkpoints(experiment, name)
    fit_router(cfg, rcfg, store, dataset, split, identity)
    return read_card(artifact)


def fit_router(
    cfg: DictConfig,
    rcfg: dict[str, Any],
    store: ArtifactStore,
    dataset: SampleDataset,
    split: Split,
    identity: JobIdentity,
) -> None:
    """Fit the router ``rcfg`` on noised samples of every shard of ``split`` (resuming from its
    last checkpoint); its writer stores the weights and card."""
    experiment, name = cfg.experiment_name, str(rcfg.get("name") or "router")
    unet, bcard = load_backbone_for_shards(cfg, store, split)
    alphas_cumprod = backbone_alphas_cumprod(cfg, bcard)
    data = router_data(
        dataset, split, seed=int(cfg.seed), val_fraction=float(rcfg.get("val_fraction", 0.1))
    )
    n_shards = len(split.shards)
    channels, resolution, _ = denoised_shape(cfg)  # latents x_t when the backbone has a codec
    shapes = dict(n_shards=n_shards, channels=channels, resolution=resolution)
    router_config = router_model_config(rcfg, **shapes)
    router_config["num_train_timesteps"] = int(alphas_cumprod.shape[0])
    torch.manual_seed(int(cfg.seed))
    # the backbone is given to router classes that take one (BackboneHeadRouter)
    router = build_router(rcfg, **shapes, backbone=unet)
    module = RouterTraining(
        router,
        alphas_cumprod,
        dataset_size=len(dataset),
        lr=float(rcfg["lr"]),
        weight_decay=float(rcfg.get("weight_decay", 0.0)),
        bands=int(rcfg.get("bands", 5)),
        val_draws=int(rcfg.get("val_draws", 1)),
        seed=int(cfg.seed),
    )
    sampling = str(rcfg.get("sampling", "balanced"))
    card = router_card(cfg, name, split, data, bcard, router_config, sampling, module, identity)
    train_hash = hash_ids(
        [dataset.ids[i] for g in data.train_groups for i in g],
        [dataset.content_hashes[i] for g in data.train_groups for i in g],
    )
    epochs = int(rcfg["epochs"])
    fed = [i for g in data.train_groups for i in g] + [i for i, _ in data.val_items]
    seen = job_dataset(cfg, dataset, None, fed=fed)  # a codec's latents: what x_t is at sampling
    datamodule = RouterDataModule(
        seen, data.train_groups, data.val_items, batch_size=int(rcfg["batch_size"]),
        sampling=sampling, seed=int(cfg.seed),
    )  # fmt: skip
    ckpt_dir = store.checkpoint_dir(experiment, name)
    stopping = validation_stopping(
        rcfg.get("convergence"), "router/val_loss", epochs, has_validation=bool(data.val_items),
        what=f"router {name}",
    )  # fmt: skip
    callbacks: list[pl.Callback] = [
        *([] if stopping is None else [stopping]),  # before the checkpoint: its state is in it
        SliceCheckpoint(ckpt_dir, epochs, identity.hash, identity.sections),
        RouterWriter(str(store.root), experiment, name, train_hash, card, router_config, stopping),
    ]
    trainer = build_trainer(
        cfg, callbacks, store.log_dir(experiment), epochs, check_val_every_n_epoch=1
    )
    fit_resumable(
        trainer, module, datamodule, ckpt_dir, resume=bool(cfg.resume), what=f"router {name}",
        identity=identity,
    )  # fmt: skip


def router_card(
    cfg: DictConfig,
    name: str,
    split: Split,
    data: RouterData,
    bcard: dict,
    router_config: dict,
    sampling: str,
    module: RouterTraining,
    identity: JobIdentity,
) -> dict:
    """The router's card: its backbone, the shards (in output order) and their priors (Prop. 3.1:
    the posterior is corrected from the training prior to lambda at sampling time)."""
    sizes = [len(g) for g in data.train_groups]
    return make_card(
        kind="router",
        name=name,
        experiment=cfg.experiment_name,
        arch=router_config["model"]["_target_"],
        parents=[{"kind": "backbone", "name": cfg.backbone.id, "hash": bcard["backbone_hash"]}],
        backbone_hash=bcard["backbone_hash"],
        safe_manifest_hash=split.safe.hash,
        shard_manifests=data.shard_manifests,
        n_shards=len(split.shards),
        sampling=sampling,
        train_log_prior=train_log_prior(sizes, sampling),
        shard_log_prior=[math.log(len(m) / len(split.private)) for m in split.shards],
        validation=data.validation,
        bands=list(module.band_names),
        config=OmegaConf.to_container(cfg, resolve=True),
        signature=identity.hash,
        identity=identity.sections,
        device=device_description(trainer_device(cfg)),
    )


def load_router_model(
    store: ArtifactStore,
    experiment: str,
    name: str = "router",
    *,
    backbone: torch.nn.Module | None = None,
    expected_backbone_hash: str | None = None,
) -> tuple[torch.nn.Module, dict]:
    """A saved router rebuilt in eval mode -> ``(router, card)``.

    A ``backbone_head`` router needs ``backbone``; whenever one is given, its hash (computed,
    unless passed as ``expected_backbone_hash``) must match the router card's.
    """
    expected = expected_backbone_hash or (backbone_hash(backbone) if backbone is not None else None)
    state, config, card = store.load_router(experiment, name, backbone_hash=expected)
    return router_from_artifact(state, config, backbone=backbone), card
