"""Evaluate samples artifacts: Frechet distance and KID in stated feature spaces, label accuracy,
memorization; the library behind ``cdm-eval``.

Feature spaces: ``domain`` (penultimate features of the dataset's own classifier, reported as
``FD_<dataset>`` / ``KID_<dataset>``), ``inception`` (clean-fid's protocol with Inception-v3: the only
one reported as ``FID`` / ``KID``; see docs/fid.md) and ``pixels`` (``FD_pixels``). Distances are
computed in the spaces of ``evaluate.feature_spaces`` only (the ``memorization_space`` alone gets
nearest-neighbour distances, no FD). The reference
set is the data the CDM models: the union of its shards (``reference=private``), one shard's own
data (``reference=shard-KK``: a compartment measured against what it was trained on), or the
dataset's whole train or test split. Reference features are computed once and cached in the store.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import sha256_bytes
from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.core.runtime import configure_runtime
from cdm.eval.features import FeatureSpace, as_uint8_tensor, to_uint8
from cdm.eval.frechet import frechet_distance, kernel_distance, stats_from_features
from cdm.eval.inception import InceptionFeatures
from cdm.eval.memorization import memorization_summary, nearest_neighbours
from cdm.jobs.context import device_description, identity_of, load_data, select_manifest, split_data
from cdm.jobs.feature_net import feature_net_train_split, load_domain_features
from cdm.store import ArtifactStore, StatsKey, make_card
from cdm.store.samples import read_samples_file
from cdm.store.stats import load_reference_features, save_evaluation, save_reference_features

log = get_logger(__name__)

REFERENCES = ("private", "train", "test")
DEFAULT_REFERENCE = REFERENCES[0]  # the union of the shards: what the CDM models


class PixelFeatures:
    """Raw pixels scaled to [0, 1]: a transparent space for nearest-neighbour memorization."""

    name = "pixels"

    def __init__(self, channels: int, resolution: int) -> None:
        self.dim = channels * resolution * resolution

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        x = as_uint8_tensor(images_uint8)
        return x.reshape(x.shape[0], -1).double().div(255.0).numpy()


def metric_names(space: FeatureSpace) -> tuple[str, str]:
    """(Frechet name, KID name): FID/KID only for the clean-fid Inception protocol."""
    if space.name == "inception_clean":
        return "FID", "KID"
    fd = getattr(space, "metric_name", f"FD_{space.name}")
    return fd, "KID" + fd[2:]


def build_feature_space(cfg: DictConfig, store: ArtifactStore, name: str, dataset) -> FeatureSpace:
    """The feature space ``name`` (domain | inception | pixels) for this experiment's data."""
    if name == "pixels":
        return PixelFeatures(int(cfg.data.channels), int(cfg.data.resolution))
    if name == "inception":
        return InceptionFeatures(progress=bool(cfg.progress))
    if name == "domain":
        return load_domain_features(
            store, dataset.name, dataset.resolution, int(cfg.seed),
            train_ids_hash=feature_net_train_split(store, dataset)[1],
        )  # fmt: skip
    raise ValueError(f"unknown feature space {name!r}: choose domain, inception or pixels")


def reference_rows(cfg: DictConfig, store: ArtifactStore, dataset) -> tuple[list[int], str]:
    """(dataset rows, ids hash) of the reference set ``cfg.evaluate.reference``: ``private`` (the
    stored union of the shards), ``shard-KK`` (that shard's ids in the experiment's current split,
    after forgotten and added sources) or a dataset split (``train``, ``test``)."""
    reference = str(cfg.evaluate.reference)
    if reference == "private":
        manifest = store.load_manifest(cfg.experiment_name, "private")
        rows, ids_hash = [dataset.id_to_index[i] for i in manifest["ids"]], manifest["hash"]
    elif ShardId.is_shard(reference):
        split = split_data(cfg, dataset)
        try:
            shard = select_manifest("shard", split, ShardId.parse(reference).index)
        except ValueError:
            raise ValueError(
                f"evaluate.reference={reference}: experiment {cfg.experiment_name!r} has no such "
                f"shard; choose one of {', '.join(m.name for m in split.shards)}"
            ) from None
        rows, ids_hash = [dataset.id_to_index[i] for i in shard.ids], shard.hash
    elif reference in REFERENCES:
        rows = [i for i, s in enumerate(dataset.splits) if s == reference]
        if not rows:
            raise ValueError(f"dataset {dataset.name!r} has no {reference!r} split to compare with")
        ids_hash = sha256_bytes("\n".join(dataset.ids[i] for i in rows).encode())
    else:
        raise ValueError(
            f"evaluate.reference={reference!r}: choose one of {REFERENCES} or a shard (shard-KK)"
        )
    return rows, ids_hash


def reference_images(
    cfg: DictConfig, store: ArtifactStore, dataset
) -> tuple[torch.Tensor, str, str]:
    """(uint8 images, key, ids hash) of the reference set ``cfg.evaluate.reference``
    (``reference_rows``)."""
    rows, ids_hash = reference_rows(cfg, store, dataset)
    images = to_uint8(torch.stack([dataset.image(i) for i in rows]))
    key = StatsKey(dataset.name, int(dataset.resolution), str(cfg.evaluate.reference), ids_hash)
    return images, key.name, ids_hash


