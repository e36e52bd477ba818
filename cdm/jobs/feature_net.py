"""The feature-net stage: a domain classifier whose penultimate features give ``FD_<dataset>``.

``cdm-train experiment=<exp> stage=feature_net`` trains a ``FeatureNet`` on ALL of the dataset's
train split (labels = its classes; safe AND private samples), validates it on the test split and
saves it per (dataset, resolution, seed), not per experiment: every experiment on digits at 8x8
shares ``<root>/feature_nets/digits-r8-seed0/``. Its card records the hash of the train ids it was
fed, since a forget request on a private sample concerns this net too.

``load_domain_features(store, "digits", 8, 0)`` gives the ``FeatureSpace`` ``digits_net``; a
Frechet distance in it is reported as ``FD_digits``, never as FID.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import hash_ids
from cdm.core.identity import JobIdentity
from cdm.core.logging import get_logger
from cdm.core.runtime import configure_runtime
from cdm.data.datasets import SampleDataset
from cdm.data.manifest import held_out
from cdm.jobs.context import (
    build_trainer,
    device_description,
    fit_resumable,
    identity_of,
    load_data,
    reuse_stored,
    trainer_device,
)
from cdm.models.feature_net import (
    DomainFeatures,
    FeatureNet,
    feature_net_from_config,
    feature_space_name,
    metric_name,
)
from cdm.store import ArtifactStore, StoreError, make_card
from cdm.store.feature_nets import (
    DEFAULT_KEY_PATTERN,
    clear_feature_net_checkpoints,
    feature_net_key,
    feature_net_stale_reason,
    has_feature_net,
    load_feature_net,
    read_feature_net_card,
    train_hint,
)
from cdm.store.records import all_forgotten_ids
from cdm.training.callbacks import SliceCheckpoint, validation_stopping
from cdm.training.feature_net import FeatureNetDataModule, FeatureNetTraining, FeatureNetWriter

log = get_logger(__name__)

__all__ = [
    "DomainFeatures",
    "load_domain_features",
    "load_feature_net_model",
    "run_feature_net_job",
    "split_hashes",
]


def split_hashes(dataset, split: str = "train") -> tuple[list[int], str]:
    """(dataset indices, ``hash_ids`` of ids + content hashes) of a dataset's ``split``."""
    indices = held_out(dataset, split=split)
    ids = [dataset.ids[i] for i in indices]
    return indices, hash_ids(ids, [dataset.content_hashes[i] for i in indices])


def feature_net_train_split(store: ArtifactStore, dataset) -> tuple[list[int], str, list[str]]:
    """(indices, hash, excluded ids) of what a feature net trains on: the config dataset's train
    split (not sources added to an experiment) minus every id forgotten anywhere in the store."""
    base = getattr(dataset, "base", dataset)
    indices, _ = split_hashes(base, "train")
    forgotten = all_forgotten_ids(store)
    excluded = sorted(base.ids[i] for i in indices if base.ids[i] in forgotten)
    keep = [i for i in indices if base.ids[i] not in forgotten]
    digest = hash_ids([base.ids[i] for i in keep], [base.content_hashes[i] for i in keep])
    return keep, digest, excluded


def check_existing(card: dict, key: str, train_hash: str, channels: int, hint: str) -> None:
    """Refuse to reuse a stored net trained on other data or another channel count."""
    if card.get("train_ids_hash") != train_hash:
        raise StoreError(
            f"feature net {key!r} was trained on train split {str(card.get('train_ids_hash'))[:12]}, "
            f"but this config's train split hashes to {train_hash[:12]} (the data changed). "
            f"Set feature_net.id=<another id>, or replace it: {hint} retrain=true"
        )
    if int(card.get("channels", channels)) != channels:
        raise StoreError(
            f"feature net {key!r} takes {card.get('channels')}-channel images, this config has "
            f"{channels}: set feature_net.id='{{dataset}}-c{{channels}}-r{{resolution}}-seed{{seed}}'"
        )


