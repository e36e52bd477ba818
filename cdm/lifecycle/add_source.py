"""Continual learning (``cdm-add-source``): a new source becomes a new shard; nothing else retrains.

Paper Sec. 5, "Continual Learning": "With CDMs, one can simply train an additional model on D_i
and compose it with the previous models." A request names a source (a name and a ``.npz`` or
image folder of its samples, labels in the experiment's class space). Then:

1. the store keeps its own copy of the source's samples at the experiment's resolution
   (``experiments/<exp>/sources/<name>.npz``), so the experiment never depends on the original
   file again, and forgetting the source can delete it;
2. the source is recorded as ``shard-<K>`` with K one past every index the experiment has ever
   used (a forgotten shard's index is never reused), sliced for SISA like every shard; the split
   of every later job (``cdm.jobs.context.split_data``) includes it, and ``private`` grows by it;
3. its adapter is trained on its data alone, from the same backbone; every existing adapter is
   checked to be byte-identical before and after (the record lists both hashes); when the
   experiment's shards have compartmental-router heads (``stage=head``), so does the new one;
4. the routers are retrained on all shards (``add.retrain_router``), k-NN centroids are computed
   for the new shard only (existing centroids are untouched), the paragon is stale (it never saw
   the new data) and is retrained by ``cdm-table1`` or ``cdm-train stage=paragon``;
5. optionally a grid composed from all shards is drawn (``add.num_samples``).

A failure before the new adapter is written removes everything this request wrote (no
half-added source); an interrupted request is finished by running the same command again.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.logging import get_logger
from cdm.core.names import ShardId, job_name
from cdm.data.loaders import load_image_folder, load_npz
from cdm.data.sharding import new_shard
from cdm.jobs.context import load_data, split_data
from cdm.jobs.knn import run_knn_job
from cdm.jobs.run import run_job
from cdm.jobs.sample import run_sampling
from cdm.lifecycle.downstream import retrain_routers, shard_adapters, stale_adapters
from cdm.lifecycle.journal import experiment_lock
from cdm.store import (
    CARD_FILENAME,
    ArtifactStore,
    atomic_write_bytes,
    atomic_write_json,
    read_card,
    validate_name,
)
from cdm.store.cards import utc_now
from cdm.store.records import read_sources, save_sources

log = get_logger(__name__)


class AddSourceError(ValueError):
    """A request to add a source that cannot be carried out; the message says how to fix it."""


def load_source(path: str | Path, resolution: int, channels: int) -> Any:
    """The new source's samples: a ``.npz`` (images, labels) or an image folder (one subfolder
    per class), at the experiment's resolution and channels."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AddSourceError(
            f"source.path={p} does not exist: give a .npz with arrays images (uint8 N,H,W[,C]) and "
            "labels, or a folder with one subfolder of images per class"
        )
    if p.is_dir():
        return load_image_folder(root=str(p), resolution=resolution, channels=channels)
    if p.suffix != ".npz":
        raise AddSourceError(f"source.path={p}: expected a .npz file or an image folder")
    return load_npz(path=str(p), resolution=resolution, channels=channels)


def next_shard_index(store: ArtifactStore, experiment: str) -> int:
    """One past every shard index the experiment has used (removed ones included)."""
    sources = read_sources(store, experiment)
    used = [ShardId.parse(n).index for n in store.list_manifests(experiment) if ShardId.is_shard(n)]
    used += [ShardId.parse(r["job"]).index for r in sources["removed"]]
    used += [ShardId.parse(a["job"]).index for a in sources["added"]]
    return max(used, default=-1) + 1


def _npz_bytes(images: np.ndarray, labels: np.ndarray, ids: list[str]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels, ids=np.array(ids))
    return buf.getvalue()


def record_source(
    cfg: DictConfig, store: ArtifactStore, name: str, path: str | Path
) -> dict[str, Any]:
    """Copy the source's samples into the store and record it as the experiment's next shard."""
    experiment = cfg.experiment_name
    data = load_source(path, int(cfg.data.resolution), int(cfg.data.channels))
    train = [i for i, s in enumerate(data.splits) if s == "train"]
    if not train:
        raise AddSourceError(f"source {name!r} ({path}) has no train samples")
    labels = data.labels[train].numpy()
    n_classes = int(cfg.data.num_classes)
    if cfg.data.conditional and (labels.min() < 0 or labels.max() >= n_classes):
        raise AddSourceError(
            f"source {name!r} has labels {sorted(set(labels.tolist()))[:10]} outside the "
            f"experiment's {n_classes} classes (0..{n_classes - 1}): relabel it in the same class space"
        )
    pixels = torch.stack([data.image(i) for i in train])  # [N, C, R, R] in [-1, 1]
    images = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    images = images[..., 0] if images.shape[-1] == 1 else images
    ids = [f"{name}/{j:06d}" for j in range(len(train))]
    target = store.source_data_path(experiment, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, _npz_bytes(images.numpy(), labels, ids))
    stored = load_npz(
        path=str(target),
        resolution=int(cfg.data.resolution),
        channels=int(cfg.data.channels),
        name=name,
    )  # fmt: skip  content hashes exactly as every later job computes them
    index = next_shard_index(store, experiment)
    manifest = new_shard(
        index, stored.ids, stored.content_hashes, stored.labels.tolist(),
        n_slices=int(cfg.sharding.n_slices), seed=int(cfg.seed),
        meta={"dataset": name, "split": "train", "strategy": "added", "source": name,
              "origin": str(Path(path).expanduser().resolve())},
    )  # fmt: skip
    entry = {
        "source": name, "job": manifest.name, "index": index, "n_samples": len(manifest),
        "manifest": manifest.to_json(), "origin": manifest.meta["origin"], "state": "training",
        "added": utc_now(),
    }  # fmt: skip
    sources = read_sources(store, experiment)
    sources["added"].append(entry)
    save_sources(store, experiment, sources)
    return entry


