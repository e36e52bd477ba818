"""The shared job context: data, split, store, trainer and loggers that every stage builds on."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cdm.core.identity import (
    JobIdentity,
    describe_differences,
    differing_keys,
    job_identity,
    refusal,
)
from cdm.core.logging import get_logger, quiet_libraries
from cdm.core.names import ShardId, job_name
from cdm.data.datamodule import JobDataset
from cdm.data.datasets import SampleDataset, UnionDataset, dataset_from_config
from cdm.data.loaders import load_npz
from cdm.data.manifest import Manifest, Split, with_shards, without_ids, without_shards
from cdm.data.sharding import make_split
from cdm.models.backbone import (
    UNET_CLASSES,
    class_embeds,
)
from cdm.models.text import encode_images, latent_codec, model_shape
from cdm.store import ArtifactStore, StoreError
from cdm.store.io import load_checkpoint
from cdm.store.layout import last_checkpoint
from cdm.store.records import forgotten_ids as stored_forgotten_ids
from cdm.store.records import read_forget_journal, read_sources
from cdm.training.callbacks import KillAtStep
from cdm.training.progress import JobProgressBar

log = get_logger(__name__)

REUSE_FIX = "pass retrain=true to replace it, or use a new experiment_name=..."
RESUME_FIX = "resume it with the same config, or start over with retrain=true"


def load_data(cfg: DictConfig) -> SampleDataset:
    """The dataset of ``cfg.data`` (its ``_target_``), plus the samples of sources added to the
    experiment (``cdm-add-source``: the store keeps a copy of each, labels in the same class space)."""
    base = dataset_from_config(OmegaConf.to_container(cfg.data, resolve=True))
    store = experiment_store(cfg)
    added = [] if store is None else read_sources(store, cfg.experiment_name)["added"]
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
    (``cdm-forget forget.source``), minus forgotten ids (``cdm-forget``: each loses them from its
    slice, the rest is unchanged)."""
    s = cfg.sharding
    base = getattr(dataset, "base", dataset)  # added sources' samples are in no config split
    scorer = s.get("scorer") if s.strategy == "by_score" else None
    split = make_split(
        base,
        strategy=s.strategy,
        n_shards=s.n_shards,
        seed=cfg.seed,
        safe_fraction=s.safe_fraction,
        safe_classes=None if s.safe_classes is None else list(s.safe_classes),
        n_slices=s.n_slices,
        manifest_path=s.manifest_path,
        scores=None if scorer is None else instantiate(scorer)(base),
    )
    store = experiment_store(cfg)
    if store is not None:
        sources = read_sources(store, cfg.experiment_name)
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
    journal = read_forget_journal(store, cfg.experiment_name)
    if journal is not None and journal.get("state") == "committing":
        raise StoreError(
            f"a forget request on experiment {cfg.experiment_name!r} was interrupted while being "
            f"committed: finish it with `cdm-forget experiment={cfg.experiment_name}` first"
        )
    return stored_forgotten_ids(store, cfg.experiment_name)


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
    name = ShardId(int(index)).name
    for manifest in split.shards:
        if manifest.name == name:
            return manifest
    have = [ShardId.parse(m.name).index for m in split.shards]
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
    if class_embeds(unet) != expected:
        raise StoreError(
            f"backbone {cfg.backbone.id!r} has num_class_embeds={class_embeds(unet)} but "
            f"data.conditional={cfg.data.conditional} with {cfg.data.num_classes} classes needs {expected}: "
            "train a matching backbone under another backbone.id=..."
        )
    check_backbone_config(cfg, card)
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
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(JobProgressBar(progress_title(cfg)))
    loggers = build_loggers(cfg, log_dir)
    quiet_libraries()
    return instantiate(
        cfg.trainer, max_epochs=max_epochs, callbacks=callbacks, logger=loggers or False,
        **trainer_kwargs,
    )  # fmt: skip


