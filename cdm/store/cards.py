"""Artifact cards: the JSON record of what data, parents, config, code and cost made an artifact."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cdm

CARD_FILENAME = "card.json"


def utc_now() -> str:
    """Current time as an ISO-8601 UTC string with seconds precision, e.g. ``2026-11-22T12:00:00Z``."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _git(args: list[str], cwd: Path) -> str | None:
    """Output of ``git <args>`` run in ``cwd``, or None if git is missing or the command fails."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _package_version() -> str | None:
    """``cdm.__version__`` if set, else the installed distribution's version, else None."""
    version = getattr(cdm, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("cdm")
    except (ImportError, PackageNotFoundError):
        return None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the repo that holds the ``cdm`` package, else the package version, else "unknown".

    The commit is only used if the package's own files are tracked by that repo (so a non-editable
    install inside some unrelated checkout does not report that checkout's commit). Never raises.
    """
    package_dir = Path(cdm.__file__).resolve().parent
    if _git(["ls-files", "--error-unmatch", "__init__.py"], package_dir) is not None:
        commit = _git(["rev-parse", "HEAD"], package_dir)
        if commit:
            return commit
    return _package_version() or "unknown"


def make_card(**fields: Any) -> dict[str, Any]:
    """A card dict: ``fields`` plus ``created`` (UTC ISO), ``code_version``, ``host``, ``torch``, ``python``.

    Explicit ``fields`` win over the automatic ones. Expected fields (the store does not invent them):
    kind, name, shard, manifest_hash, backbone_hash, parents (list of {kind, name, hash}), config,
    metrics, wall_time_s, device, wandb_run_id.
    """
    import torch

    card: dict[str, Any] = {
        "created": utc_now(),
        "code_version": code_version(),
        "host": socket.gethostname(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    card.update(fields)
    return card
