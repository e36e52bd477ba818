"""Training jobs of the backbone, a shard adapter and the paragon (SISA slices, resumable)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.logging import get_logger
from cdm.core.names import job_name
from cdm.data.datamodule import ManifestDataModule
from cdm.data.datasets import SampleDataset
from cdm.data.manifest import Manifest, Split, indices_of, slice_indices
from cdm.data.sharding import id_fraction
from cdm.eval.denoising_loss import heldout_denoising_loss
from cdm.eval.head_loss import heldout_head_loss
from cdm.jobs.context import (
    build_trainer,
    device_description,
    fit_resumable,
    identity_of,
    job_dataset,
    load_backbone_for_shards,
    trainer_device,
)
from cdm.jobs.head import build_head_module
from cdm.models.backbone import (
    build_scheduler,
    build_unet,
    load_pretrained_unet,
)
from cdm.models.stable_diffusion import check_pretrained_pipeline
from cdm.models.text import (
    attach_contexts,
    caption_table,
    is_text_data,
    latent_codec,
    model_shape,
    text_encoder_of,
)
from cdm.store import ArtifactStore, make_card
from cdm.training.callbacks import ArtifactWriter, Convergence, SliceCheckpoint
from cdm.training.jobs import BackbonePretraining, ShardTraining

log = get_logger(__name__)
LAST_CHECKPOINT_EVERY_S = 10.0  # last.ckpt (resume only) at most this often between slices


def caption_rows(
    cfg: DictConfig,
    dataset: SampleDataset,
    split: Split,
    slices: list[list[int]],
    band: Mapping[str, Any] | None,
) -> dict[int, int] | None:
    """Text data: the context-table row of each dataset row this job feeds (its slices and its
    held-out images), one row per distinct caption in first-seen order; None otherwise (and for a
    head: heads are unconditional)."""
    if not is_text_data(cfg.data) or cfg.stage == "head":
        return None
    if getattr(dataset, "captions", None) is None:
        raise ValueError(
            f"data.conditioning=text but dataset {dataset.name!r} has no captions (an added "
            "source has none): use a captioned dataset (data=captioned | captioned_folder)"
        )
    spec = stage_optim(cfg).get("convergence")
    held_out = (
        []
        if spec is None
        else heldout_indices(cfg, dataset, split, slices, int(spec.heldout_samples), band)
    )
    first: dict[str, int] = {}
    return {
        i: first.setdefault(dataset.captions[i], len(first))
        for i in [*(i for s in slices for i in s), *held_out]
    }


def with_contexts(
    cfg: DictConfig, unet: torch.nn.Module, dataset: SampleDataset, rows: Mapping[int, int]
) -> None:
    """Attach the context table of the job's captions (row ``rows[i]`` = sample i's caption, the
    null caption last) to ``unet``: a sample's label is its row (``job_dataset``)."""
    captions = {r: dataset.captions[i] for i, r in rows.items()}
    table = caption_table(
        text_encoder_of(cfg.backbone), [captions[r] for r in range(len(captions))]
    )
    attach_contexts(unet, table)


