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
   slices: epoch e's order is a permutation seeded by (seed, e) of the ids of the slices active
   at e only (``SliceSampler``), noise by (seed, global step, rank), and the global step at the
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

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import hash_ids
from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.data.sharding import Manifest, indices_of, without_ids
from cdm.store import (
    CARD_FILENAME,
    ArtifactStore,
    atomic_write_json,
    make_card,
    read_card,
    sha256_file,
)
from cdm.store.cards import utc_now
from cdm.store.layout import last_checkpoint
from cdm.store.records import (
    add_forgotten_ids,
    forgotten_ids,
    save_certificate,
    write_forget_journal,
)
from cdm.store.staleness import stale_reason

log = get_logger(__name__)

_SAMPLE_PARENT_KINDS = ("adapter", "router", "knn_centroids")


class ForgetError(ValueError):
    """A forget request that cannot be carried out; the message says how to fix it."""


def _few(items: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


# ------------------------------------------------------------------------------ the request


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


def stored_manifests(store: ArtifactStore, experiment: str) -> dict[str, Manifest]:
    """Every manifest of the experiment, hash-checked; a clear error if it has none."""
    names = store.list_manifests(experiment)
    if not names:
        raise ForgetError(
            f"experiment {experiment!r} has no manifests under {store.experiment_dir(experiment)}: "
            "check experiment=... and paths.artifacts=..., or train it first (cdm-train stage=backbone)"
        )
    return {n: Manifest.from_json(store.load_manifest(experiment, n)) for n in names}


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
            f"ids already forgotten from experiment {experiment!r}: {_few(again)} (see "
            f"{store.certificate_dir(experiment)}); drop them from the request"
        )
    safe = set(manifests["safe"].ids) if "safe" in manifests else set()
    in_safe = [i for i in ids if i in safe]
    if in_safe:
        raise ForgetError(
            f"{len(in_safe)} ids are in the safe split of {experiment!r}: {_few(in_safe)}. The safe "
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
            f"{_few(unknown)}. Sample ids look like {example!r}; list them in "
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


# ------------------------------------------------------------------------------ costs


def schedule_cost(
    slice_sizes: Sequence[int], epochs_per_slice: int, batch_size: int, start_slice: int = 0
) -> dict[str, int]:
    """Samples fed and optimizer steps of a SISA schedule run from slice ``start_slice`` on
    (slice s trains ``epochs_per_slice`` epochs on slices 0..s)."""
    samples = steps = 0
    for s in range(start_slice, len(slice_sizes)):
        active = sum(slice_sizes[: s + 1])
        samples += epochs_per_slice * active
        steps += epochs_per_slice * math.ceil(active / batch_size)
    return {"samples_fed": samples, "optimizer_steps": steps}


def _sizes(m: Manifest) -> list[int]:
    return [b - a for a, b in m.slices]


# ------------------------------------------------------------------------------ retraining


def job_config(
    card_config: dict, store: ArtifactStore, experiment: str, **overrides: Any
) -> DictConfig:
    """The config a stored artifact was trained with, pointed at this store (to retrain it alike)."""
    cfg = OmegaConf.create(card_config)
    cfg.paths.artifacts = str(store.root)
    cfg.experiment_name = experiment
    cfg.resume, cfg.retrain = True, False
    cfg.kill_at_step = None
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def checkpoint_saw_only(
    store: ArtifactStore, path: Path, dataset, manifest: Manifest, n_slices: int
) -> str | None:
    """None if the checkpoint's fed-id record is exactly slices ``0..n_slices-1`` of ``manifest``,
    else why not (then it cannot be a restart point: it may have seen a requested id)."""
    state = store.load_checkpoint(path).get("cdm") or {}
    mask = state.get("fed_mask")
    if mask is None:
        return f"{path.name} has no fed-id record"
    fed = {dataset.ids[i] for i in mask.nonzero().flatten().tolist()}
    expected = {sid for s in range(n_slices) for sid in manifest.slice_ids(s)}
    if fed != expected:
        return f"{path.name} was fed {len(fed)} samples, not the {len(expected)} of slices 0..{n_slices - 1}"
    return None


def retrain_shard(
    cfg: DictConfig,
    store: ArtifactStore,
    plan: ForgetPlan,
    shard: ShardPlan,
    tag: str,
) -> dict:
    """Retrain one shard without the ids into the store's pending area (``forget/pending``; the
    live adapter is not touched)."""
    from cdm.core.runtime import configure_runtime
    from cdm.jobs.context import load_data, split_data
    from cdm.jobs.train import fit_job

    experiment, job = plan.experiment, shard.job
    if not store.has_adapter(experiment, job):
        return {"artifact": f"adapter {job}", "action": "manifest only: no adapter trained yet"}
    old_card = store.read_adapter_card(experiment, job)
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
    ckpt_dir = store.pending_checkpoint_dir(experiment, job)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    start: dict[str, Any] = {"kind": "scratch", "reason": "the earliest affected slice is slice 0"}
    if shard.restart_slice is not None:
        src = store.slice_checkpoint_path(experiment, job, shard.restart_slice)
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
        job,
        len(manifest),
        start.get("path", "scratch"),
    )
    target = store.pending_adapter_dir(experiment, job)
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
        raise ForgetError(f"{job}: the retrained adapter's fed hash is not the new manifest's")
    o = job_cfg.optim
    return {
        "artifact": f"adapter {job}",
        "action": "retrained",
        "restarted_from": start,
        "old_manifest_hash": shard.old.hash,
        "new_manifest_hash": manifest.hash,
        "old_weights_sha256": old_card.get("weights_sha256"),
        "new_weights_sha256": new_card["weights_sha256"],
        "new_checkpoints": sorted(p.name for p in ckpt_dir.glob("*.ckpt")),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "cost": schedule_cost(
            _sizes(manifest),
            int(o.epochs_per_slice),
            int(o.batch_size),
            shard.first_slice if start["kind"] == "slice_checkpoint" else 0,
        ),
        "cost_from_scratch": schedule_cost(
            _sizes(manifest), int(o.epochs_per_slice), int(o.batch_size)
        ),
        "seed": int(job_cfg.seed),
        "optim": OmegaConf.to_container(o, resolve=True),
    }


