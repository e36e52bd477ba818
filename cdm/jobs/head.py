"""The compartmental router's heads: ``cdm-train stage=head shard.index=K router=compartmental``.

Head K is trained like shard K's adapter, by ``cdm.jobs.train.fit_job`` (the shard's manifest,
SISA slices, slice checkpoints, resume, forget restarts) with ``HeadTraining`` as its module,
stopped after its last slice by ``router.convergence`` (its logistic loss on held-out test
images, ``cdm.jobs.train.build_convergence``), and stored beside the shard
(``experiments/<exp>/heads/shard-KK/``) with a card naming the shard's manifest hash and the
backbone. A composition reads the heads of exactly its shards
(``load_heads``); softmax(h + log lambda) gives the w_i of Prop. 3.1
(``cdm.models.compartmental``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from cdm.core.names import ShardId
from cdm.data.datasets import SampleDataset
from cdm.data.manifest import Split, indices_of
from cdm.jobs.context import denoised_shape, job_dataset, load_backbone_for_shards
from cdm.models.backbone import build_scheduler
from cdm.models.compartmental import CompartmentalRouter
from cdm.models.router import build_router, router_from_artifact, router_model_config
from cdm.store import ArtifactStore, StoreError
from cdm.training.heads import HeadTraining


def head_model_config(cfg: DictConfig) -> dict[str, Any]:
    """What rebuilds a head: ``router.model`` with one output (and ``num_classes`` for a
    class-conditional model when the class takes it)."""
    rcfg = OmegaConf.to_container(cfg.router, resolve=True)
    channels, resolution, _ = denoised_shape(cfg)  # a codec's latents: what x_t is at sampling
    spec = router_model_config(rcfg, n_shards=1, channels=channels, resolution=resolution)
    target = spec["model"]["_target_"]
    cls = get_object(target) if isinstance(target, str) else target
    if cfg.data.conditional and "num_classes" in inspect.signature(cls).parameters:
        spec["model"]["num_classes"] = int(cfg.data.num_classes)
    spec["num_train_timesteps"] = len(build_scheduler(cfg.backbone.scheduler).alphas_cumprod)
    return spec


def build_head_module(
    cfg: DictConfig, dataset: SampleDataset, split: Split, store: ArtifactStore
) -> tuple[HeadTraining, list[dict]]:
    """``HeadTraining`` for shard ``cfg.shard.index`` on the experiment's frozen safe backbone,
    with the safe split as negatives; and its parents (the backbone)."""
    if cfg.get("router") is None or cfg.router.get("kind") != "compartmental":
        raise ValueError(
            "stage=head trains a compartmental router's head: pass router=compartmental"
        )
    unet, bcard = load_backbone_for_shards(cfg, store, split)
    spec = head_model_config(cfg)
    torch.manual_seed(int(cfg.seed))  # the head's initial weights: the same in every run
    head = build_router(spec, n_shards=1, channels=spec["channels"], resolution=spec["resolution"],
                        backbone=unet)  # fmt: skip
    safe = sorted(indices_of(dataset, split.safe))
    # the safe negatives as the job feeds its positives: a codec's latents when it has one
    negatives = job_dataset(cfg, dataset, None, fed=safe)
    module = HeadTraining(
        head, build_scheduler(cfg.backbone.scheduler).alphas_cumprod, negatives=negatives,
        safe_indices=safe, head_config=spec,
        dataset_size=len(dataset), lr=float(cfg.router.lr),
        weight_decay=float(cfg.router.get("weight_decay", 0.0)),
        conditional=bool(cfg.data.conditional), seed=int(cfg.seed),
    )  # fmt: skip
    return module, [{"kind": "backbone", "name": cfg.backbone.id, "hash": bcard["backbone_hash"]}]


def load_heads(
    store: ArtifactStore,
    experiment: str,
    shards: list[int],
    manifests: dict[int, dict],
    backbone: torch.nn.Module,
    backbone_hash: str,
) -> tuple[CompartmentalRouter, list[dict]]:
    """The heads of exactly ``shards`` (no other head file is read), checked against the current
    shard manifests and the backbone -> (router giving logits [B, len(shards)], card parents)."""
    heads, parents = [], []
    for k in shards:
        shard = ShardId(k).name
        state, config, card = store.load_head(experiment, shard, backbone_hash=backbone_hash)
        if card.get("manifest_hash") != manifests[k]["hash"]:
            raise StoreError(
                f"the head of {shard} was trained on other data than {shard} holds now: retrain it "
                f"with cdm-train experiment={experiment} stage=head shard.index={k} retrain=true"
            )
        heads.append(router_from_artifact(state, config, backbone=backbone))
        parents.append(
            {"kind": "head", "name": shard, "hash": card["weights_sha256"],
             "manifest_hash": card["manifest_hash"]}
        )  # fmt: skip
    return CompartmentalRouter(heads).eval(), parents