def reference_features(
    store: ArtifactStore,
    space: FeatureSpace,
    key: str,
    ids_hash: str,
    images: torch.Tensor,
    parents: list,
) -> tuple[np.ndarray, dict]:
    """Features of the reference images in ``space``, from the store's cache or computed once."""
    cached = load_reference_features(store, space.name, key)
    if cached is not None and cached[1].get("parents") == parents:
        return cached
    features = space(images)
    card = make_card(
        name=key, feature_space=space.name, ids_hash=ids_hash, n=int(features.shape[0]),
        parents=parents,
    )  # fmt: skip
    return features, save_reference_features(store, space.name, key, features, card)


def load_samples(
    store: ArtifactStore, experiment: str, name: str
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 images [N, C, H, W], labels, card) of a samples artifact, checked against its card."""
    data, card = read_samples_file(store, experiment, name)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return npz["images"], npz["labels"], card


def text_samples(card: dict) -> bool:
    """Whether the samples were drawn from captions: their labels are caption rows, not classes,
    so there is no label accuracy (TIFA-domain scores them: ``cdm-table2``)."""
    data = (card.get("config") or {}).get("data") or {}
    return data.get("conditioning") == "text"


def label_accuracy(space: FeatureSpace, images: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of class-conditional samples that the domain classifier assigns to their label."""
    if labels.size == 0 or not hasattr(space, "predict"):
        return None
    return float(np.mean(space.predict(images) == labels))


def evaluate_one(
    cfg: DictConfig, store: ArtifactStore, name: str, spaces: dict[str, FeatureSpace], refs: dict
) -> dict[str, Any]:
    """Every metric of one samples artifact; saved as its evaluation card."""
    started = time.perf_counter()
    experiment = cfg.experiment_name
    images, labels, samples_card = load_samples(store, experiment, name)
    metrics: dict[str, Any] = {"n_samples": int(images.shape[0])}
    parents = [{"kind": "samples", "name": name, "hash": samples_card["files"]["samples.npz"]}]
    names: dict[str, dict[str, str]] = {}  # feature space -> {"FD": "FD_digits", "KID": ...}
    distance_spaces = {str(s) for s in cfg.evaluate.feature_spaces}
    for space_name, space in spaces.items():
        ref_features, ref_card = refs[space_name]
        features = space(images)
        parents.append({"kind": "ref_stats", "name": ref_card["name"], "feature_space": space.name,
                        "hash": ref_card["weights_sha256"]})  # fmt: skip
        if space_name in distance_spaces:  # a memorization-only space gets no FD: sqrtm of a
            # 3072-d pixel covariance (32x32 RGB) costs ~45 s on 2 cores and nobody asked for it
            fd_name, kid_name = metric_names(space)
            metrics[fd_name] = frechet_distance(
                stats_from_features(features), stats_from_features(ref_features)
            )
            kid_mean, kid_std = kernel_distance(
                features, ref_features, num_subsets=int(cfg.evaluate.kid_subsets),
                max_subset_size=int(cfg.evaluate.kid_subset_size), seed=int(cfg.seed),
            )  # fmt: skip
            metrics[kid_name], metrics[f"{kid_name}_std"] = kid_mean, kid_std
            names[space_name] = {"FD": fd_name, "KID": kid_name}
        if space_name == "domain" and not text_samples(samples_card):
            accuracy = label_accuracy(space, images, labels)
            if accuracy is not None:
                metrics["label_accuracy"] = accuracy
        if space_name == str(cfg.evaluate.memorization_space):
            d1, d2, _ = nearest_neighbours(features, ref_features)
            metrics.update(
                {f"mem_{k}": v for k, v in memorization_summary(d1, d2).items()},
                mem_feature_space=space.name,
            )
    identity = identity_of(cfg, "evaluate")  # recorded: evaluations are not reused
    card = make_card(
        name=name,
        experiment=experiment,
        composition=samples_card.get("composition"),
        shards=samples_card.get("shards"),
        reference=str(cfg.evaluate.reference),
        metrics=metrics,
        metric_names=names,
        parents=parents,
        config=OmegaConf.to_container(cfg.evaluate, resolve=True),
        signature=identity.hash,
        identity=identity.sections,
        device=device_description("cpu"),  # features are computed on the CPU
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    return save_evaluation(store, experiment, name, card)


def run_evaluation(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate every samples artifact named in ``cfg.evaluate.samples``; returns their eval cards."""
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    store = ArtifactStore(cfg.paths.artifacts)
    dataset = load_data(cfg)
    images, key, ids_hash = reference_images(cfg, store, dataset)
    spaces = {s: build_feature_space(cfg, store, s, dataset) for s in cfg.evaluate.feature_spaces}
    if cfg.evaluate.memorization_space and cfg.evaluate.memorization_space not in spaces:
        name = str(cfg.evaluate.memorization_space)
        spaces[name] = build_feature_space(cfg, store, name, dataset)
    refs = {
        s: reference_features(store, space, key, ids_hash, images, getattr(space, "parents", []))
        for s, space in spaces.items()
    }
    cards = []
    for name in cfg.evaluate.samples:
        card = evaluate_one(cfg, store, str(name), spaces, refs)
        headline = [  # the first feature space's distances and label accuracy; all on the card
            f"{k}={v:.4g}"
            for k, v in card["metrics"].items()
            if isinstance(v, float) and not k.startswith("mem_") and "std" not in k
        ]
        shown = ", ".join(headline[:3])
        log.info("%s/%s: %s", cfg.experiment_name, name, shown)
        cards.append(card)
    return cards
