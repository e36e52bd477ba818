"""Compute each shard's k-NN router centroids from that shard's data alone (cdm-train stage=knn)."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cdm.core.names import ShardId
from cdm.core.runtime import configure_runtime
from cdm.data.manifest import indices_of
from cdm.jobs.context import check_reuse, identity_of, load_data, record_manifests, split_data
from cdm.jobs.feature_net import feature_net_train_split, load_domain_features
from cdm.models.knn_router import build_embedder, embedder_needs_feature_net, kmeans
from cdm.store import CARD_FILENAME, ArtifactStore, make_card, read_card
from cdm.store.knn import save_centroids


@torch.no_grad()
def embed(
    embedder: torch.nn.Module, dataset, indices: list[int], batch_size: int = 256
) -> torch.Tensor:
    """Embeddings [N, d] of the clean images at ``indices``."""
    out = []
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i]["image"] for i in indices[start : start + batch_size]])
        out.append(embedder(images).float())
    return torch.cat(out)


def knn_embedder(cfg: DictConfig, store: ArtifactStore, dataset) -> tuple[torch.nn.Module, list]:
    """The configured embedder and the artifacts it comes from (a feature net is one: it saw data)."""
    spec = OmegaConf.to_container(cfg.knn.embedder, resolve=True)
    if not embedder_needs_feature_net(spec):
        return build_embedder(spec), []
    space = load_domain_features(
        store, dataset.name, dataset.resolution, int(cfg.seed),
        train_ids_hash=feature_net_train_split(store, dataset)[1],
    )  # fmt: skip
    return build_embedder(spec, feature_net=space.net), space.parents


def run_knn_job(cfg: DictConfig) -> list[dict]:
    """Centroids for every shard that has none yet (all of them with ``retrain=true``)."""
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    store = ArtifactStore(cfg.paths.artifacts)
    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    record_manifests(store, cfg.experiment_name, split)
    embedder, parents = knn_embedder(cfg, store, dataset)
    identity = identity_of(cfg, "knn")
    cards = []
    for manifest in tqdm(split.shards, desc="k-NN centroids"):
        job, k = manifest.name, ShardId.parse(manifest.name).index  # indices may have gaps
        directory = store.centroids_dir(cfg.experiment_name, cfg.knn.name, job)
        if (directory / CARD_FILENAME).exists() and not cfg.retrain:
            check_reuse(identity, read_card(directory), f"k-NN centroids at {directory}")
            continue
        started = time.perf_counter()
        points = embed(embedder, dataset, indices_of(dataset, manifest))
        centroids = kmeans(points, int(cfg.knn.k), seed=int(cfg.seed) + k)
        card = make_card(
            name=job, experiment=cfg.experiment_name, embedder=cfg.knn.name, manifest_hash=manifest.hash,
            n_samples=len(manifest.ids), config=OmegaConf.to_container(cfg.knn, resolve=True), parents=parents,
            signature=identity.hash, identity=identity.sections,
            wall_time_s=round(time.perf_counter() - started, 3),
        )  # fmt: skip
        cards.append(save_centroids(store, cfg.experiment_name, cfg.knn.name, job, centroids, card))
    return cards
