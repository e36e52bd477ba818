"""Atomic writes and checked reads of files and artifact directories.

Directory artifacts are written into a hidden temp dir beside the target and moved in with one
atomic rename (an atomic exchange on Linux when replacing), so a reader sees either the old or the
new artifact, never a half-written one. A crash between the two renames of the portable fallback
leaves the previous version under ``.old-<name>-<pid>-<uuid>``; ``recover`` puts it back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cdm.core.hashing import sha256_bytes
from cdm.store.cards import CARD_FILENAME
from cdm.store.errors import CorruptArtifactError, MissingArtifactError, StoreError
from cdm.store.layout import OLD_PREFIX, TMP_PREFIX

# atomic file writes


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames inside it are durable (best effort; not on every OS)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))


def _unique_suffix() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    Creates parent directories. Returns the sha256 hex of ``data``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{_unique_suffix()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha256_bytes(data)


def _json_default(obj: Any) -> Any:
    """Make common non-JSON values (paths, tensors, numpy, configs, sets) serialisable."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Mapping):  # e.g. omegaconf DictConfig
        return dict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):  # e.g. ListConfig
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def atomic_write_json(path: str | Path, obj: Any) -> str:
    """Write ``obj`` as indented JSON to ``path`` atomically. Returns the sha256 hex of the bytes."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex of a file, streamed; equals ``sha256_bytes(Path(path).read_bytes())``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# atomic directory writes

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc_renameat2: Any = None


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the OS or file system does not support it.
    """
    global _libc_renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _libc_renameat2 is None:
        try:
            func = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _libc_renameat2 = False
            return False
        func.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        func.restype = ctypes.c_int
        _libc_renameat2 = func
    if _libc_renameat2 is False:
        return False
    result = _libc_renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2 exchange failed: {os.strerror(err)}", str(a), str(b))