def progress_title(cfg: DictConfig) -> str:
    """The job a progress bar names: ``shard-01``, ``paragon``, ``router``, ``feature_net``..."""
    stage = str(cfg.get("stage"))
    try:
        return job_name(stage, int(OmegaConf.select(cfg, "shard.index", default=0)))
    except ValueError:  # stages without a store job name (feature_net, knn)
        return stage


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


def trainer_device(cfg: DictConfig) -> str:
    """The device a Lightning job of ``cfg.trainer`` trains on: cuda for a GPU accelerator."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def device_description(device: torch.device | str) -> str:
    """The device a job ran on, for its card: the one it was given (a CPU job on a machine with a
    GPU is a CPU job)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def fit_resumable(
    trainer: pl.Trainer,
    module,
    datamodule,
    ckpt_dir: Path,
    *,
    resume: bool,
    what: str,
    identity: JobIdentity | None = None,
) -> None:
    """``trainer.fit``, continuing from ``ckpt_dir/last.ckpt`` when ``resume`` and it exists
    (refused if the checkpoint was written under another ``identity``)."""
    last = last_checkpoint(ckpt_dir)
    ckpt_path = str(last) if resume and last.exists() else None
    if ckpt_path:
        if identity is not None:
            check_resume(identity, last, what)
        log.info("resuming %s from %s", what, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)


def checkpoint_saw_only(
    store: ArtifactStore, path: Path, dataset: SampleDataset, manifest: Manifest, n_slices: int
) -> str | None:
    """None if the checkpoint's fed-id record is exactly slices ``0..n_slices-1`` of ``manifest``,
    else why not (then it cannot be a restart point: it may have seen an id ``manifest`` lacks)."""
    state = store.load_checkpoint(path).get("cdm") or {}
    mask = state.get("fed_mask")
    if mask is None:
        return f"{path.name} has no fed-id record"
    if mask.numel() != len(dataset):
        return f"{path.name} was trained on a dataset of {mask.numel()} samples, not {len(dataset)}"
    fed = {dataset.ids[i] for i in mask.nonzero().flatten().tolist()}
    expected = {sid for s in range(n_slices) for sid in manifest.slice_ids(s)}
    if fed != expected:
        return f"{path.name} was fed {len(fed)} samples, not the {len(expected)} of slices 0..{n_slices - 1}"
    return None


def restart_from_clean_slice(
    store: ArtifactStore, experiment: str, job: str, dataset: SampleDataset, manifest: Manifest
) -> dict | None:
    """A stale job (its data changed, e.g. the paragon after ``cdm-forget``) restarts from its last
    ``slice-SS.ckpt`` that was fed exactly slices 0..SS of ``manifest`` (SISA: bit-identical to
    training from scratch on it); that checkpoint becomes ``last.ckpt``, later ones are dropped.
    Where it restarted (None: no clean checkpoint, the caller trains from scratch)."""
    for s in reversed(range(len(manifest.slices) - 1)):  # the last slice's would not be stale
        path = store.slice_checkpoint_path(experiment, job, s)
        if path.is_file() and checkpoint_saw_only(store, path, dataset, manifest, s + 1) is None:
            last = last_checkpoint(store.checkpoint_dir(experiment, job))
            for later in range(s + 1, len(manifest.slices)):
                store.slice_checkpoint_path(experiment, job, later).unlink(missing_ok=True)
            last.unlink(missing_ok=True)
            shutil.copyfile(path, last)
            log.info("%s is stale: restarting from its clean %s", job, path.name)
            return {"kind": "slice_checkpoint", "slice": s, "path": str(path)}
    return None


def identity_of(cfg: DictConfig, stage: str | None = None) -> JobIdentity:
    """The identity of this config's ``stage`` job (default ``cfg.stage``): ``cdm.core.identity``."""
    return job_identity(OmegaConf.to_container(cfg, resolve=True), stage or str(cfg.stage))