def build_module(
    cfg: DictConfig,
    dataset: SampleDataset,
    split: Split,
    store: ArtifactStore,
    rows: Mapping[int, int] | None = None,
):
    """The LightningModule of this stage and the parents it depends on; text data: the
    backbone gets the context table of the captions of ``rows`` (``caption_rows``)."""
    scheduler = build_scheduler(cfg.backbone.scheduler)
    text = is_text_data(cfg.data)
    common = dict(
        dataset_size=len(dataset),
        conditional=bool(cfg.data.conditional) or text,  # text: labels are caption rows
        seed=int(cfg.seed),
    )
    if cfg.stage == "backbone":
        if cfg.backbone.pretrained_path:
            check_pretrained_pipeline(cfg.backbone.pretrained_path, cfg.backbone.scheduler)
            unet = load_pretrained_unet(cfg.backbone.pretrained_path, cfg.backbone.kind)
        else:
            shape = model_shape(latent_codec(cfg.backbone), cfg.data.channels, cfg.data.resolution)
            channels, resolution = shape[0], shape[1]
            unet = build_unet(
                cfg.backbone.kind,
                OmegaConf.to_container(cfg.backbone.unet, resolve=True),
                sample_size=resolution,
                channels=channels,
                num_classes=cfg.data.num_classes if cfg.data.conditional and not text else None,
            )
        if rows is not None:
            with_contexts(cfg, unet, dataset, rows)
        p = cfg.pretrain
        module = BackbonePretraining(
            unet, scheduler.alphas_cumprod, lr=p.lr, weight_decay=p.weight_decay, ema_decay=p.ema_decay,
            cond_drop_prob=cfg.optim.cond_drop_prob, **common,
        )  # fmt: skip
        parents = (
            [{"kind": "pretrained", "path": str(cfg.backbone.pretrained_path)}]
            if cfg.backbone.pretrained_path
            else []
        )
        return module, parents
    if cfg.stage == "head":  # a compartmental router's head (cdm.jobs.head)
        return build_head_module(cfg, dataset, split, store)
    unet, bcard = load_backbone_for_shards(cfg, store, split)
    if rows is not None:
        with_contexts(cfg, unet, dataset, rows)
    o = cfg.optim
    module = ShardTraining(
        unet, scheduler.alphas_cumprod, OmegaConf.to_container(cfg.adapter, resolve=True),
        lr=o.lr, weight_decay=o.weight_decay, ema_decay=o.ema_decay, cond_drop_prob=o.cond_drop_prob, **common,
    )  # fmt: skip
    parents = [{"kind": "backbone", "name": cfg.backbone.id, "hash": bcard["backbone_hash"]}]
    return module, parents


def job_schedule(
    cfg: DictConfig, dataset: SampleDataset, manifest: Manifest
) -> tuple[list[list[int]], int, int]:
    """(slices of dataset indices, epochs per slice, batch size) of this stage.

    The backbone sees its safe split as one slice; shards, their heads and the paragon walk
    their SISA slices (a head: ``router.epochs_per_slice``, by default the adapter's).
    """
    if cfg.stage == "backbone":
        return (
            [indices_of(dataset, manifest)],
            int(cfg.pretrain.epochs),
            int(cfg.pretrain.batch_size),
        )
    optim = cfg.router if cfg.stage == "head" else cfg.optim
    return (
        slice_indices(dataset, manifest),
        int(optim.epochs_per_slice),
        int(optim.batch_size),
    )


def stage_optim(cfg: DictConfig) -> DictConfig:
    """The optimisation settings of this stage: ``pretrain`` (backbone), ``router`` (a head) or
    ``optim``."""
    if cfg.stage == "head":
        return cfg.router
    return cfg.pretrain if cfg.stage == "backbone" else cfg.optim


def test_rows(dataset: SampleDataset) -> list[int]:
    """Indices of the config dataset's ``test`` images (not an added source's: those come after
    the config's dataset), which no job trains on."""
    base = getattr(dataset, "base", dataset)
    return [i for i in range(len(base)) if base.splits[i] == "test"]