def _adapter_hashes(store: ArtifactStore, experiment: str) -> dict[str, str]:
    """``{shard job: weights sha256}`` of every trained shard adapter."""
    return {
        r["artifact"].split(" ")[1]: r["weights_sha256"] for r in shard_adapters(store, experiment)
    }


def _undo(store: ArtifactStore, experiment: str, entry: dict, private: dict | None) -> None:
    """Remove everything a failed request wrote: the record, data copy, manifest, adapter."""
    sources = read_sources(store, experiment)
    sources["added"] = [a for a in sources["added"] if a["source"] != entry["source"]]
    save_sources(store, experiment, sources)
    store.source_data_path(experiment, entry["source"]).unlink(missing_ok=True)
    store.delete_manifest(experiment, entry["job"])
    store.delete_adapter(experiment, entry["job"])
    store.clear_checkpoints(experiment, entry["job"])
    store.delete_head(experiment, entry["job"])
    store.clear_checkpoints(experiment, job_name("head", int(entry["index"])))
    if private is not None:
        store.save_manifest(experiment, private)


def sibling_adapter(store: ArtifactStore, experiment: str, adapter: DictConfig) -> DictConfig:
    """The adapter config of the new shard: ``adapter``, unless the experiment's shards were all
    trained with another kind (e.g. ``adapter=full``); then theirs, so it composes with them."""
    cards = [
        store.read_adapter_card(experiment, name)
        for name in store.list_manifests(experiment)
        if ShardId.is_shard(name) and store.has_adapter(experiment, name)
    ]
    theirs = {store.adapter_kind(c): c["config"]["adapter"] for c in cards}
    if len(theirs) != 1 or adapter.kind in theirs:
        return adapter
    ((kind, config),) = theirs.items()
    log.info(
        "add-source: the experiment's shards are adapter=%s: the new shard is trained as they were",
        kind,
    )
    return OmegaConf.create(config)


def sibling_head(store: ArtifactStore, experiment: str, job: str) -> dict | None:
    """The ``router`` config of the experiment's compartmental-router heads (None when its
    shards have none): the new shard gets one head trained alike, and no router retrains."""
    for name in store.list_manifests(experiment):
        if ShardId.is_shard(name) and name != job and store.has_head(experiment, name):
            return store.read_head_card(experiment, name)["config"]["router"]
    return None


def update_centroids(cfg: DictConfig, store: ArtifactStore, experiment: str) -> list[dict]:
    """k-NN centroids of the new shard for every embedder the experiment already has."""
    cards = []
    for directory in sorted(store.knn_dir(experiment).glob("*")):
        existing = sorted(directory.glob(f"shard-*/{CARD_FILENAME}"))
        if not existing:
            continue
        knn_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        knn_cfg.knn = read_card(existing[0])["config"]
        knn_cfg.retrain = False  # only shards without centroids: the new one
        cards += run_knn_job(knn_cfg)
    return cards