def check_reuse(identity: JobIdentity, card: dict, what: str, fix: str = REUSE_FIX) -> None:
    """Refuse to reuse a stored artifact whose card records another identity (a card without
    one, from an older store, is not checked)."""
    stored = card.get("identity")
    if stored is not None and card.get("signature") != identity.hash:
        raise StoreError(refusal(what, stored, identity.sections, fix))


def reuse_stored(
    card: dict,
    identity: JobIdentity,
    what: str,
    location: Path | str,
    *,
    stale: str | None,
    fix: str = REUSE_FIX,
) -> dict | None:
    """The stored artifact's ``card`` when this job may reuse it, or None when it must train again
    because it is stale (trained on data the experiment no longer holds, e.g. after cdm-forget).
    A card made under another identity is refused (``check_reuse``)."""
    check_reuse(identity, card, f"{what} at {location}", fix)
    if stale is None:
        log.info("%s already trained at %s; pass retrain=true to train it again", what, location)
        return card
    log.info("%s is stale (%s, e.g. after cdm-forget): training it again", what, stale)
    return None


def check_resume(identity: JobIdentity, checkpoint: Path, what: str) -> None:
    """Refuse to resume from a checkpoint that a job with another identity wrote (before any
    process is started for the trainer: the message stays one line)."""
    state = load_checkpoint(checkpoint)  # weights_only=True
    for entry in (state.get("callbacks") or {}).values():
        if isinstance(entry, dict) and "signature" in entry and entry["signature"] != identity.hash:
            raise StoreError(
                refusal(f"the checkpoint of {what} at {checkpoint}", entry.get("identity"),
                        identity.sections, RESUME_FIX)
            )  # fmt: skip


def check_backbone_config(cfg: DictConfig, backbone_card: dict) -> None:
    """Refuse a job that runs the backbone with another architecture or noise schedule than the
    one it was trained with (its card's config): x_t must mean the same for every shard, the
    router and the sampler."""
    inert = ("id", "preset", "pretrained_path")  # names and paths: the weights' hash covers them
    theirs = ((backbone_card.get("config") or {}).get("backbone")) or {}
    theirs = {k: v for k, v in theirs.items() if k not in inert}
    ours = OmegaConf.to_container(cfg.backbone, resolve=True)
    ours = {k: v for k, v in ours.items() if k in theirs}  # keys newer than the card: unknown
    keys = differing_keys(theirs, ours)
    if keys:
        what = "noise schedule" if all(k.startswith("scheduler") for k in keys) else "architecture"
        raise StoreError(
            f"backbone {cfg.backbone.id!r} was trained with another {what} than this config's "
            f"({describe_differences(theirs, ours)}): set backbone.* to the backbone's settings, "
            "or train a backbone for these (cdm-train stage=backbone)"
        )


def job_dataset(
    cfg: DictConfig,
    dataset: SampleDataset,
    rows: Mapping[int, int] | None,
    fed: Sequence[int] | None = None,
) -> SampleDataset:
    """The dataset as a job feeds it: caption rows as labels (text data), latents as images
    (a backbone with a codec: each image the job feeds, encoded once: ``fed``, else the keys of
    ``rows``, else all). A router and a head see what the sampler gives them: latents x_t."""
    codec = latent_codec(cfg.backbone)
    if codec is None and rows is None:
        return dataset
    latents = None
    if codec is not None:
        if fed is None:
            fed = sorted(rows) if rows is not None else range(len(dataset))
        fed = sorted(set(fed))
        encoded = encode_images(codec, torch.stack([dataset.image(i) for i in fed]))
        latents = dict(zip(fed, encoded, strict=True))
    return JobDataset(dataset, rows=rows, latents=latents)


def denoised_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """(channels, height, width) of what the backbone denoises, and so of the x_t a router sees
    at sampling time: the data's images, or their latents when ``backbone.codec`` is set."""
    return model_shape(latent_codec(cfg.backbone), cfg.data.channels, cfg.data.resolution)
