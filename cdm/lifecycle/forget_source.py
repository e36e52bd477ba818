"""Forgetting a whole source (``cdm-forget forget.source=...``): its adapter leaves the model.

Paper Sec. 5: "if a data source D_i is removed, we only need to remove the corresponding model to
remove all information about it". A request names one shard (index, ``shard-KK`` or the source
name in its manifest). Nothing is retrained except what combined it with other shards:

1. the experiment records the shard as removed (``sources.json``) and its ids as forgotten, so
   every later split (``cdm.jobs.context.split_data``) leaves both out; from this first step on the
   store refuses the shard's adapter and every router trained with it (``StaleArtifactError``);
2. the private manifest loses the ids (the paragon is stale until retrained), and the shard's
   manifest, adapter, SISA checkpoints, k-NN centroids and, for a source added with
   ``cdm-add-source``, the store's copy of its samples are DELETED, not hidden;
3. samples, evaluations and reference statistics drawn from it are quarantined, the routers are
   retrained on the remaining shards (``forget.retrain_router``), and a certificate lists every
   deleted and updated artifact with its hash.

The commit is journaled like a sample request (``cdm.lifecycle.forget_samples``): a crash mid-way is rolled
forward by the next ``cdm-forget experiment=...``; a request refused at planning changes nothing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from cdm.core.hashing import hash_ids
from cdm.core.names import ShardId, job_name
from cdm.data.manifest import Manifest
from cdm.lifecycle.downstream import certificate_header, finish, paragon_cost, shard_adapters
from cdm.lifecycle.journal import ForgetError, set_aside, stored_manifests
from cdm.store import CARD_FILENAME, ArtifactStore
from cdm.store.cards import utc_now
from cdm.store.records import add_forgotten_ids, read_sources, save_sources, write_forget_journal


@dataclass(frozen=True)
class SourcePlan:
    """A validated whole-source request: the shard, its source name, the private manifest."""

    experiment: str
    shard: Manifest
    private_old: Manifest
    private_new: Manifest
    remaining: tuple[str, ...]

    @property
    def job(self) -> str:
        return self.shard.name

    @property
    def source(self) -> str:
        return str(self.shard.meta.get("source", self.shard.name))

    @property
    def request_hash(self) -> str:
        return hash_ids([self.shard.name], [self.shard.hash])


def resolve_shard(store: ArtifactStore, experiment: str, source: Any) -> str:
    """The shard manifest a user's ``forget.source`` names: 3, ``shard-03`` or a source name."""
    shards = {n: m for n, m in stored_manifests(store, experiment).items() if ShardId.is_shard(n)}
    text = str(source).strip()
    if text.isdigit():
        text = ShardId(int(text)).name
    if text in shards:
        return text
    by_source = [n for n, m in shards.items() if str(m.meta.get("source")) == text]
    if len(by_source) == 1:
        return by_source[0]
    removed = {r["job"]: r for r in read_sources(store, experiment)["removed"]}
    gone = [j for j, r in removed.items() if text in (j, str(r.get("source")))]
    if gone:
        raise ForgetError(
            f"source {source!r} of {experiment!r} was already forgotten ({gone[0]}); see "
            f"{store.certificate_dir(experiment)}"
        )
    have = ", ".join(
        f"{n}" + (f" ({m.meta['source']})" if "source" in m.meta else "") for n, m in shards.items()
    )
    raise ForgetError(
        f"experiment {experiment!r} has no source {source!r}: give a shard index, a shard name "
        f"or a source name; it has {have}"
    )


def plan_forget_source(store: ArtifactStore, experiment: str, source: Any) -> SourcePlan:
    """Validate a whole-source request; ``ForgetError`` names the fix (e.g. the last shard)."""
    job = resolve_shard(store, experiment, source)
    manifests = stored_manifests(store, experiment)
    shards = sorted(n for n in manifests if ShardId.is_shard(n))
    remaining = tuple(n for n in shards if n != job)
    if not remaining:
        raise ForgetError(
            f"{job} is the only shard of {experiment!r}: a CDM needs at least one shard to sample; "
            "delete the experiment's artifacts instead"
        )
    if "private" not in manifests:
        raise ForgetError(
            f"experiment {experiment!r} has no 'private' manifest; rerun any cdm-train stage"
        )
    private = manifests["private"]
    return SourcePlan(
        experiment, manifests[job], private, private.without(manifests[job].ids), remaining
    )


def forget_source(cfg: DictConfig, store: ArtifactStore, plan: SourcePlan) -> dict:
    """Journal, commit and finish a whole-source request (see the module docstring)."""
    experiment, job = plan.experiment, plan.job
    tag = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{plan.request_hash[:12]}"
    ids = list(plan.shard.ids)
    first = min(plan.private_old.slices_of(ids).values())
    journal: dict[str, Any] = {
        "kind": "source",
        "state": "committing",
        "tag": tag,
        "job": job,
        "ids": ids,
        "started_unix": time.time(),
        "retrain_router": bool(cfg.forget.retrain_router),
        "shards": [
            {"job": job, "index": ShardId.parse(job).index, "first_slice": 0, "removed": True}
        ],
        "private_first_slice": first,
        "old_manifest_hashes": [plan.private_old.hash, plan.shard.hash],
        "private_new": plan.private_new.to_json(),
        "certificate": draft_source_certificate(store, plan, tag),
    }
    write_forget_journal(store, experiment, journal)
    commit_source(store, experiment, journal)
    journal["state"] = "committed"
    write_forget_journal(store, experiment, journal)
    return finish(cfg, store, experiment, journal)


