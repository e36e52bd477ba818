"""Run one job (stage) of a CDM from a resolved config: the library behind cdm-train."""

from __future__ import annotations

from omegaconf import DictConfig

from cdm.core.names import job_name
from cdm.core.runtime import configure_runtime
from cdm.jobs.context import (
    load_data,
    record_manifests,
    select_manifest,
    split_data,
)
from cdm.jobs.train import fit_job
from cdm.store import ArtifactStore, read_card


def run_job(cfg: DictConfig) -> dict | list[dict]:
    """Train the job ``cfg.stage`` (backbone | shard | paragon | router | knn | feature_net); its card."""
    if cfg.stage == "router":
        from cdm.jobs.router import run_router_job

        return run_router_job(cfg)
    if cfg.stage == "knn":
        from cdm.jobs.knn import run_knn_job

        return run_knn_job(cfg)
    if cfg.stage == "feature_net":
        from cdm.jobs.feature_net import run_feature_net_job

        return run_feature_net_job(cfg)
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    job = job_name(cfg.stage, cfg.shard.index)
    is_backbone = cfg.stage == "backbone"

    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    record_manifests(store, experiment, split)
    manifest = select_manifest(cfg.stage, split, int(cfg.shard.index))
    artifact = (
        store.backbone_dir(cfg.backbone.id) if is_backbone else store.adapter_dir(experiment, job)
    )
    ckpt_job = f"backbone-{cfg.backbone.id}" if is_backbone else job
    retrain = bool(cfg.retrain)
    if (artifact / "card.json").exists() and not retrain:
        stale = None if is_backbone else store.stale_reason(experiment, read_card(artifact))
        if stale is None:
            print(f"[cdm] {job} already trained at {artifact}; pass retrain=true to train it again")
            return read_card(artifact)
        print(f"[cdm] {job} is stale ({stale}, e.g. after cdm-forget): training it again")
        retrain = True
    if retrain:
        store.clear_checkpoints(experiment, ckpt_job)
    imported = fit_job(
        cfg, store, dataset, split, manifest, ckpt_dir=store.checkpoint_dir(experiment, ckpt_job)
    )
    return imported if imported is not None else read_card(artifact)
