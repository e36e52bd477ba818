"""The shared job context: data, split, store, trainer and loggers that every stage builds on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import sha256_bytes
from cdm.data.datasets import SampleDataset, UnionDataset, build_dataset, load_npz
from cdm.data.sharding import (
    Manifest,
    Split,
    make_split,
    with_shards,
    without_ids,
    without_shards,
)
from cdm.models.backbone import (
    UNET_CLASSES,
)
from cdm.store import ArtifactStore, StoreError
from cdm.training.callbacks import KillAtStep


def load_data(cfg: DictConfig) -> SampleDataset:
    """The dataset named by ``cfg.data``, plus the samples of sources added to the experiment
    (``cdm-add-source``: the store keeps a copy of each, labels in the same class space)."""
    kwargs: dict[str, Any] = dict(OmegaConf.to_container(cfg.data.kwargs, resolve=True))
    if cfg.data.get("root") is not None:
        kwargs["root"] = cfg.data.root
    base = build_dataset(
        cfg.data.name, resolution=cfg.data.resolution, channels=cfg.data.channels, **kwargs
    )
    store = experiment_store(cfg)
    added = [] if store is None else store.read_sources(cfg.experiment_name)["added"]
    paths = [(a["source"], store.source_data_path(cfg.experiment_name, a["source"])) for a in added]
    parts = [  # a forgotten source's data is deleted: its shard is removed from the split too
        load_npz(
            path=str(path), resolution=cfg.data.resolution, channels=cfg.data.channels, name=name
        )
        for name, path in paths
        if path.is_file()
    ]
    return UnionDataset([base, *parts], label_by="keep") if parts else base


def experiment_store(cfg: DictConfig) -> ArtifactStore | None:
    """The store of ``cfg.experiment_name`` (None for a config without one)."""
    root = (cfg.get("paths") or {}).get("artifacts")
    if root is None or cfg.get("experiment_name") is None:
        return None
    return ArtifactStore(root)


def split_data(cfg: DictConfig, dataset: SampleDataset) -> Split:
    """The safe split and the shards, deterministic in ``cfg.seed``; then the experiment's
    changes since: shards of added sources (``cdm-add-source``), minus forgotten sources
    (``cdm-forget forget.shard``), minus forgotten ids (``cdm-forget``: each loses them from its
    slice, the rest is unchanged)."""
    s = cfg.sharding
    split = make_split(
        getattr(dataset, "base", dataset),  # added sources' samples are in no config split
        strategy=s.strategy,
        n_shards=s.n_shards,
        seed=cfg.seed,
        safe_fraction=s.safe_fraction,
        safe_classes=None if s.safe_classes is None else list(s.safe_classes),
        n_slices=s.n_slices,
        manifest_path=s.manifest_path,
    )
    store = experiment_store(cfg)
    if store is not None:
        sources = store.read_sources(cfg.experiment_name)
        added = [Manifest.from_json(a["manifest"]) for a in sources["added"]]
        split = with_shards(split, added)
        removed = [r["job"] for r in sources["removed"]]
        split = without_shards(split, removed) if removed else split
    forgotten = forgotten_ids(cfg)
    return without_ids(split, forgotten) if forgotten else split


def forgotten_ids(cfg: DictConfig) -> list[str]:
    """Ids forgotten from ``cfg.experiment_name`` (none without a store); refuses while a forget
    request is half-committed, since manifests and adapters may then disagree."""
    store = experiment_store(cfg)
    if store is None:
        return []
    journal = store.pending_forget(cfg.experiment_name)
    if journal is not None and journal.get("state") == "committing":
        raise StoreError(
            f"a forget request on experiment {cfg.experiment_name!r} was interrupted while being "
            f"committed: finish it with `cdm-forget experiment={cfg.experiment_name}` first"
        )
    return store.forgotten_ids(cfg.experiment_name)


def record_manifests(store: ArtifactStore, experiment: str, split: Split) -> None:
    """Write every manifest of the split; refuse if the experiment's split changed under it."""
    for manifest in (split.safe, split.private, *split.shards):
        try:
            old = store.load_manifest(experiment, manifest.name)
        except StoreError:
            old = None
        if old is not None and old["hash"] != manifest.hash:
            raise StoreError(
                f"experiment {experiment!r} already has a manifest {manifest.name!r} with hash "
                f"{old['hash'][:12]}, but this config makes {manifest.hash[:12]}: the data or sharding "
                "changed. Use a new experiment_name=..., or delete the experiment's artifacts."
            )
        if old is None:
            store.save_manifest(experiment, manifest.to_json())


