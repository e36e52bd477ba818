"""The commit of a forget request: the experiment lock, the journaled swap of staged artifacts
into place (rolled forward after a crash), and what is set aside (quarantined) by it."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cdm.core.logging import get_logger
from cdm.data.manifest import Manifest
from cdm.store import (
    CARD_FILENAME,
    ArtifactStore,
    read_card,
)
from cdm.store.records import (
    add_forgotten_ids,
    write_forget_journal,
)

log = get_logger(__name__)


# parents through which a sample artifact depends on shard data (quarantined with it)
SAMPLE_PARENT_KINDS = ("adapter", "head", "router", "knn_centroids")


class ForgetError(ValueError):
    """A forget request that cannot be carried out; the message says how to fix it."""


def abbreviate(items: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


def stored_manifests(store: ArtifactStore, experiment: str) -> dict[str, Manifest]:
    """Every manifest of the experiment, hash-checked; a clear error if it has none."""
    names = store.list_manifests(experiment)
    if not names:
        raise ForgetError(
            f"experiment {experiment!r} has no manifests under {store.experiment_dir(experiment)}: "
            "check experiment=... and paths.artifacts=..., or train it first (cdm-train stage=backbone)"
        )
    return {n: Manifest.from_json(store.load_manifest(experiment, n)) for n in names}


@contextlib.contextmanager
def experiment_lock(store: ArtifactStore, experiment: str) -> Iterator[None]:
    """One forget request at a time per experiment (a lock file naming the holder's pid)."""
    path = store.forget_lock_path(experiment)
    created = not path.parent.exists()  # a refused request leaves no empty folder behind
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
        if created and not any(path.parent.iterdir()):
            path.parent.rmdir()


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
    affected = {(kind, s["job"]) for s in journal["shards"] for kind in ("adapter", "head")}
    affected |= {("adapter", "paragon")}
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
            if p.get("kind") in SAMPLE_PARENT_KINDS
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
        units = [(shard, job, store.pending_adapter_dir(experiment, job), store.install_adapter)]
        if shard.get("head"):  # the shard's compartmental-router head, retrained alike
            units.append(
                (shard["head"], shard["head"]["job"], store.pending_head_dir(experiment, job),
                 store.install_head)
            )  # fmt: skip
        for record, ckpt_job, staged, install in units:
            if staged.is_dir():
                # after a crash inside the swap, the staged path may hold the OLD one: never put
                # back anything but the checked retrain
                if read_card(staged).get("weights_sha256") == record.get("new_weights_sha256"):
                    install(experiment, job, staged)
                else:
                    shutil.rmtree(staged)
            _install_checkpoints(
                store, experiment, ckpt_job, shard["first_slice"], record.get("new_checkpoints", ()),
                done,
            )  # fmt: skip
        write_forget_journal(store, experiment, journal)
    return set_aside(store, experiment, journal)


def _install_checkpoints(
    store: ArtifactStore, experiment: str, job: str, first_slice: int, new: Iterable[str],
    done: dict,
) -> None:  # fmt: skip
    """Move a retrain's staged checkpoints into place and drop the live ones from ``first_slice``."""
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
    deleted += _drop_checkpoints(ckpts, first_slice, new)


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
