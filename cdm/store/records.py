"""JSON records of an experiment, read and written at their layout paths (data only, no policy).

Manifests, the sources record (shards added by cdm-add-source, removed by cdm-forget
forget.source), forgotten ids, the journal of a forget request in progress, and forget
certificates. What the journal's states mean is ``cdm.lifecycle``'s business; jobs read these
records to build their split (``cdm.jobs.context.split_data``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cdm.store.cards import utc_now
from cdm.store.errors import CorruptArtifactError, MissingArtifactError, StoreError
from cdm.store.io import atomic_write_json, delete_path, read_json
from cdm.store.layout import StoreLayout, visible_dirs

MANIFEST_HINT = "cdm-train experiment={experiment} stage=backbone  (any stage writes the manifests)"

# ---- manifests ---------------------------------------------------------------------------


def save_manifest(
    layout: StoreLayout, experiment: str, manifest_json: Mapping[str, Any], name: str | None = None
) -> Path:
    """Write a manifest atomically; ``name`` defaults to ``manifest_json["name"]``."""
    name = name if name is not None else manifest_json.get("name")
    if name is None:
        raise StoreError("manifest has no 'name' and no name was given")
    path = layout.manifest_path(experiment, name)
    atomic_write_json(path, dict(manifest_json))
    return path


def load_manifest(layout: StoreLayout, experiment: str, name: str) -> dict[str, Any]:
    """Read a manifest; ``MissingArtifactError`` names the command that makes it."""
    path = layout.manifest_path(experiment, name)
    if not path.is_file():
        raise MissingArtifactError(
            f"no manifest {name!r} for experiment {experiment!r} at {path}. Make it with: "
            + MANIFEST_HINT.format(experiment=experiment)
        )
    return read_json(path, "manifest", "make it again")


def list_manifests(layout: StoreLayout, experiment: str) -> list[str]:
    """Names of the manifests of ``experiment``, sorted."""
    directory = layout.manifests_dir(experiment)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json") if not p.name.startswith("."))


def delete_manifest(layout: StoreLayout, experiment: str, name: str) -> bool:
    """Delete a manifest (a forgotten source's shard); False if there was none."""
    return delete_path(layout.manifest_path(experiment, name))


def list_experiments(layout: StoreLayout) -> list[str]:
    """Names of the experiments under the root, sorted."""
    return [p.name for p in visible_dirs(layout.experiments_root())]


# ---- sources -----------------------------------------------------------------------------


def read_sources(layout: StoreLayout, experiment: str) -> dict[str, Any]:
    """``{"added": [...], "removed": [...]}`` (both empty for an experiment never changed)."""
    path = layout.sources_path(experiment)
    if not path.is_file():
        return {"added": [], "removed": []}
    remedy = (
        f"it lists the shards added to and removed from experiment {experiment!r}; restore it "
        "from a backup"
    )
    record = read_json(path, "sources record", remedy)
    try:
        return {"added": list(record["added"]), "removed": list(record["removed"])}
    except (KeyError, TypeError) as exc:
        raise CorruptArtifactError(f"sources record {path} is corrupt ({exc}); {remedy}") from exc


def save_sources(layout: StoreLayout, experiment: str, record: Mapping[str, Any]) -> None:
    """Write the experiment's added/removed sources record atomically."""
    atomic_write_json(layout.sources_path(experiment), dict(record))


# ---- forgotten ids -------------------------------------------------------------------------


def forgotten_ids(layout: StoreLayout, experiment: str) -> list[str]:
    """Sample ids forgotten from ``experiment`` (sorted); every split of it leaves them out."""
    path = layout.forgotten_path(experiment)
    if not path.is_file():
        return []
    record = read_json(path, "forgotten ids", "restore it")
    try:
        return list(record["ids"])
    except (KeyError, TypeError) as exc:
        raise CorruptArtifactError(f"{path} is corrupt ({exc}); restore it") from exc


def all_forgotten_ids(layout: StoreLayout) -> set[str]:
    """Ids forgotten from any experiment of the store: store-wide artifacts such as the domain
    feature nets, which train on a dataset's whole train split, must leave them out too."""
    return {i for exp in list_experiments(layout) for i in forgotten_ids(layout, exp)}


def add_forgotten_ids(
    layout: StoreLayout, experiment: str, ids: Iterable[str], certificate: str
) -> None:
    """Add ``ids`` to the experiment's forgotten ids, atomically (idempotent)."""
    path = layout.forgotten_path(experiment)
    record: dict[str, Any] = {"ids": [], "requests": []}
    if path.is_file():
        record = read_json(path, "forgotten ids", "restore it")
    new = sorted(set(ids) - set(record["ids"]))
    if not new and any(r.get("certificate") == certificate for r in record["requests"]):
        return
    record["ids"] = sorted(set(record["ids"]) | set(new))
    record["requests"].append({"certificate": certificate, "n_ids": len(new), "at": utc_now()})
    atomic_write_json(path, record)


# ---- the journal of a forget request in progress, and certificates -------------------------


def read_forget_journal(layout: StoreLayout, experiment: str) -> dict[str, Any] | None:
    """The journal of the forget request in progress on ``experiment``, or None."""
    path = layout.forget_journal_path(experiment)
    if not path.is_file():
        return None
    return read_json(path, "forget journal", f"finish or undo the request on {experiment!r}")


def write_forget_journal(layout: StoreLayout, experiment: str, journal: Mapping[str, Any]) -> None:
    """Write the journal of the forget request in progress, atomically."""
    atomic_write_json(layout.forget_journal_path(experiment), dict(journal))


def save_certificate(
    layout: StoreLayout, experiment: str, tag: str, certificate: Mapping[str, Any]
) -> Path:
    """Write a forget certificate ``certificates/<tag>.json`` atomically; its path."""
    path = layout.certificate_path(experiment, tag)
    atomic_write_json(path, dict(certificate))
    return path


def list_certificates(layout: StoreLayout, experiment: str) -> list[Path]:
    """The forget certificates of ``experiment``, oldest first."""
    directory = layout.certificate_dir(experiment)
    return sorted(directory.glob("[!.]*.json")) if directory.is_dir() else []