def move_into_place(tmp: Path, final: Path) -> None:
    """Make ``tmp`` become ``final``; the previous ``final`` (if any) is kept until then."""
    if not final.exists():
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:  # another writer created ``final`` meanwhile: replace it below
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _renameat2_exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the previous artifact
        return
    # Portable fallback: set the old one aside, move the new one in, then delete the old one.
    # A crash between the two renames leaves the old one under ``.old-<name>-<pid>-<uuid>``;
    # ``recover`` puts it back.
    old = final.with_name(f"{OLD_PREFIX}{final.name}-{_unique_suffix()}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def recover(final: Path) -> None:
    """If an interrupted replace left ``final`` missing, put the set-aside previous version back."""
    if final.exists() or not final.parent.is_dir():
        return
    candidates = []
    for path in final.parent.glob(f"{OLD_PREFIX}{final.name}-*"):
        pid_text = path.name[len(OLD_PREFIX) + len(final.name) + 1 :].split("-", 1)[0]
        writer_alive = pid_text.isdigit() and _pid_alive(int(pid_text))
        if path.is_dir() and (path / CARD_FILENAME).is_file() and not writer_alive:
            candidates.append(path)
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        try:
            os.rename(newest, final)
        except OSError:
            pass


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` in a fresh hidden dir beside ``final``, then move it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{_unique_suffix()}")
    tmp.mkdir()
    try:
        write(tmp)
        fsync_tree(tmp)
        move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


# --------------------------------------------------------------------------------------------
# cards and weights


def read_card(path_or_dir: str | Path) -> dict[str, Any]:
    """Read a card: ``path_or_dir`` is a ``card.json`` file or an artifact directory holding one."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / CARD_FILENAME
    if not path.is_file():
        raise MissingArtifactError(f"no card at {path}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(
            f"card {path} is corrupt (not valid JSON: {exc}); run the command that made it again "
            "with retrain=true, or restore it from a backup"
        ) from exc
    if not isinstance(card, dict):
        raise CorruptArtifactError(
            f"card {path} is corrupt (not a JSON object); run the command that made it again "
            "with retrain=true, or restore it from a backup"
        )
    return card


def write_card(directory: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``card.json`` into ``directory``; returns the card as it reads back from disk."""
    path = directory / CARD_FILENAME
    atomic_write_json(path, dict(card))
    return json.loads(path.read_text(encoding="utf-8"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on CPU with ``torch.load(..., weights_only=True)`` (no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StoreError(
            f"checkpoint {path} holds objects that weights_only loading refuses ({exc}); save "
            "hyper-parameters as plain containers (e.g. OmegaConf.to_container) so checkpoints "
            "stay loadable without running pickle code"
        ) from exc
    except (RuntimeError, EOFError) as exc:
        raise CorruptArtifactError(f"checkpoint {path} is corrupt: {exc}") from exc


def read_json(path: Path, what: str, remedy: str = "restore it from a backup") -> Any:
    """Parse the JSON file ``path``; ``CorruptArtifactError`` naming ``what`` if it cannot be."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifactError(f"{what} {path} is corrupt ({exc}); {remedy}") from exc


def install_dir(staged: Path, final: Path) -> None:
    """Move a fully written directory ``staged`` to ``final`` atomically, replacing any previous."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(staged)
    move_into_place(staged, final)
    fsync_dir(final.parent)


def delete_path(path: Path) -> bool:
    """Delete a file or a directory tree durably; False if there was nothing at ``path``."""
    if not path.exists():
        return False
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    fsync_dir(path.parent)
    return True


def clean_temp(root: Path, max_age_s: float = 3600.0) -> list[Path]:
    """Remove hidden temp dirs/files under ``root`` older than ``max_age_s`` (crashed writers).

    Set-aside previous versions (``.old-*``) are first put back where the artifact is missing.
    Returns the removed paths.
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in list(dirnames) + filenames:
            if not name.startswith((TMP_PREFIX, OLD_PREFIX)):
                continue
            path = base / name
            if name.startswith(OLD_PREFIX):  # ".old-<name>-<pid>-<uuid>"
                recover(base / name[len(OLD_PREFIX) :].rsplit("-", 2)[0])
                if not path.exists():
                    continue
            try:
                if now - path.stat().st_mtime < max_age_s:
                    continue
            except FileNotFoundError:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return removed


def rotated_logs(path: Path) -> list[Path]:
    """The rotated parts of the JSON-lines log ``path`` (``serve.jsonl.000001``, ...), oldest first."""
    if not path.parent.is_dir():
        return []
    parts = [p for p in path.parent.iterdir() if re.fullmatch(re.escape(path.name) + r"\.\d{6}", p.name)]  # fmt: skip
    return sorted(parts)


def append_json_line(path: Path, record: dict[str, Any], max_bytes: int | None = None) -> None:
    """Append one JSON line to ``path`` and fsync it; earlier lines are never rewritten (the
    service's audit log, an attribution run's measured models).

    Writers (threads or processes) take an exclusive ``flock`` on ``<path>.lock``. With
    ``max_bytes``, a log that would grow past it is first renamed to the next numbered part
    (``serve.jsonl.000001``, ...); parts are never deleted, so rotation loses no line.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode("utf-8")
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        size = path.stat().st_size if path.exists() else 0
        if max_bytes is not None and size > 0 and size + len(line) > max_bytes:
            parts = rotated_logs(path)
            number = int(parts[-1].name.rsplit(".", 1)[1]) + 1 if parts else 1
            os.rename(path, path.with_name(f"{path.name}.{number:06d}"))
            fsync_dir(path.parent)
        with open(path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_json_lines(path: Path) -> list[dict]:
    """Every record of ``path``, its rotated parts first (oldest to newest)."""
    files = [*rotated_logs(path), *([path] if path.exists() else [])]
    return [json.loads(line) for f in files for line in f.read_text("utf-8").splitlines()]
