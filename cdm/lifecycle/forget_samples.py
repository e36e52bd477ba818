"""Exact forgetting of samples (``cdm-forget``): SISA retraining of the shards that hold them.

Paper Sec. 5 and App. B: "CDMs can unlearn a subset by simply re-training the shard (from the
last checkpoint before those samples were seen)"; the shard/slice scheme is SISA (Bourtoule et
al. 2021). A request names sample ids. For every shard holding some of them:

1. the new manifest is the old one minus the ids (``Manifest.without``: every other id keeps its
   slice and order), and the experiment records the ids as forgotten, so every later split of it
   (``cdm.jobs.context.split_data``) leaves them out the same way;
2. the shard is retrained from ``slice-(s-1).ckpt``, the state after the last slice before the
   earliest slice s that held an id (from scratch if s = 0). The checkpoint's fed-id record is
   checked to hold exactly slices 0..s-1 first. The result is bit-identical to training the
   shard from scratch on the new manifest (CPU, deterministic kernels, equal thread count;
   ``tests/test_forgetting.py`` checks it) because nothing before slice s depends on later
   slices: epoch e's order sorts the ids of the slices active at e only by a hash of (seed, e,
   id) (``SliceSampler``), noise by (seed, global step, rank), and the global step at the
   boundary is the same. (A sampler seeded by, e.g., the manifest's total size would break this;
   the test fails for it.)
3. the retrain runs in a staging area (``forget/pending``); only once its ArtifactWriter has
   checked that the ids fed hash to the NEW manifest is it committed: manifests, forgotten ids,
   the adapter (one atomic swap), the checkpoints from slice s on. A journal makes the commit
   roll forward after a crash; a request killed before it leaves nothing changed;
4. what else saw the ids: the router is retrained (``forget.retrain_router``), the shard's k-NN
   centroids recomputed, the paragon's (and any other adapter's) card no longer matches its
   manifest so the store refuses to load it until retrained (``StaleArtifactError``), so is any
   domain feature net trained on a split that held the ids (``stale_feature_nets``), samples,
   evaluations and reference statistics drawn from them are moved to ``forget/quarantine``;
5. a certificate (``certificates/<time>-<hash>.json``) records the request, old and new hashes,
   what was retrained from which checkpoint, what was set aside, and the cost saved.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import hash_ids
from cdm.core.logging import get_logger
from cdm.core.names import ShardId, job_name
from cdm.core.runtime import configure_runtime
from cdm.data.manifest import Manifest, without_ids
from cdm.jobs.context import checkpoint_saw_only, load_data, split_data
from cdm.jobs.train import fit_job
from cdm.lifecycle.downstream import (
    JobSchedule,
    certificate_header,
    finish,
    forget_cost_model,
    job_config,
    paragon_cost,
    shard_adapters,
)
from cdm.lifecycle.journal import (
    ForgetError,
    abbreviate,
    commit,
    stored_manifests,
)
from cdm.lifecycle.verify import verification_record
from cdm.store import (
    ArtifactStore,
    atomic_write_json,
    read_card,
    sha256_file,
)
from cdm.store.layout import last_checkpoint
from cdm.store.records import (
    forgotten_ids,
    write_forget_journal,
)

log = get_logger(__name__)


def read_request(ids: Iterable[str] | None = None, ids_file: str | Path | None = None) -> list[str]:
    """The requested ids (``forget.ids`` and/or one id per line of ``forget.ids_file``), deduplicated."""
    wanted = [str(i).strip() for i in (ids or [])]
    if ids_file is not None:
        path = Path(ids_file).expanduser()
        if not path.is_file():
            raise ForgetError(
                f"forget.ids_file={path} does not exist: give a file with one id per line"
            )
        wanted += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    wanted = list(dict.fromkeys(i for i in wanted if i and not i.startswith("#")))
    if not wanted:
        raise ForgetError(
            "empty forget request: pass forget.ids='[<id>, ...]' or forget.ids_file=<file with one "
            "id per line>; ids are those in artifacts/experiments/<exp>/manifests/*.json"
        )
    return wanted


@dataclass(frozen=True)
class ShardPlan:
    """One shard that holds requested ids: its manifest before and after, and where to restart."""

    index: int
    old: Manifest
    new: Manifest
    first_slice: int  # earliest slice (old numbering) that holds a requested id

    @property
    def job(self) -> str:
        return ShardId(self.index).name

    @property
    def restart_slice(self) -> int | None:
        """The slice checkpoint to restart from (None: from scratch)."""
        return self.first_slice - 1 if self.first_slice > 0 else None


@dataclass(frozen=True)
class ForgetPlan:
    """A validated request: which sample is where, and every manifest that changes."""

    experiment: str
    ids: tuple[str, ...]
    samples: tuple[dict, ...]  # id, content_hash, manifest, shard, slice
    shards: tuple[ShardPlan, ...]
    private_old: Manifest
    private_new: Manifest

    @property
    def request_hash(self) -> str:
        return hash_ids([s["id"] for s in self.samples], [s["content_hash"] for s in self.samples])

    @property
    def private_first_slice(self) -> int:
        return min(self.private_old.slices_of(self.ids).values())


def plan_forget(store: ArtifactStore, experiment: str, ids: Sequence[str]) -> ForgetPlan:
    """Validate ``ids`` against the experiment's manifests; raises ``ForgetError`` naming the fix.

    Refused: an empty request, ids already forgotten, ids of the safe split (the public
    backbone's data, never forgotten by design), ids in no manifest, and a request that would
    empty a whole shard.
    """
    if not ids:
        read_request([])  # raises the empty-request error
    manifests = stored_manifests(store, experiment)
    forgotten = set(forgotten_ids(store, experiment))
    again = [i for i in ids if i in forgotten]
    if again:
        raise ForgetError(
            f"ids already forgotten from experiment {experiment!r}: {abbreviate(again)} (see "
            f"{store.certificate_dir(experiment)}); drop them from the request"
        )
    safe = set(manifests["safe"].ids) if "safe" in manifests else set()
    in_safe = [i for i in ids if i in safe]
    if in_safe:
        raise ForgetError(
            f"{len(in_safe)} ids are in the safe split of {experiment!r}: {abbreviate(in_safe)}. The safe "
            "split is public by definition (it trains the shared backbone, paper Sec. 3) and is "
            "never forgotten; remove them from the request, or build an experiment whose safe "
            "split excludes them (sharding.safe_fraction / safe_classes, new experiment_name)"
        )
    shards = {n: m for n, m in manifests.items() if ShardId.is_shard(n)}
    owner = {sid: name for name, m in shards.items() for sid in m.ids}
    unknown = [i for i in ids if i not in owner]
    if unknown:
        example = next(iter(owner), "<dataset>/000123")
        raise ForgetError(
            f"{len(unknown)} ids are in no shard manifest of experiment {experiment!r}: "
            f"{abbreviate(unknown)}. Sample ids look like {example!r}; list them in "
            f"{store.experiment_dir(experiment) / 'manifests'} (test-split ids were never trained on)"
        )
    if "private" not in manifests:
        raise ForgetError(
            f"experiment {experiment!r} has no 'private' manifest; rerun any cdm-train stage"
        )
    samples, plans = [], []
    for name in sorted({owner[i] for i in ids}):
        old = shards[name]
        mine = [i for i in ids if owner[i] == name]
        pos = {sid: j for j, sid in enumerate(old.ids)}
        where = old.slices_of(mine)
        for sid in mine:
            samples.append(
                {
                    "id": sid,
                    "content_hash": old.content_hashes[pos[sid]],
                    "manifest": name,
                    "shard": ShardId.parse(name).index,
                    "slice": where[sid],
                }
            )
        try:
            new = old.without(mine)
        except ValueError:
            raise ForgetError(
                f"the request holds every sample of {name}: forget the whole source instead, "
                f"which deletes its adapter (paper Sec. 5): cdm-forget experiment={experiment} "
                f"forget.source={name}"
            ) from None
        plans.append(ShardPlan(ShardId.parse(name).index, old, new, min(where.values())))
    private = manifests["private"]
    return ForgetPlan(
        experiment, tuple(ids), tuple(samples), tuple(plans), private, private.without(ids)
    )


def retrain_shard(
    cfg: DictConfig,
    store: ArtifactStore,
    plan: ForgetPlan,
    shard: ShardPlan,
    tag: str,
    head: bool = False,
) -> dict:
    """Retrain one shard's adapter (or, ``head=True``, its compartmental-router head: the same
    SISA restart from its own slice checkpoints) without the ids into the store's pending area
    (``forget/pending``; the live one is not touched)."""
    experiment, job = plan.experiment, shard.job
    unit = job_name("head", shard.index) if head else job  # its checkpoints' job name
    what = f"head {job}" if head else f"adapter {job}"
    if not (store.has_head if head else store.has_adapter)(experiment, job):
        return {"artifact": what, "action": "manifest only: no adapter trained yet"}
    old_card = (store.read_head_card if head else store.read_adapter_card)(experiment, job)
    job_cfg = job_config(
        old_card["config"], store, experiment, kill_at_step=cfg.get("kill_at_step")
    )
    configure_runtime(int(job_cfg.seed), int(job_cfg.threads), bool(job_cfg.deterministic))
    dataset = load_data(job_cfg)
    current = split_data(job_cfg, dataset)
    if current[job].hash != shard.old.hash:
        raise ForgetError(
            f"the config on {job}'s card no longer reproduces its stored manifest "
            f"({current[job].hash[:12]} != {shard.old.hash[:12]}): the data or code "
            "changed since it was trained; retrain the experiment under a new experiment_name"
        )
    new_split = without_ids(current, plan.ids)
    manifest = new_split[job]
    assert manifest.hash == shard.new.hash, "Manifest.without is not deterministic"
    ckpt_dir = store.pending_checkpoint_dir(experiment, unit)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start: dict[str, Any] = {"kind": "scratch", "reason": "the earliest affected slice is slice 0"}
    if shard.restart_slice is not None:
        src = store.slice_checkpoint_path(experiment, unit, shard.restart_slice)
        why = f"{src.name} is missing" if not src.is_file() else None
        why = why or checkpoint_saw_only(store, src, dataset, shard.old, shard.first_slice)
        if why is None:
            shutil.copyfile(src, last_checkpoint(ckpt_dir))
            start = {
                "kind": "slice_checkpoint",
                "slice": shard.restart_slice,
                "path": str(src),
                "sha256": sha256_file(src),
            }
        else:
            start = {"kind": "scratch", "reason": why}
    log.info(
        "forget: retraining %s on %s samples from %s",
        unit,
        len(manifest),
        start.get("path", "scratch"),
    )
    target = (store.pending_head_dir if head else store.pending_adapter_dir)(experiment, job)
    started = time.perf_counter()
    fit_job(
        job_cfg,
        store,
        dataset,
        new_split,
        manifest,
        ckpt_dir=ckpt_dir,
        target_dir=target,
        card_extra={"forget": {"certificate": tag, "restarted_from": start}},
    )
    new_card = read_card(target)
    if new_card.get("manifest_hash") != manifest.hash:
        raise ForgetError(f"{what}: the retrained model's fed hash is not the new manifest's")
    o = job_cfg.optim
    schedule = JobSchedule.from_card(new_card, manifest)  # the steps this retrain's card ran
    return {
        "artifact": what,
        "action": "retrained",
        "restarted_from": start,
        "old_manifest_hash": shard.old.hash,
        "new_manifest_hash": manifest.hash,
        "old_weights_sha256": old_card.get("weights_sha256"),
        "new_weights_sha256": new_card["weights_sha256"],
        "new_checkpoints": sorted(p.name for p in ckpt_dir.glob("*.ckpt")),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "cost": schedule.cost(shard.first_slice if start["kind"] == "slice_checkpoint" else 0),
        "cost_from_scratch": schedule.cost(),
        "seed": int(job_cfg.seed),
        "optim": OmegaConf.to_container(o, resolve=True),
    }


def forget(cfg: DictConfig, store: ArtifactStore, plan: ForgetPlan) -> dict:
    """Retrain the affected shards in staging, then commit and finish (see the module docstring)."""
    experiment = plan.experiment
    tag = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{plan.request_hash[:12]}"
    pending = store.forget_pending_dir(experiment)
    pending.mkdir(parents=True, exist_ok=True)
    journal: dict[str, Any] = {
        "state": "training",
        "tag": tag,
        "ids": list(plan.ids),
        "started_unix": time.time(),
        "retrain_router": bool(cfg.forget.retrain_router),
        "shards": [
            {"job": s.job, "index": s.index, "first_slice": s.first_slice} for s in plan.shards
        ],
        "private_first_slice": plan.private_first_slice,
        "old_manifest_hashes": [plan.private_old.hash, *(s.old.hash for s in plan.shards)],
    }
    write_forget_journal(store, experiment, journal)
    try:
        retrained = [retrain_shard(cfg, store, plan, s, tag) for s in plan.shards]
        heads = {  # the compartmental router's heads of those shards (cdm.jobs.head)
            s.job: retrain_shard(cfg, store, plan, s, tag, head=True)
            for s in plan.shards
            if store.has_head(experiment, s.job)
        }
        for m in (plan.private_new, *(s.new for s in plan.shards)):
            _write_staged_manifest(store, experiment, m)
    except BaseException:
        shutil.rmtree(pending, ignore_errors=True)
        raise
    for record, entry in zip(retrained, journal["shards"], strict=True):
        entry["new_checkpoints"] = record.get("new_checkpoints", [])
        entry["new_weights_sha256"] = record.get("new_weights_sha256")
        if entry["job"] in heads:
            head = heads[entry["job"]]
            entry["head"] = {"job": job_name("head", entry["index"]),
                             "new_checkpoints": head.get("new_checkpoints", []),
                             "new_weights_sha256": head.get("new_weights_sha256")}  # fmt: skip
    journal["certificate"] = draft_certificate(store, plan, tag, [*retrained, *heads.values()])
    journal["state"] = "committing"
    write_forget_journal(store, experiment, journal)
    commit(store, experiment, journal)
    journal["state"] = "committed"
    write_forget_journal(store, experiment, journal)
    return finish(cfg, store, experiment, journal)


def _write_staged_manifest(store: ArtifactStore, experiment: str, manifest: Manifest) -> None:
    atomic_write_json(store.pending_manifest_path(experiment, manifest.name), manifest.to_json())


def draft_certificate(
    store: ArtifactStore, plan: ForgetPlan, tag: str, retrained: list[dict]
) -> dict:
    """The certificate's request, manifests, retrained/unchanged shards and cost (before commit)."""
    experiment = plan.experiment
    unchanged = shard_adapters(store, experiment, exclude={s.job for s in plan.shards})
    manifests = {
        m_old.name: {
            "old_hash": m_old.hash,
            "new_hash": m_new.hash,
            "old_n": len(m_old),
            "new_n": len(m_new),
            "old_slices": [list(s) for s in m_old.slices],
            "new_slices": [list(s) for s in m_new.slices],
        }
        for m_old, m_new in [(s.old, s.new) for s in plan.shards]
        + [(plan.private_old, plan.private_new)]
    }
    forget_cost = {"samples_fed": 0, "optimizer_steps": 0}
    optim = None
    for r in retrained:
        for k in forget_cost:
            forget_cost[k] += r.get("cost", {}).get(k, 0)
        optim = optim or r.get("optim")
    forget_cost["wall_time_s"] = round(sum(r.get("wall_time_s", 0.0) for r in retrained), 3)
    cost: dict[str, Any] = {"forget_retrain": forget_cost}
    cost.update(paragon_cost(store, experiment, plan.private_new, optim))
    cost["ideal_random_sample"] = forget_cost_model(store, experiment)  # before this request
    if forget_cost["samples_fed"] and "paragon_from_scratch" in cost:
        p = cost["paragon_from_scratch"]["samples_fed"]
        cost["samples_saved_factor"] = round(p / forget_cost["samples_fed"], 3)
    return {
        **certificate_header(
            tag,
            experiment,
            plan.private_old.meta.get("dataset"),
            "SISA retraining of the affected shards from the slice checkpoint before the "
            "earliest affected slice (Golatkar et al., CDM, App. B; Bourtoule et al. 2021)",
        ),  # fmt: skip
        "request": {
            "n_ids": len(plan.ids),
            "hash": plan.request_hash,
            "samples": list(plan.samples),
        },
        "manifests": manifests,
        "retrained": retrained,
        "unchanged": unchanged,
        "cost": cost,
        # what cdm-verify needs to retrain the models above from scratch and compare hashes
        "verify": verification_record(store, experiment, plan.ids, [s.new for s in plan.shards]),
    }