def heldout_indices(
    cfg: DictConfig,
    dataset: SampleDataset,
    split: Split,
    slices: list[list[int]],
    limit: int,
    band: Mapping[str, Any] | None = None,
) -> list[int]:
    """The held-out set of the stopping rule, never a job's training data: the config dataset's
    ``test`` images; without a test split, for a shard or the paragon, the public safe split (the
    backbone's data, which no shard trains on; not for a head, whose negatives it is). Of the
    classes this job trains on when the data is conditional (always for a head: its positives);
    of the job's score band (``band``: a ``sharding=by_score`` shard's manifest meta,
    ``score_min`` to ``score_max``) when the dataset has scores, so that a quality band's head
    tells its own band from the safe distribution; the first ``limit`` in dataset order."""
    rows = test_rows(dataset)
    if not rows and cfg.stage not in ("backbone", "head"):
        rows = sorted(indices_of(dataset, split.safe))
    if cfg.data.conditional or cfg.stage == "head":
        classes = {int(dataset.labels[i]) for s in slices for i in s}
        rows = [i for i in rows if int(dataset.labels[i]) in classes]
    scores = getattr(dataset, "scores", None)
    if band and "score_min" in band and scores is not None:
        low, high = float(band["score_min"]), float(band["score_max"])
        rows = [i for i in rows if low <= float(scores[i]) <= high]
    return rows[:limit]


def heldout_negatives(cfg: DictConfig, dataset: SampleDataset, limit: int) -> list[int]:
    """A head's held-out negatives, test images standing in for the safe split (a per-class
    uniform share of train, so test images are a held-out sample of p_safe; only the
    ``sharding.safe_classes`` when the safe split is those classes alone): ``limit`` of them,
    ordered by a keyed hash of each id (a uniform draw that no other id changes)."""
    rows = test_rows(dataset)
    s = cfg.sharding
    if s.safe_classes and not s.safe_fraction:
        wanted = {int(c) for c in s.safe_classes}
        rows = [i for i in rows if int(dataset.labels[i]) in wanted]
    seed = int(cfg.seed)
    return sorted(rows, key=lambda i: id_fraction(seed, "heldout-safe", dataset.ids[i]))[:limit]


def build_convergence(
    cfg: DictConfig,
    dataset: SampleDataset,
    split: Split,
    module,
    slices: list[list[int]],
    epochs_per_slice: int,
    band: Mapping[str, Any] | None = None,
) -> Convergence | None:
    """The stage's stopping rule (``<pretrain|optim>.convergence``; null: the fixed schedule).

    Slices join every ``epochs_per_slice`` epochs as before; from the epoch the last one joins,
    the held-out loss decides when to stop (without held-out images: at ``min_steps``): the
    denoising loss (``cdm.eval.denoising_loss``, fixed noise), or for a head its logistic loss
    on held-out shard vs safe images (``cdm.eval.head_loss``, fixed noise; no shard's training
    data, so a SISA restart runs the same rule as training from scratch).
    """
    spec = stage_optim(cfg).get("convergence")
    if spec is None:
        return None
    held_out = heldout_indices(cfg, dataset, split, slices, int(spec.heldout_samples), band)
    alphas_cumprod = module.alphas_cumprod.detach().cpu()
    conditional = bool(cfg.data.conditional) or is_text_data(cfg.data) and cfg.stage != "head"
    common = dict(alphas_cumprod=alphas_cumprod, conditional=conditional,
                  repeats=int(spec.repeats), seed=int(cfg.seed), batch_size=int(spec.batch_size))  # fmt: skip
    if cfg.stage == "head":
        negatives = heldout_negatives(cfg, dataset, int(spec.heldout_samples))
        held_out = held_out[: len(negatives)]  # pairs: as many negatives as positives
        evaluate = functools.partial(  # picklable: ddp_spawn sends the callbacks to its processes
            heldout_head_loss, dataset=dataset, positives=held_out, negatives=negatives, **common
        )
    else:
        evaluate = functools.partial(
            heldout_denoising_loss, dataset=dataset, indices=held_out, **common
        )
    if not held_out:
        log.warning(
            "%s: dataset %r has no held-out images for the stopping rule (no 'test' split): "
            "training stops at %s.convergence.min_steps=%s",
            cfg.stage, dataset.name,
            {"backbone": "pretrain", "head": "router"}.get(cfg.stage, "optim"),
            int(spec.min_steps),
        )  # fmt: skip
    return Convergence(
        evaluate if held_out else None,
        first_epoch=(len(slices) - 1) * epochs_per_slice,
        min_steps=int(spec.min_steps),
        max_steps=int(spec.max_steps),
        patience=int(spec.patience),
        check_every_steps=int(spec.check_every_steps),
        min_improvement=float(spec.min_improvement),
        heldout_samples=len(held_out),
    )


