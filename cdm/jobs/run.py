"""Run one job (stage) of a CDM from a resolved config: the library behind cdm-train.

The job is the stage option's ``job`` node (``conf/stage/<stage>.yaml``): a ``_partial_`` function
of the config, e.g. ``cdm.jobs.router.run_router_job`` for ``stage=router``.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from cdm.core.logging import get_logger
from cdm.core.names import ShardId, job_name
from cdm.core.runtime import configure_runtime
from cdm.jobs.context import (
    identity_of,
    load_data,
    record_manifests,
    restart_from_clean_slice,
    reuse_stored,
    select_manifest,
    split_data,
)
from cdm.jobs.train import fit_job
from cdm.store import ArtifactStore, read_card, stale_reason
from cdm.store.cards import CARD_FILENAME

log = get_logger(__name__)


def run_job(cfg: DictConfig) -> dict | list[dict]:
    """Run the job of ``cfg.stage`` (``cfg.job``, set by the stage option); its card(s)."""
    if cfg.get("job") is None:
        raise ValueError(
            f"the config has no `job` for stage {cfg.get('stage')!r}: compose it with a stage option "
            "(cdm-train stage=backbone|shard|paragon|router|head|knn|feature_net)"
        )
    job = instantiate(cfg.job)
    return job(cfg)


def run_training_job(cfg: DictConfig) -> dict:
    """Train the backbone (``stage=backbone``), a shard adapter (``shard``), a shard's head of the
    compartmental router (``head``) or the paragon; its card.

    A job whose artifact exists is skipped unless it is stale or ``retrain=true``; a stale one
    restarts from its last slice checkpoint that saw none of the changed data (``resume=true``).
    """
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    job = job_name(cfg.stage, cfg.shard.index)
    is_backbone = cfg.stage == "backbone"

    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    record_manifests(store, experiment, split)
    manifest = select_manifest(cfg.stage, split, int(cfg.shard.index))
    if cfg.stage == "head":
        artifact = store.head_dir(experiment, ShardId(int(cfg.shard.index)).name)
    else:
        artifact = (
            store.backbone_dir(cfg.backbone.id)
            if is_backbone
            else store.adapter_dir(experiment, job)
        )
    ckpt_job = f"backbone-{cfg.backbone.id}" if is_backbone else job
    retrain = bool(cfg.retrain)
    restarted = None
    if (artifact / CARD_FILENAME).exists() and not retrain:
        card = read_card(artifact)
        fix = "pass retrain=true to replace it, or set another backbone.id=..."
        stale = None if is_backbone else stale_reason(store, experiment, card)
        kept = reuse_stored(card, identity_of(cfg), job, artifact, stale=stale,
                            **({"fix": fix} if is_backbone else {}))  # fmt: skip
        if kept is not None:
            return kept
        if bool(cfg.resume):  # stale: SISA restart from the last slice before the change
            restarted = restart_from_clean_slice(store, experiment, job, dataset, manifest)
        retrain = restarted is None
    if retrain:
        store.clear_checkpoints(experiment, ckpt_job)
    imported = fit_job(
        cfg, store, dataset, split, manifest, ckpt_dir=store.checkpoint_dir(experiment, ckpt_job),
        card_extra=None if restarted is None else {"restarted_from": restarted},
    )  # fmt: skip
    return imported if imported is not None else read_card(artifact)