def run_add_source(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Add ``cfg.source`` to ``cfg.experiment_name`` as a new shard (see the module docstring);
    ``overrides`` (the user's, e.g. ``experiment=...``) also configure the composed grid."""
    started = time.perf_counter()
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    if cfg.source.name is None or cfg.source.path is None:
        raise AddSourceError(
            "name the source and its data: cdm-add-source experiment=<exp> source.name=<name> "
            "source.path=<file.npz or image folder>"
        )
    name = validate_name(str(cfg.source.name), "source name")
    if not store.list_manifests(experiment):
        raise AddSourceError(
            f"experiment {experiment!r} has no manifests under {store.experiment_dir(experiment)}: "
            "train it first (cdm-train stage=backbone, then stage=shard)"
        )
    with experiment_lock(store, experiment):
        sources = read_sources(store, experiment)
        entry = next((a for a in sources["added"] if a["source"] == name), None)
        taken = {str(store.load_manifest(experiment, n).get("meta", {}).get("source"))
                 for n in store.list_manifests(experiment) if ShardId.is_shard(n)}  # fmt: skip
        if entry is not None and entry.get("state") == "live":
            raise AddSourceError(
                f"source {name!r} is already {entry['job']} of {experiment!r}; pick another name"
            )
        if entry is None and name in taken | {r.get("source") for r in sources["removed"]}:
            raise AddSourceError(
                f"experiment {experiment!r} already has (or had) a source {name!r}"
            )
        before = _adapter_hashes(store, experiment)
        private = store.load_manifest(experiment, "private")
        created = entry is None
        if created:
            entry = record_source(cfg, store, name, cfg.source.path)
        else:
            log.info(
                "add-source: finishing the interrupted request for %r (%s)", name, entry["job"]
            )
        job = entry["job"]
        try:
            split = split_data(cfg, load_data(cfg))
            for manifest in (split[job], split.private):
                store.save_manifest(experiment, manifest.to_json())
            change = {"old_hash": private["hash"], "new_hash": split.private.hash}
            if entry.get("manifests", {}).get("private", {}).get("new_hash") == change["new_hash"]:
                change = entry["manifests"]["private"]  # a rerun: the private before the first try
            shard_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            shard_cfg.stage, shard_cfg.shard.index = "shard", int(entry["index"])
            shard_cfg.adapter = sibling_adapter(store, experiment, shard_cfg.adapter)
            card = run_job(shard_cfg)
            router = sibling_head(store, experiment, job)
            if router is not None:  # router=compartmental: the new shard's own head
                shard_cfg.stage, shard_cfg.router = "head", router
                head = run_job(shard_cfg)
        except BaseException:
            if created:
                _undo(store, experiment, entry, private)
            raise
        sources = read_sources(store, experiment)
        for a in sources["added"]:
            if a["source"] == name:  # the private versions link old artifacts in cdm-provenance
                a["state"], a["manifests"] = "live", {"private": change}
        save_sources(store, experiment, sources)
        after = _adapter_hashes(store, experiment)
        changed = [j for j, h in before.items() if after.get(j) != h]
        if changed:  # never expected: the shard job only writes its own adapter
            raise RuntimeError(f"adding {name!r} changed existing adapters {changed}")
        routers = retrain_routers(cfg, store, experiment, bool(cfg.add.retrain_router))
        centroids = update_centroids(cfg, store, experiment)
        record: dict[str, Any] = {
            "kind": "source_added", "experiment": experiment, "source": name, "job": job,
            "n_samples": entry["n_samples"], "manifest_hash": entry["manifest"]["hash"],
            "adapter_weights_sha256": card["weights_sha256"],
            "head_weights_sha256": None if router is None else head["weights_sha256"],
            "unchanged_adapters": [{"artifact": f"adapter {j}", "weights_sha256_before": h,
                                    "weights_sha256_after": after.get(j)} for j, h in before.items()],
            "routers": routers,
            "knn_centroids": [{"artifact": f"knn centroids {c.get('embedder')}/{c['name']}",
                               "weights_sha256": c.get("weights_sha256")} for c in centroids],
            "stale": stale_adapters(store, experiment),
            "created": utc_now(),
        }  # fmt: skip
        if int(cfg.add.num_samples) > 0:
            record["samples"] = compose_all(cfg, store, name, overrides or [])
        record["wall_time_s"] = round(time.perf_counter() - started, 3)
        path = store.source_record_path(experiment, name)
        atomic_write_json(path, record)
        record["path"] = str(path)
        log.info(
            "add-source: %r is %s (%s samples); record %s", name, job, entry["n_samples"], path
        )
        return record


def compose_all(cfg: DictConfig, store: ArtifactStore, name: str, overrides: list[str]) -> dict:
    """A grid from every shard, the new one included: compartmental with heads, classifier with a
    router, else average."""
    from hydra import compose

    experiment = cfg.experiment_name
    method = "classifier" if store.has_router(experiment, "router") else "average"
    if sibling_head(store, experiment, "") is not None:  # every shard has its own head
        method = "compartmental"
    mine = [o for o in overrides if not o.lstrip("+~").startswith(("source.", "add.", "hydra."))]
    scfg = compose("sample", overrides=[
        *mine, f"experiment_name={experiment}", f"paths.artifacts={store.root}",
        f"composition={method}", f"name=after-add-{name}", f"num_samples={int(cfg.add.num_samples)}",
        f"steps={int(cfg.add.steps)}", "resample=true",
    ])  # fmt: skip
    card = run_sampling(scfg)
    return {
        "name": card["name"],
        "composition": method,
        "path": card["path"],
        "shards": card["shards"],
    }