def run_feature_net_job(cfg: DictConfig) -> dict:
    """Train the dataset's feature net unless the store has it (or ``retrain=true``); its card."""
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    if cfg.get("feature_net") is None:
        raise ValueError(
            "no feature_net config: add `- feature_net: default` to the defaults or pass "
            "+feature_net=default"
        )
    fcfg: dict[str, Any] = OmegaConf.to_container(cfg.feature_net, resolve=True)
    store = ArtifactStore(cfg.paths.artifacts)
    dataset = load_data(cfg)
    dataset = getattr(dataset, "base", dataset)  # the config's data, not sources added later
    seed, resolution, channels = int(cfg.seed), int(dataset.resolution), int(dataset.channels)
    key = feature_net_key(
        dataset.name,
        resolution,
        seed,
        pattern=str(fcfg.get("id") or DEFAULT_KEY_PATTERN),
        channels=channels,
    )
    hint = train_hint(dataset.name, resolution, seed)
    train_idx, train_hash, excluded = feature_net_train_split(store, dataset)
    test_idx, test_hash = split_hashes(dataset, "test")
    if not train_idx:
        raise ValueError(f"dataset {dataset.name!r} has no train split to train a feature net on")
    artifact = store.feature_net_dir(key)
    retrain = bool(cfg.retrain)
    identity = identity_of(cfg, "feature_net")
    if has_feature_net(store, key) and not retrain:
        card = read_feature_net_card(store, key, hint)
        stale = feature_net_stale_reason(store, card)
        fix = f"{hint} retrain=true replaces it"
        kept = reuse_stored(card, identity, f"feature net {key}", artifact, stale=stale, fix=fix)
        if kept is not None:
            check_existing(kept, key, train_hash, channels, hint)
            return kept
        retrain = True
    if retrain:
        clear_feature_net_checkpoints(store, key)

    train, test = (train_idx, train_hash, excluded), (test_idx, test_hash)
    fit_feature_net(cfg, fcfg, store, dataset, key, identity, train, test)
    card = read_feature_net_card(store, key, hint)
    # a finished net keeps no checkpoint: nothing else trained on private data lingers on disk
    clear_feature_net_checkpoints(store, key)
    return card