def import_pretrained_backbone(
    cfg: DictConfig, store: ArtifactStore, unet: torch.nn.Module, card: dict
) -> dict:
    """``pretrain.epochs=0``: store a local pretrained UNet as the backbone, untouched."""
    if cfg.stage != "backbone" or not cfg.backbone.pretrained_path:
        raise ValueError(
            "zero epochs only imports a pretrained backbone: set backbone.pretrained_path"
        )
    card.update(manifest_hash=None, n_samples_fed=0, metrics={}, wall_time_s=0.0)
    return store.save_backbone(cfg.backbone.id, unet, card)


def fit_job(
    cfg: DictConfig,
    store: ArtifactStore,
    dataset: SampleDataset,
    split: Split,
    manifest: Manifest,
    *,
    ckpt_dir: Path,
    target_dir: Path | None = None,
    card_extra: dict | None = None,
) -> dict | None:
    """Build the stage's module and Trainer and fit it on ``manifest`` (resuming from
    ``ckpt_dir/last.ckpt``); the ArtifactWriter stores the result (in ``target_dir`` if given).

    Returns the card of an imported pretrained backbone (zero epochs), else None.
    """
    experiment = cfg.experiment_name
    job = job_name(cfg.stage, cfg.shard.index)
    is_backbone = cfg.stage == "backbone"
    slices, epochs_per_slice, batch_size = job_schedule(cfg, dataset, manifest)
    rows = caption_rows(cfg, dataset, split, slices, manifest.meta)
    module, parents = build_module(cfg, dataset, split, store, rows)
    dataset = job_dataset(cfg, dataset, rows)
    config = OmegaConf.to_container(cfg, resolve=True)
    identity = identity_of(cfg)
    card = make_card(
        kind=cfg.stage,
        name=cfg.backbone.id if is_backbone else job,
        experiment=experiment,
        shard_index=int(cfg.shard.index) if cfg.stage in ("shard", "head") else None,
        manifest_name=manifest.name,
        safe_manifest_hash=split.safe.hash,
        parents=parents,
        config=config,
        signature=identity.hash,
        identity=identity.sections,
        device=device_description(trainer_device(cfg)),
        **(card_extra or {}),
    )
    if epochs_per_slice == 0:
        return import_pretrained_backbone(cfg, store, module.model, card)

    datamodule = ManifestDataModule(
        dataset,
        slices,
        batch_size=batch_size,
        epochs_per_slice=epochs_per_slice,
        seed=int(cfg.seed),
    )
    convergence = build_convergence(
        cfg, dataset, split, module, slices, epochs_per_slice, band=manifest.meta
    )
    callbacks: list[pl.Callback] = [
        *(
            [] if convergence is None else [convergence]
        ),  # before the checkpoint: its state is in it
        SliceCheckpoint(
            ckpt_dir,
            epochs_per_slice,
            identity.hash,
            identity.sections,
            n_slices=len(slices),
            last_every_s=LAST_CHECKPOINT_EVERY_S,
        ),  # fmt: skip
        ArtifactWriter(
            *(str(store.root), experiment, job, cfg.stage, manifest.hash, card),
            OmegaConf.select(cfg, "adapter.kind"),  # None for the backbone (no adapter group)
            target_dir=None if target_dir is None else str(target_dir),
            convergence=convergence,
        ),
    ]
    max_epochs = datamodule.max_epochs if convergence is None else -1  # the rule stops it
    trainer = build_trainer(cfg, callbacks, store.log_dir(experiment), max_epochs)
    fit_resumable(
        trainer, module, datamodule, ckpt_dir, resume=bool(cfg.resume), what=job, identity=identity
    )
    return None