# ------------------------------------------------------------------------------ commit


@contextlib.contextmanager
def experiment_lock(store: ArtifactStore, experiment: str) -> Iterator[None]:
    """One forget request at a time per experiment (a lock file naming the holder's pid)."""
    path = store.forget_lock_path(experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = path.read_text().strip()
            alive = pid.isdigit() and _alive(int(pid))
            if alive:
                raise ForgetError(
                    f"another cdm-forget (pid {pid}) is running on {experiment!r}"
                ) from None
            path.unlink(missing_ok=True)
    else:
        raise ForgetError(f"cannot take the forget lock {path}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _ckpt_index(name: str) -> int | None:
    return int(name[6:8]) if name.startswith("slice-") and name.endswith(".ckpt") else None


def _drop_checkpoints(directory: Path, from_slice: int, keep: Iterable[str] = ()) -> list[str]:
    """Delete ``last.ckpt`` and ``slice-SS.ckpt`` for SS >= ``from_slice`` (except ``keep``)."""
    removed = []
    keep = set(keep)
    for path in sorted(directory.glob("*.ckpt")) if directory.is_dir() else []:
        idx = _ckpt_index(path.name)
        if path.name not in keep and (
            path.name == "last.ckpt" or (idx is not None and idx >= from_slice)
        ):
            path.unlink()
            removed.append(str(path))
    return removed


def _quarantine(store: ArtifactStore, experiment: str, journal: dict) -> list[dict]:
    """Move samples, evaluations and reference statistics drawn from what saw the ids aside."""
    tag = journal["tag"]
    affected = {("adapter", s["job"]) for s in journal["shards"]} | {("adapter", "paragon")}
    knn = {s["job"] for s in journal["shards"]}
    moved: list[dict] = []

    def move(src: Path, rel: str, why: str) -> None:
        dst = store.quarantine_dir(experiment, tag) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        moved.append({"artifact": rel, "moved_to": str(dst), "reason": why})

    gone: set[str] = set()
    for card_path in sorted(store.samples_root(experiment).glob(f"*/{CARD_FILENAME}")):
        card = read_card(card_path)
        hit = [
            p
            for p in card.get("parents", [])
            if p.get("kind") in _SAMPLE_PARENT_KINDS
            and (
                (p["kind"], p.get("name")) in affected
                or p["kind"] == "router"
                or (p["kind"] == "knn_centroids" and str(p.get("name", "")).split("/")[-1] in knn)
            )
        ]
        if hit:
            gone.add(card_path.parent.name)
            parents = ", ".join(f"{p['kind']} {p.get('name')}" for p in hit)
            move(card_path.parent, f"samples/{card_path.parent.name}", f"drawn from {parents}")
    for card_path in sorted(store.evals_root(experiment).glob(f"*/{CARD_FILENAME}")):
        if card_path.parent.name in gone:
            move(
                card_path.parent, f"evals/{card_path.parent.name}", "evaluates quarantined samples"
            )
    old_hashes = set(journal["old_manifest_hashes"])
    for card_path in sorted(store.stats_root().glob(f"*/*/{CARD_FILENAME}")):
        if read_card(card_path).get("ids_hash") in old_hashes:
            rel = card_path.parent.relative_to(store.root).as_posix()
            move(card_path.parent, rel, "features of a manifest that held the ids")
    return moved


def commit(store: ArtifactStore, experiment: str, journal: dict) -> dict:
    """Make a checked retrain live (idempotent: a crash here is rolled forward on the next run).

    Order: manifests, forgotten ids, adapters (one atomic swap each), checkpoints, then what
    else saw the ids. From the first step on, every artifact trained on an old manifest is
    refused by the store, so no intermediate state serves a model that saw the ids.
    """
    done = journal.setdefault("done", {})
    for path in sorted(store.pending_manifests_dir(experiment).glob("*.json")):
        store.save_manifest(experiment, Manifest.from_json(_read_json(path)).to_json())
    add_forgotten_ids(store, experiment, journal["ids"], journal["tag"])
    for shard in journal["shards"]:
        job = shard["job"]
        staged = store.pending_adapter_dir(experiment, job)
        if staged.is_dir():
            # after a crash inside the swap, the staged path may hold the OLD adapter: never put
            # back anything but the checked retrain
            if read_card(staged).get("weights_sha256") == shard.get("new_weights_sha256"):
                store.install_adapter(experiment, job, staged)
            else:
                shutil.rmtree(staged)
        ckpts = store.checkpoint_dir(experiment, job)
        staged_ckpts = store.pending_checkpoint_dir(experiment, job)
        replaced = done.setdefault("checkpoints_replaced", [])
        if staged_ckpts.is_dir():
            ckpts.mkdir(parents=True, exist_ok=True)
            for path in sorted(staged_ckpts.glob("*.ckpt")):
                if (ckpts / path.name).exists():
                    replaced.append(str(ckpts / path.name))
                os.replace(path, ckpts / path.name)
        deleted = done.setdefault("checkpoints_deleted", [])
        deleted += _drop_checkpoints(ckpts, shard["first_slice"], shard.get("new_checkpoints", ()))
        write_forget_journal(store, experiment, journal)
    return set_aside(store, experiment, journal)


def set_aside(store: ArtifactStore, experiment: str, journal: dict) -> dict:
    """The last commit step of every request: the paragon's checkpoints from the first private
    slice that changed are dropped, and what was drawn from the changed models is quarantined."""
    done = journal.setdefault("done", {})
    deleted = done.setdefault("checkpoints_deleted", [])
    deleted += _drop_checkpoints(
        store.checkpoint_dir(experiment, "paragon"), journal["private_first_slice"]
    )
    done["quarantined"] = done.get("quarantined", []) + _quarantine(store, experiment, journal)
    return journal


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ after the commit


def retrain_routers(
    cfg: DictConfig, store: ArtifactStore, experiment: str, retrain: bool
) -> list[dict]:
    """Retrain (or leave stale and refused) every router trained on the old shard manifests."""
    from cdm.jobs.router import run_router_job

    records = []
    exp_dir = store.experiment_dir(experiment)
    for card_path in sorted(exp_dir.glob("*/card.json")):
        card = read_card(card_path)
        if card.get("kind") != "router" or not stale_reason(store, experiment, card):
            continue
        name = card_path.parent.name
        record = {"artifact": f"router {name}", "old_weights_sha256": card.get("weights_sha256")}
        if not retrain:
            store.clear_checkpoints(experiment, name)
            record.update(
                action="stale: refused on load until retrained",
                rebuild=f"cdm-train experiment={experiment} stage=router router.name={name} retrain=true",
            )
        else:
            router_cfg = job_config(card["config"], store, experiment, retrain=True)
            OmegaConf.update(router_cfg, "router.name", name, force_add=True)
            new = run_router_job(router_cfg)
            record.update(
                action="retrained",
                new_weights_sha256=new["weights_sha256"],
                shard_manifests=new["shard_manifests"],
            )
        records.append(record)
    return records


def recompute_centroids(
    cfg: DictConfig, store: ArtifactStore, experiment: str, journal: dict
) -> list[dict]:
    """Recompute the k-NN centroids of every shard that lost ids (each embedder); where that
    fails, delete them (then they are missing, and ``cdm-train stage=knn`` remakes them)."""
    from cdm.jobs.context import load_data
    from cdm.jobs.knn import embed, knn_embedder
    from cdm.models.knn_router import kmeans
    from cdm.store.knn import save_centroids

    records = []
    for shard in journal["shards"]:
        job = shard["job"]
        base = cfg
        if store.has_adapter(experiment, job):
            base = job_config(store.read_adapter_card(experiment, job)["config"], store, experiment)
        for card_path in sorted(store.knn_dir(experiment).glob(f"*/{job}/{CARD_FILENAME}")):
            card = read_card(card_path)
            name = card_path.parent.parent.name
            record = {
                "artifact": f"knn centroids {name}/{job}",
                "old_weights_sha256": card.get("weights_sha256"),
            }
            try:
                knn_cfg = job_config(OmegaConf.to_container(base, resolve=True), store, experiment)
                knn_cfg.knn = card["config"]
                dataset = load_data(knn_cfg)
                manifest = Manifest.from_json(store.load_manifest(experiment, job))
                started = time.perf_counter()
                embedder, parents = knn_embedder(knn_cfg, store, dataset)
                points = embed(embedder, dataset, indices_of(dataset, manifest))
                k, seed = int(card["config"]["k"]), int(knn_cfg.seed) + int(shard["index"])
                new = make_card(
                    name=job,
                    experiment=experiment,
                    embedder=name,
                    manifest_hash=manifest.hash,
                    n_samples=len(manifest.ids),
                    config=card["config"],
                    parents=parents,
                    wall_time_s=round(time.perf_counter() - started, 3),
                )
                new = save_centroids(
                    store, experiment, name, job, kmeans(points, k, seed=seed), new
                )
                record.update(
                    action="recomputed",
                    new_weights_sha256=new["weights_sha256"],
                    manifest_hash=manifest.hash,
                )
            except Exception as err:  # never leave centroids of the old shard in use
                shutil.rmtree(card_path.parent)
                record.update(
                    action=f"deleted ({type(err).__name__}: {err})",
                    rebuild=f"cdm-train experiment={experiment} stage=knn knn={name}",
                )
            records.append(record)
    return records


def stale_adapters(store: ArtifactStore, experiment: str) -> list[dict]:
    """Adapters whose card no longer matches their manifest (e.g. the paragon): refused on load."""
    records = []
    for card_path in sorted(store.experiment_dir(experiment).glob("*/card.json")):
        card = read_card(card_path)
        if card.get("kind") == "router" or "adapter_kind" not in card:
            continue
        reason = stale_reason(store, experiment, card)
        if reason:
            job = card_path.parent.name
            records.append(
                {
                    "artifact": f"adapter {job}",
                    "action": "stale: refused on load until retrained",
                    "reason": reason,
                    "weights_sha256": card.get("weights_sha256"),
                    "rebuild": f"cdm-train experiment={experiment} stage={job} retrain=true",
                }
            )
    return records


def not_covered(
    store: ArtifactStore, experiment: str, ids: Sequence[str], dataset_name: str | None
) -> list[dict]:
    """What else in the store saw the ids but is outside this experiment's forgetting."""
    out = []
    wanted = set(ids)
    for other in store.list_experiments():
        if other == experiment or "private" not in store.list_manifests(other):
            continue
        held = wanted & set(store.load_manifest(other, "private").get("ids", []))
        if held:
            out.append(
                {
                    "artifact": f"experiment {other}",
                    "n_ids": len(held),
                    "fix": f"cdm-forget experiment={other} forget.ids_file=<the same ids>",
                }
            )
    return out


def stale_feature_nets(store: ArtifactStore) -> list[dict]:
    """Domain feature nets trained on a forgotten id (they train on a dataset's whole train split,
    private data included): refused on load until retrained without the forgotten ids."""
    from cdm.store.feature_nets import feature_net_stale_reason, list_feature_nets, train_hint

    records = []
    for card in list_feature_nets(store):
        reason = feature_net_stale_reason(store, card)
        if reason:
            hint = train_hint(
                str(card.get("dataset")), int(card.get("resolution", 0)), int(card.get("seed", 0))
            )
            records.append(
                {
                    "artifact": f"feature_net {card.get('name')}",
                    "action": "stale: refused on load until retrained (FD_<dataset>, knn=feature_net)",
                    "reason": reason,
                    "weights_sha256": card.get("weights_sha256"),
                    "rebuild": f"{hint} retrain=true",
                }
            )
    return records


def finish(cfg: DictConfig, store: ArtifactStore, experiment: str, journal: dict) -> dict:
    """Routers, centroids, stale list and the certificate; then the pending area is removed."""
    cert = dict(journal["certificate"])
    cert["routers"] = retrain_routers(cfg, store, experiment, bool(journal["retrain_router"]))
    cert["knn_centroids"] = recompute_centroids(cfg, store, experiment, journal)
    cert["stale"] = stale_adapters(store, experiment) + stale_feature_nets(store)
    cert["checkpoints_replaced"] = journal.get("done", {}).get("checkpoints_replaced", [])
    cert["checkpoints_deleted"] = journal.get("done", {}).get("checkpoints_deleted", [])
    cert["quarantined"] = journal.get("done", {}).get("quarantined", [])
    if journal.get("kind") == "source":
        cert["deleted"] = journal.get("done", {}).get("deleted", [])
    cert["not_covered"] = not_covered(store, experiment, journal["ids"], cert.get("dataset"))
    cert["finished"] = utc_now()
    cert["wall_time_s"] = round(time.time() - journal["started_unix"], 3)
    path = save_certificate(store, experiment, journal["tag"], cert)
    cert["path"] = str(path)
    shutil.rmtree(store.forget_pending_dir(experiment), ignore_errors=True)
    log.info("forget: certificate %s", path)
    return cert


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
        for m in (plan.private_new, *(s.new for s in plan.shards)):
            _write_staged_manifest(store, experiment, m)
    except BaseException:
        shutil.rmtree(pending, ignore_errors=True)
        raise
    for record, entry in zip(retrained, journal["shards"], strict=True):
        entry["new_checkpoints"] = record.get("new_checkpoints", [])
        entry["new_weights_sha256"] = record.get("new_weights_sha256")
    journal["certificate"] = draft_certificate(store, plan, tag, retrained)
    journal["state"] = "committing"
    write_forget_journal(store, experiment, journal)
    commit(store, experiment, journal)
    journal["state"] = "committed"
    write_forget_journal(store, experiment, journal)
    return finish(cfg, store, experiment, journal)


def _write_staged_manifest(store: ArtifactStore, experiment: str, manifest: Manifest) -> None:
    atomic_write_json(store.pending_manifest_path(experiment, manifest.name), manifest.to_json())


def paragon_cost(
    store: ArtifactStore, experiment: str, private_new: Manifest, optim: dict | None
) -> dict[str, Any]:
    """What retraining the monolithic paragon on the data left would cost: its SISA schedule
    (the paragon card's optimizer settings, else ``optim``) and its last training's wall time."""
    cost: dict[str, Any] = {}
    if store.has_adapter(experiment, "paragon"):
        paragon = store.read_adapter_card(experiment, "paragon")
        optim = paragon.get("config", {}).get("optim") or optim
        cost["paragon_wall_time_s_when_trained"] = paragon.get("wall_time_s")
    if optim:
        cost["paragon_from_scratch"] = schedule_cost(
            _sizes(private_new), int(optim["epochs_per_slice"]), int(optim["batch_size"])
        )
    return cost


def shard_adapters(
    store: ArtifactStore, experiment: str, exclude: Iterable[str] = ()
) -> list[dict]:
    """``{artifact, weights_sha256, manifest_hash}`` of every trained shard adapter but ``exclude``:
    what a request leaves untouched (its certificate lists them to show it)."""
    records = []
    for name in store.list_manifests(experiment):
        if (
            ShardId.is_shard(name)
            and name not in set(exclude)
            and store.has_adapter(experiment, name)
        ):
            card = store.read_adapter_card(experiment, name)
            records.append(
                {"artifact": f"adapter {name}", "weights_sha256": card.get("weights_sha256"),
                 "manifest_hash": card.get("manifest_hash")}
            )  # fmt: skip
    return records


def certificate_header(tag: str, experiment: str, dataset: str | None, method: str) -> dict:
    """The fields every forget certificate starts with."""
    return {
        "kind": "forget_certificate",
        "name": tag,
        "experiment": experiment,
        "dataset": dataset,
        "created": utc_now(),
        "code_version": make_card()["code_version"],
        "method": method,
    }


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
    }