def fit_feature_net(
    cfg: DictConfig,
    fcfg: dict[str, Any],
    store: ArtifactStore,
    dataset: SampleDataset,
    key: str,
    identity: JobIdentity,
    train: tuple[list[int], str, int],
    test: tuple[list[int], str | None],
) -> None:
    """Fit the feature net ``key`` on the ``train`` indices (resuming from its last checkpoint),
    validating on ``test``; its writer stores the weights and card."""
    train_idx, train_hash, excluded = train
    test_idx, test_hash = test
    seed, resolution, channels = int(cfg.seed), int(dataset.resolution), int(dataset.channels)
    n_classes = len(dataset.class_names)
    labels = dataset.labels[train_idx]
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(f"{dataset.name}: train labels must lie in [0, {n_classes})")
    model = dict(fcfg.get("model") or {})
    torch.manual_seed(seed)
    net = FeatureNet(
        channels=channels,
        resolution=resolution,
        n_classes=n_classes,
        widths=model.get("widths", (32, 64, 128)),
        feature_dim=int(model.get("feature_dim", 128)),
        norm_groups=int(model.get("norm_groups", 8)),
        norm=str(model.get("norm", "group")),
    )
    module = FeatureNetTraining(
        net,
        dataset_size=len(dataset),
        lr=float(fcfg["lr"]),
        weight_decay=float(fcfg.get("weight_decay", 0.0)),
        label_smoothing=float(fcfg.get("label_smoothing", 0.0)),
    )
    epochs = int(fcfg["epochs"])
    if epochs < 1:
        raise ValueError(f"feature_net.epochs must be >= 1, got {epochs}")
    config = OmegaConf.to_container(cfg, resolve=True)
    card = make_card(
        kind="feature_net",
        name=key,
        dataset=dataset.name,
        resolution=resolution,
        channels=channels,
        n_classes=n_classes,
        class_names=list(dataset.class_names),
        feature_space=feature_space_name(dataset.name),
        metric_name=metric_name(dataset.name),
        feature_dim=net.feature_dim,
        seed=seed,
        split="train",
        expected_train_ids_hash=train_hash,
        n_train=len(train_idx),
        forgotten_excluded=excluded,
        test_ids_hash=test_hash,
        n_test=len(test_idx),
        made_by_experiment=str(cfg.experiment_name),
        parents=[],
        config=config,
        signature=identity.hash,
        identity=identity.sections,
        device=device_description(trainer_device(cfg)),
    )
    datamodule = FeatureNetDataModule(
        dataset,
        train_idx,
        test_idx,
        batch_size=int(fcfg["batch_size"]),
        epochs=epochs,
        seed=seed,
    )
    ckpt_dir = store.feature_net_checkpoint_dir(key)
    stopping = validation_stopping(
        fcfg.get("convergence"), "feature_net/val_loss", epochs, has_validation=bool(test_idx),
        what=f"feature net {key}",
    )  # fmt: skip
    callbacks: list[pl.Callback] = [
        *([] if stopping is None else [stopping]),  # before the checkpoint: its state is in it
        SliceCheckpoint(ckpt_dir, epochs, identity.hash, identity.sections),
        FeatureNetWriter(str(store.root), key, train_hash, card, stopping),
    ]
    trainer = build_trainer(
        cfg, callbacks, store.feature_net_log_dir(), epochs,
        check_val_every_n_epoch=1, limit_val_batches=1.0 if test_idx else 0,
    )  # fmt: skip
    fit_resumable(
        trainer, module, datamodule, ckpt_dir, resume=bool(cfg.resume), what=f"feature net {key}",
        identity=identity,
    )  # fmt: skip


def load_feature_net_model(
    store: ArtifactStore, key: str, hint: str | None = None
) -> tuple[FeatureNet, dict[str, Any]]:
    """A stored feature net (checked against its card's sha256) in eval mode -> ``(net, card)``."""
    state, config, card = load_feature_net(store, key, hint)
    net = feature_net_from_config(config)
    net.load_state_dict(state, strict=True)
    return net.eval(), card


def load_domain_features(
    store: ArtifactStore,
    dataset_name: str,
    resolution: int,
    seed: int = 0,
    *,
    key: str | None = None,
    train_ids_hash: str | None = None,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> DomainFeatures:
    """The ``FeatureSpace`` ``<dataset>_net`` of a stored feature net (metric: ``FD_<dataset>``).

    ``key`` defaults to ``<dataset>-r<resolution>-seed<seed>``. A missing net raises
    ``MissingArtifactError`` naming the command that trains it; corrupt weights raise
    ``CorruptArtifactError``. With ``train_ids_hash``, a net trained on another train split is
    refused (``StoreError``).
    """
    hint = train_hint(dataset_name, resolution, seed)
    key = key or feature_net_key(dataset_name, resolution, seed)
    net, card = load_feature_net_model(store, key, hint)
    if card.get("dataset") != dataset_name or int(card.get("resolution", -1)) != int(resolution):
        raise StoreError(
            f"feature net {key!r} is for {card.get('dataset')!r} at {card.get('resolution')}px, "
            f"not {dataset_name!r} at {resolution}px: train the right one with {hint}"
        )
    if train_ids_hash is not None and card.get("train_ids_hash") != train_ids_hash:
        raise StoreError(
            f"feature net {key!r} was trained on train split {str(card.get('train_ids_hash'))[:12]}, "
            f"not {train_ids_hash[:12]}: retrain it with {hint} retrain=true"
        )
    return DomainFeatures(net, dataset_name, batch_size=batch_size, device=device, card=card)