def select_manifest(stage: str, split: Split, index: int) -> Manifest:
    """The manifest a job trains on: safe (backbone), one shard, or all private data (paragon)."""
    if stage == "backbone":
        return split.safe
    if stage == "paragon":
        return split.private
    name = f"shard-{int(index):02d}"
    for manifest in split.shards:
        if manifest.name == name:
            return manifest
    have = [int(m.name[6:]) for m in split.shards]
    raise ValueError(
        f"shard.index={index} but this experiment has shards {have} (forgotten sources leave "
        f"gaps, added ones come after): use one of them"
    )


def load_backbone_for_shards(
    cfg: DictConfig, store: ArtifactStore, split: Split
) -> tuple[torch.nn.Module, dict]:
    """The experiment's safe backbone, checked to have seen nothing but the safe split."""
    try:
        unet, card = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
    except StoreError as err:
        raise StoreError(
            f"{err}\nTrain the backbone first: cdm-train experiment={cfg.experiment_name} stage=backbone"
        ) from err
    if card.get("safe_manifest_hash") != split.safe.hash:
        raise StoreError(
            f"backbone {cfg.backbone.id!r} was trained on safe split {str(card.get('safe_manifest_hash'))[:12]}, "
            f"but this experiment's safe split is {split.safe.hash[:12]}: it may have seen private data. "
            "Retrain it with stage=backbone retrain=true, or set backbone.id to the right backbone."
        )
    expected = cfg.data.num_classes + 1 if cfg.data.conditional else None
    if unet.config.get("num_class_embeds") != expected:
        raise StoreError(
            f"backbone {cfg.backbone.id!r} has num_class_embeds={unet.config.get('num_class_embeds')} but "
            f"data.conditional={cfg.data.conditional} with {cfg.data.num_classes} classes needs {expected}: "
            "train a matching backbone under another backbone.id=..."
        )
    return unet, card


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback], log_dir: Path, max_epochs: int, **trainer_kwargs
) -> pl.Trainer:
    """``cfg.trainer`` with a job's own callbacks, the configured ones, ``kill_at_step`` and the
    loggers (every training job: backbone, shard, paragon, router, feature net)."""
    callbacks = [
        *callbacks,
        *(instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None),
    ]
    if cfg.get("kill_at_step") is not None:
        callbacks.append(KillAtStep(int(cfg.kill_at_step)))
    loggers = build_loggers(cfg, log_dir)
    return instantiate(
        cfg.trainer, max_epochs=max_epochs, callbacks=callbacks, logger=loggers or False,
        **trainer_kwargs,
    )  # fmt: skip


def build_loggers(cfg: DictConfig, save_dir: Path) -> list:
    """Lightning loggers from ``cfg.logger`` (csv, wandb: offline unless WANDB_API_KEY is set)."""
    loggers = []
    for name, spec in (cfg.logger or {}).items():
        if spec is None:
            continue
        kwargs: dict[str, Any] = {"save_dir": str(save_dir)}
        if name == "wandb" and spec.get("offline") is None:
            kwargs["offline"] = not os.environ.get("WANDB_API_KEY")
        loggers.append(instantiate(spec, **kwargs))
    return loggers


def device_description() -> str:
    """The device a job ran on, for its card."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def fit_resumable(
    trainer: pl.Trainer, module, datamodule, ckpt_dir: Path, *, resume: bool, what: str
) -> None:
    """``trainer.fit``, continuing from ``ckpt_dir/last.ckpt`` when ``resume`` and it exists."""
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if resume and last.exists() else None
    if ckpt_path:
        print(f"[cdm] resuming {what} from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)


def config_signature(config: dict) -> str:
    """Hash of the settings that change what a job computes (not where it logs or runs)."""
    keep = {
        k: config.get(k)
        for k in ("data", "sharding", "backbone", "adapter", "seed", "stage", "shard", "threads")
    }
    keep["train"] = (
        config.get("pretrain") if config.get("stage") == "backbone" else config.get("optim")
    )
    return sha256_bytes(json.dumps(keep, sort_keys=True, default=str).encode())