def commit_source(store: ArtifactStore, experiment: str, journal: dict) -> dict:
    """Remove the shard (idempotent: a crash here is rolled forward on the next run)."""
    job, tag = journal["job"], journal["tag"]
    done = journal.setdefault("done", {})
    sources = read_sources(store, experiment)
    if not any(r["job"] == job for r in sources["removed"]):
        shard = store.load_manifest(experiment, job)
        sources["removed"].append(
            {"job": job, "source": shard.get("meta", {}).get("source", job), "manifest_hash": shard["hash"],
             "n_samples": len(shard["ids"]), "certificate": tag, "at": utc_now()}
        )  # fmt: skip
        save_sources(
            store, experiment, sources
        )  # from here on the shard and its routers are refused
    add_forgotten_ids(store, experiment, journal["ids"], tag)
    store.save_manifest(experiment, journal["private_new"])
    deleted = done.setdefault("deleted", [])
    source = next((r.get("source") for r in sources["removed"] if r["job"] == job), job)
    added = {a["source"] for a in sources["added"]}
    data = store.source_data_path(experiment, str(source)) if source in added else None
    if data is not None and data.is_file():
        data.unlink()
        deleted.append({"artifact": f"source data {source}", "path": str(data)})
    if store.delete_adapter(experiment, job):
        deleted.append(
            {"artifact": f"adapter {job}", "path": str(store.adapter_dir(experiment, job))}
        )
    if store.delete_head(experiment, job):  # the shard's compartmental-router head leaves too
        deleted.append({"artifact": f"head {job}", "path": str(store.head_dir(experiment, job))})
    for ckpt_job in (job, job_name("head", ShardId.parse(job).index)):
        checkpoints = store.checkpoint_dir(experiment, ckpt_job)
        if store.clear_checkpoints(experiment, ckpt_job):
            deleted.append({"artifact": f"checkpoints {ckpt_job}", "path": str(checkpoints)})
    for card in sorted(store.knn_dir(experiment).glob(f"*/{job}/{CARD_FILENAME}")):
        shutil.rmtree(card.parent)
        deleted.append(
            {"artifact": f"knn centroids {card.parent.parent.name}/{job}", "path": str(card.parent)}
        )
    if store.delete_manifest(experiment, job):
        deleted.append(
            {"artifact": f"manifest {job}", "path": str(store.manifest_path(experiment, job))}
        )
    write_forget_journal(store, experiment, journal)
    return set_aside(store, experiment, journal)


def draft_source_certificate(store: ArtifactStore, plan: SourcePlan, tag: str) -> dict:
    """The certificate's request, the artifacts to delete (with hashes) and the cost (before commit)."""
    experiment, job = plan.experiment, plan.job
    removed: dict[str, Any] = {
        "manifest": job,
        "manifest_hash": plan.shard.hash,
        "n_samples": len(plan.shard),
    }
    if store.has_adapter(experiment, job):
        card = store.read_adapter_card(experiment, job)
        removed["adapter_weights_sha256"] = card.get("weights_sha256")
    if store.has_head(experiment, job):
        removed["head_weights_sha256"] = store.read_head_card(experiment, job).get("weights_sha256")
    unchanged = shard_adapters(store, experiment, exclude={job})
    cost: dict[str, Any] = {
        "forget_retrain": {"samples_fed": 0, "optimizer_steps": 0, "wall_time_s": 0.0}
    }
    optim = None
    if store.has_adapter(experiment, job):
        optim = store.read_adapter_card(experiment, job).get("config", {}).get("optim")
    cost.update(paragon_cost(store, experiment, plan.private_new, optim))
    return {
        **certificate_header(
            tag,
            experiment,
            plan.private_old.meta.get("dataset"),
            "whole source: its adapter (and head), manifest, checkpoints, k-NN centroids and stored data "
            "are deleted; routers are retrained on the remaining shards (CDM Sec. 5)",
        ),  # fmt: skip
        "request": {
            "source": plan.source,
            "shard": job,
            "n_ids": len(plan.shard),
            "hash": plan.request_hash,
        },
        "removed": removed,
        "manifests": {
            job: {
                "old_hash": plan.shard.hash,
                "new_hash": None,
                "old_n": len(plan.shard),
                "new_n": 0,
            },
            "private": {
                "old_hash": plan.private_old.hash,
                "new_hash": plan.private_new.hash,
                "old_n": len(plan.private_old),
                "new_n": len(plan.private_new),
            },
        },  # fmt: skip
        "retrained": [],
        "unchanged": unchanged,
        "cost": cost,
    }
