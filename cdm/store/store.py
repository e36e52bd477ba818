"""The artifact store: the only code in cdm that knows paths.

Layout under ``root``::

    backbones/<backbone_id>/                      diffusers save_pretrained layout + card.json
    experiments/<exp>/manifests/<name>.json       shard manifests (safe, private, shard-00, ...)
    experiments/<exp>/shards/shard-<kk>/          adapter (peft LoRA or diffusers full) + card.json
    experiments/<exp>/<job>/                      other adapters, e.g. paragon/ + card.json
    experiments/<exp>/checkpoints/<job>/          Lightning slice-<ss>.ckpt and last.ckpt
    experiments/<exp>/logs/                       csv / wandb dirs
    experiments/<exp>/forget/                     forgotten.json, pending/ (a forget request
                                                  in progress), quarantine/ (cdm-forget)
    experiments/<exp>/certificates/<time>-<hash>.json   one per forget request

Directory artifacts are written into a hidden temp dir beside the target and moved in with one
atomic rename (an atomic exchange on Linux when replacing), so a reader sees either the old or the
new artifact, never a half-written one. Weights are safetensors only, checked by sha256 on load.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cdm.core.hashing import hash_state_dict, sha256_bytes
from cdm.store.cards import CARD_FILENAME, utc_now

__all__ = [
    "ArtifactStore",
    "BackboneMismatchError",
    "CorruptArtifactError",
    "InvalidNameError",
    "MissingArtifactError",
    "StaleArtifactError",
    "StoreError",
    "atomic_write_bytes",
    "atomic_write_json",
    "format_table",
    "load_checkpoint",
    "read_card",
    "sha256_file",
    "shard_job",
    "validate_name",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER_KINDS = ("lora", "full")
LAST_CKPT = "last.ckpt"
# Directories inside experiments/<exp>/ that are not adapter jobs.
RESERVED_JOBS = frozenset(
    {"manifests", "shards", "checkpoints", "logs", "knn", "samples", "evals", "tables"}
    | {"forget", "certificates"}  # cdm-forget's bookkeeping
)
# list_artifacts: the artifact type of a card under experiments/<exp>/, by its "kind"
ARTIFACT_OF_KIND = {
    "router": "router",
    "knn_centroids": "knn",
    "samples": "samples",
    "evaluation": "evaluation",
}
# Commands named in error messages; kept here so they can follow the CLI.
TRAIN_HINTS = {
    "manifest": "cdm-train experiment={experiment} stage=backbone  (any stage writes the manifests)",
    "backbone": "cdm-train stage=backbone ...  (backbone id '{backbone_id}')",
    "shard": "cdm-train stage=shard shard.index={index} experiment={experiment}",
    "job": "cdm-train stage={job} experiment={experiment}",
}

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*")
_MAX_NAME_LEN = 128
_SHARD_RE = re.compile(r"shard-(\d+)")
_SLICE_RE = re.compile(r"slice-(\d+)\.ckpt")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


class StoreError(ValueError):
    """Base class of every error the store raises about artifacts or names."""


class InvalidNameError(StoreError):
    """A name that could escape its directory or is otherwise not allowed."""


class MissingArtifactError(StoreError):
    """The artifact (or its card) does not exist; the message says which command makes it."""


class CorruptArtifactError(StoreError):
    """The artifact's bytes do not match its card, or cannot be parsed."""


class BackboneMismatchError(StoreError):
    """An adapter was trained on a different backbone than the one it is being loaded onto."""


class StaleArtifactError(StoreError):
    """The artifact was trained on data the experiment no longer holds (e.g. after cdm-forget)."""


# --------------------------------------------------------------------------------------------
# names


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a safe single path component, else raise ``InvalidNameError``.

    Allowed: letters, digits and ``_ . = + -``; must not start with ``.`` or ``-``, contain ``..``
    or be longer than 128 characters.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, got {type(name).__name__}: {name!r}")
    if not name or len(name) > _MAX_NAME_LEN or ".." in name or _NAME_RE.fullmatch(name) is None:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-{_MAX_NAME_LEN} characters from [A-Za-z0-9_.=+-], "
            "not starting with '.' or '-', without path separators or '..'"
        )
    return name


def shard_job(index: int) -> str:
    """Job name of shard ``index``: ``shard_job(3) == "shard-03"``."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidNameError(f"shard index must be a non-negative int, got {index!r}")
    return f"shard-{index:02d}"


def _train_hint(experiment: str, job: str) -> str:
    match = _SHARD_RE.fullmatch(job)
    if match:
        return TRAIN_HINTS["shard"].format(index=int(match.group(1)), experiment=experiment)
    return TRAIN_HINTS["job"].format(job=job, experiment=experiment)


# --------------------------------------------------------------------------------------------
# atomic file writes


def _fsync_dir(path: Path) -> None:
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


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _unique_suffix() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    Creates parent directories. Returns the sha256 hex of ``data``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{_unique_suffix()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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


def _move_into_place(tmp: Path, final: Path) -> None:
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
    # ``_recover`` puts it back.
    old = final.with_name(f"{_OLD_PREFIX}{final.name}-{_unique_suffix()}")
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


def _recover(final: Path) -> None:
    """If an interrupted replace left ``final`` missing, put the set-aside previous version back."""
    if final.exists() or not final.parent.is_dir():
        return
    candidates = []
    for path in final.parent.glob(f"{_OLD_PREFIX}{final.name}-*"):
        pid_text = path.name[len(_OLD_PREFIX) + len(final.name) + 1 :].split("-", 1)[0]
        writer_alive = pid_text.isdigit() and _pid_alive(int(pid_text))
        if path.is_dir() and (path / CARD_FILENAME).is_file() and not writer_alive:
            candidates.append(path)
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        try:
            os.rename(newest, final)
        except OSError:
            pass


def _write_dir_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` in a fresh hidden dir beside ``final``, then move it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}-{_unique_suffix()}")
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


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
        raise CorruptArtifactError(f"card {path} is corrupt (not valid JSON: {exc})") from exc
    if not isinstance(card, dict):
        raise CorruptArtifactError(f"card {path} is corrupt (not a JSON object)")
    return card


def _write_card(directory: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``card.json`` into ``directory``; returns the card as it reads back from disk."""
    path = directory / CARD_FILENAME
    atomic_write_json(path, dict(card))
    return json.loads(path.read_text(encoding="utf-8"))


def _weights_record(directory: Path) -> dict[str, Any]:
    """``weights_file`` + ``weights_sha256`` of the safetensors file(s) in ``directory``.

    One file: the sha256 is a hex string. Several (a sharded save): a dict ``{file: sha256}``.
    """
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise StoreError(f"save_pretrained wrote no .safetensors file into {directory}")
    if len(files) == 1:
        return {"weights_file": files[0], "weights_sha256": sha256_file(directory / files[0])}
    return {
        "weights_file": None,
        "weights_sha256": {name: sha256_file(directory / name) for name in files},
    }


def _verify_weights(directory: Path, card: Mapping[str, Any], remedy: str) -> None:
    """Check every recorded safetensors file against the card's sha256 and that it parses."""
    from safetensors import safe_open

    recorded = card.get("weights_sha256")
    if isinstance(recorded, str):
        name = card.get("weights_file") or DIFFUSERS_WEIGHTS
        expected = {name: recorded}
    elif isinstance(recorded, dict) and recorded:
        expected = dict(recorded)
    else:
        raise CorruptArtifactError(
            f"card {directory / CARD_FILENAME} has no weights_sha256, so the weights cannot be "
            f"checked; the artifact was not written by ArtifactStore. {remedy}"
        )
    for name, sha in expected.items():
        path = directory / validate_name(name, "weights file name")
        if not path.is_file():
            raise CorruptArtifactError(
                f"artifact {directory} is corrupt or incomplete: weights file {path} is missing. "
                f"{remedy}"
            )
        actual = sha256_file(path)
        if actual != sha:
            raise CorruptArtifactError(
                f"weights file {path} is corrupt: sha256 {actual} differs from {sha} recorded in "
                f"its card. {remedy}"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CorruptArtifactError(
                f"weights file {path} is corrupt: safetensors cannot parse it ({exc}). {remedy}"
            ) from exc


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


# --------------------------------------------------------------------------------------------
# listing helpers


def _is_peft_model(model: Any) -> bool:
    """isinstance(model, peft.PeftModel), without importing peft (slow) when nothing has yet."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _visible_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _format_seconds(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}"


def _metrics_summary(metrics: Any, limit: int = 3) -> str:
    """Up to ``limit`` scalar metrics, losses first: ``final_loss=0.0312 steps=500``."""
    if not isinstance(metrics, Mapping):
        return "-"
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, int | float | str)]
    scalars.sort(key=lambda kv: 0 if "loss" in str(kv[0]) else 1)
    parts = [f"{k}={_format_value(v)}" for k, v in scalars[:limit]]
    return " ".join(parts) if parts else "-"


def _prefix(value: Any, n: int = 10) -> str:
    return str(value)[:n] if value else "-"


def format_table(cards: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text table with one row per artifact (as returned by ``list_artifacts``)."""
    header = ("ARTIFACT", "KIND", "NAME", "DATA", "BACKBONE", "METRICS", "WALL", "CREATED")
    rows = []
    for card in cards:
        artifact = card.get("artifact", "-")
        experiment = card.get("experiment")
        if artifact == "adapter":
            name = f"{experiment}/{card.get('job', card.get('name', '?'))}"
        elif artifact == "manifest":
            name = f"{experiment}/manifests/{card.get('name', '?')}"
        else:
            name = str(card.get("backbone_id") or card.get("name", "?"))
        if "error" in card:
            rows.append((artifact, "?", name, "-", "-", f"ERROR: {card['error']}", "-", "-"))
            continue
        data_hash = card.get("manifest_hash")
        kind = str(card.get("kind", "-"))
        adapter_kind = card.get("adapter_kind")
        if adapter_kind and adapter_kind != kind:
            kind = f"{kind}/{adapter_kind}"
        metrics = _metrics_summary(card.get("metrics"))
        if artifact == "manifest" and card.get("n_samples") is not None:
            metrics = f"n_samples={card['n_samples']}"
        rows.append(
            (
                str(artifact),
                kind,
                name,
                _prefix(data_hash),
                _prefix(card.get("backbone_hash")),
                metrics,
                _format_seconds(card.get("wall_time_s")),
                str(card.get("created", "-")),
            )
        )
    if not rows:
        return "(no artifacts)"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the store


class ArtifactStore:
    """Paths, atomic writes and checked loads of every artifact under one root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    # ---- paths ---------------------------------------------------------------------------

    def backbone_dir(self, backbone_id: str) -> Path:
        """``<root>/backbones/<backbone_id>``."""
        return self.root / "backbones" / validate_name(backbone_id, "backbone id")

    def experiment_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>``."""
        return self.root / "experiments" / validate_name(experiment, "experiment name")

    def manifest_path(self, experiment: str, name: str) -> Path:
        """``<root>/experiments/<experiment>/manifests/<name>.json``."""
        return (
            self.experiment_dir(experiment)
            / "manifests"
            / f"{validate_name(name, 'manifest name')}.json"
        )

    def adapter_dir(self, experiment: str, job: str) -> Path:
        """``shards/shard-<kk>`` for ``job="shard-kk"``, else ``<job>/`` (e.g. ``paragon``)."""
        validate_name(job, "job name")
        if _SHARD_RE.fullmatch(job):
            return self.experiment_dir(experiment) / "shards" / job
        if job in RESERVED_JOBS:
            raise InvalidNameError(f"job name {job!r} is reserved ({sorted(RESERVED_JOBS)})")
        return self.experiment_dir(experiment) / job

    def checkpoint_dir(self, experiment: str, job: str) -> Path:
        """``<root>/experiments/<experiment>/checkpoints/<job>`` (Lightning ``dirpath``)."""
        return self.experiment_dir(experiment) / "checkpoints" / validate_name(job, "job name")

    def slice_checkpoint_path(self, experiment: str, job: str, slice_index: int) -> Path:
        """Checkpoint written after SISA slice ``slice_index``: ``.../slice-<ss>.ckpt``."""
        if isinstance(slice_index, bool) or not isinstance(slice_index, int) or slice_index < 0:
            raise InvalidNameError(f"slice index must be a non-negative int, got {slice_index!r}")
        return self.checkpoint_dir(experiment, job) / f"slice-{slice_index:02d}.ckpt"

    def last_checkpoint_path(self, experiment: str, job: str) -> Path:
        """``.../checkpoints/<job>/last.ckpt``."""
        return self.checkpoint_dir(experiment, job) / LAST_CKPT

    def log_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/logs`` (not created here)."""
        return self.experiment_dir(experiment) / "logs"

    # ---- manifests -----------------------------------------------------------------------

    def save_manifest(
        self, experiment: str, manifest_json: Mapping[str, Any], name: str | None = None
    ) -> Path:
        """Write a manifest atomically; ``name`` defaults to ``manifest_json["name"]``."""
        name = name if name is not None else manifest_json.get("name")
        if name is None:
            raise StoreError("manifest has no 'name' and no name was given")
        path = self.manifest_path(experiment, name)
        atomic_write_json(path, dict(manifest_json))
        return path

    def load_manifest(self, experiment: str, name: str) -> dict[str, Any]:
        """Read a manifest; ``MissingArtifactError`` names the command that makes it."""
        path = self.manifest_path(experiment, name)
        if not path.is_file():
            hint = TRAIN_HINTS["manifest"].format(experiment=experiment)
            raise MissingArtifactError(
                f"no manifest {name!r} for experiment {experiment!r} at {path}. Make it with: {hint}"
            )
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptArtifactError(f"manifest {path} is corrupt: {exc}") from exc

    def list_manifests(self, experiment: str) -> list[str]:
        """Names of the manifests of ``experiment``, sorted."""
        directory = self.experiment_dir(experiment) / "manifests"
        if not directory.is_dir():
            return []
        return sorted(p.stem for p in directory.glob("*.json") if not p.name.startswith("."))

    def list_experiments(self) -> list[str]:
        """Names of the experiments under the root, sorted."""
        return [p.name for p in _visible_dirs(self.root / "experiments")]

    # ---- backbones -----------------------------------------------------------------------

    def save_backbone(self, backbone_id: str, unet: Any, card: Mapping[str, Any]) -> dict[str, Any]:
        """Save a diffusers model (``save_pretrained``, safetensors) + card; returns the written card.

        The card gains ``kind="backbone"``, ``name`` (default ``backbone_id``), ``weights_file``,
        ``weights_sha256``, ``backbone_hash = hash_state_dict(unet.state_dict())`` and ``created``.
        """
        final = self.backbone_dir(backbone_id)
        written: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            unet.save_pretrained(str(tmp), safe_serialization=True)
            full = dict(card)
            full["kind"] = "backbone"
            full.setdefault("name", backbone_id)
            full.setdefault("created", utc_now())
            full.update(_weights_record(tmp))
            full["backbone_hash"] = hash_state_dict(unet.state_dict())
            written.update(_write_card(tmp, full))

        _write_dir_atomically(final, write)
        return written

    def load_backbone(
        self,
        backbone_id: str,
        cls: Any = None,
        *,
        verify_state_hash: bool = False,
        **from_pretrained_kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """Load a saved backbone (default ``cls`` = ``diffusers.UNet2DModel``) -> ``(unet, card)``.

        The weights' sha256 is checked against the card first. With ``verify_state_hash`` the
        loaded state dict is also re-hashed and compared with ``card["backbone_hash"]`` (only
        meaningful when loaded in the dtype it was saved in).
        """
        directory = self.backbone_dir(backbone_id)
        _recover(directory)
        remedy = (
            f"Retrain it with `{TRAIN_HINTS['backbone'].format(backbone_id=backbone_id)}` "
            f"or restore {directory} from a backup."
        )
        if not (directory / CARD_FILENAME).is_file():
            raise MissingArtifactError(f"no backbone {backbone_id!r} at {directory}. {remedy}")
        card = read_card(directory)
        _verify_weights(directory, card, remedy)
        if cls is None:
            from diffusers import UNet2DModel

            cls = UNet2DModel
        from_pretrained_kwargs.setdefault("local_files_only", True)
        unet = cls.from_pretrained(str(directory), **from_pretrained_kwargs)
        if verify_state_hash:
            actual = hash_state_dict(unet.state_dict())
            if actual != card.get("backbone_hash"):
                raise CorruptArtifactError(
                    f"backbone {directory} is corrupt: state hash {actual} differs from "
                    f"{card.get('backbone_hash')} in its card. {remedy}"
                )
        return unet, card

    def has_backbone(self, backbone_id: str) -> bool:
        """True if a backbone card exists for ``backbone_id``."""
        return (self.backbone_dir(backbone_id) / CARD_FILENAME).is_file()

    # ---- adapters ------------------------------------------------------------------------

    def save_adapter(
        self,
        experiment: str,
        job: str,
        model: Any,
        card: Mapping[str, Any],
        kind: str = "lora",
        *,
        adapter_name: str | None = None,
        directory: str | Path | None = None,
    ) -> dict[str, Any]:
        """Save a shard/paragon adapter + card atomically; returns the written card.

        ``kind="lora"``: ``model`` is a ``peft.PeftModel``; the adapter ``adapter_name`` (default:
        the active one) is written in the standard peft layout (``adapter_model.safetensors`` +
        ``adapter_config.json``) at the top of the dir. ``kind="full"``: a plain diffusers model,
        diffusers ``save_pretrained`` layout. ``card`` must carry ``backbone_hash``; it gains
        ``adapter_kind`` (= ``kind``), ``kind`` (unless the card has one, e.g. "shard"), ``job``,
        ``experiment``, ``name`` (default ``job``), ``weights_file``, ``weights_sha256`` and
        ``created``. An existing artifact is replaced atomically. ``directory`` writes it
        elsewhere than ``adapter_dir`` (cdm-forget stages a retrained adapter there first).
        """
        if kind not in ADAPTER_KINDS:
            raise StoreError(f"adapter kind must be one of {ADAPTER_KINDS}, got {kind!r}")
        if not card.get("backbone_hash"):
            raise StoreError(
                f"card for {experiment}/{job} has no backbone_hash: pass the backbone card's "
                "backbone_hash so the adapter can be checked against its backbone on load"
            )
        final = Path(directory) if directory is not None else self.adapter_dir(experiment, job)
        if kind == "lora":
            if not _is_peft_model(model):
                raise StoreError(f"kind='lora' needs a peft.PeftModel, got {type(model).__name__}")
            name = adapter_name or model.active_adapter
            if name not in model.peft_config:
                raise StoreError(f"adapter {name!r} not in model (has {list(model.peft_config)})")
        elif _is_peft_model(model):
            raise StoreError("kind='full' needs a plain diffusers model, got a peft.PeftModel")
        written: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            if kind == "lora":
                model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
                if name != "default":  # peft writes non-default adapters into a subdir
                    for item in (tmp / name).iterdir():
                        os.replace(item, tmp / item.name)
                    (tmp / name).rmdir()
            else:
                model.save_pretrained(str(tmp), safe_serialization=True)
            full = dict(card)
            full.setdefault("kind", kind)  # the caller's kind (e.g. "shard") is kept
            full.update(adapter_kind=kind, job=job, experiment=experiment)
            full.setdefault("name", job)
            full.setdefault("created", utc_now())
            full.update(_weights_record(tmp))
            written.update(_write_card(tmp, full))

        _write_dir_atomically(final, write)
        return written

    def install_adapter(self, experiment: str, job: str, staged: str | Path) -> dict[str, Any]:
        """Move an adapter staged by ``save_adapter(directory=...)`` into its place, atomically,
        after checking its weights against its card; the previous one is deleted. Its card."""
        staged = Path(staged)
        card = read_card(staged)
        _verify_weights(staged, card, f"The staged adapter {staged} is corrupt; train it again.")
        final = self.adapter_dir(experiment, job)
        final.parent.mkdir(parents=True, exist_ok=True)
        _fsync_tree(staged)
        _move_into_place(staged, final)
        _fsync_dir(final.parent)
        return card

    def checked_adapter(
        self, experiment: str, job: str, *, backbone_hash: str
    ) -> tuple[Path, dict[str, Any]]:
        """``(directory, card)`` of an adapter whose weights match its card and ``backbone_hash``.

        Raises ``MissingArtifactError``, ``CorruptArtifactError`` or ``BackboneMismatchError``
        with the command that (re)makes it. Loads nothing.
        """
        directory = self.adapter_dir(experiment, job)
        _recover(directory)
        hint = _train_hint(experiment, job)
        if not (directory / CARD_FILENAME).is_file():
            raise MissingArtifactError(
                f"no adapter {job!r} for experiment {experiment!r} at {directory}. "
                f"Make it with: {hint}"
            )
        card = read_card(directory)
        stale = self.stale_reason(experiment, card)
        if stale:
            raise StaleArtifactError(
                f"adapter {experiment}/{job} is stale: it was trained on data the experiment no "
                f"longer holds ({stale}; see {self.certificate_dir(experiment)}). Retrain it with "
                f"`{hint} retrain=true`."
            )
        remedy = f"Retrain it with `{hint}` or restore {directory} from a backup."
        _verify_weights(directory, card, remedy)
        trained_on = card.get("backbone_hash")
        if trained_on != backbone_hash:
            raise BackboneMismatchError(
                f"adapter {experiment}/{job} was trained on another backbone: its card has "
                f"backbone_hash {trained_on}, but the backbone given has {backbone_hash}. "
                f"Load the backbone it was trained on, or retrain it with `{hint}`."
            )
        return directory, card

    def load_adapter(
        self,
        experiment: str,
        job: str,
        base_unet: Any,
        *,
        backbone_hash: str,
        adapter_name: str | None = None,
        is_trainable: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Load a checked adapter -> ``(model, card)``.

        Refuses (``StoreError`` subclasses) if the artifact is missing, its weights are corrupt,
        or ``card["backbone_hash"] != backbone_hash``. LoRA: ``PeftModel.from_pretrained(base_unet,
        dir, adapter_name=adapter_name or "default")`` (``base_unet`` gets LoRA layers injected);
        if ``base_unet`` already is a PeftModel the adapter is added to it under ``adapter_name``
        (default: the job name) and it is returned. Full: ``type(base_unet).from_pretrained(dir)``
        (``UNet2DModel`` if ``base_unet`` is None).
        """
        directory, card = self.checked_adapter(experiment, job, backbone_hash=backbone_hash)
        kind = card.get("adapter_kind", card.get("kind"))
        if kind == "lora":
            from peft import PeftModel

            if _is_peft_model(base_unet):
                name = adapter_name or job
                base_unet.load_adapter(str(directory), adapter_name=name, is_trainable=is_trainable)
                return base_unet, card
            model = PeftModel.from_pretrained(
                base_unet,
                str(directory),
                adapter_name=adapter_name or "default",
                is_trainable=is_trainable,
            )
            return model, card
        if kind == "full":
            if (
                base_unet is None
                or _is_peft_model(base_unet)
                or not hasattr(type(base_unet), "from_pretrained")
            ):
                from diffusers import UNet2DModel

                cls: Any = UNet2DModel
            else:
                cls = type(base_unet)
            return cls.from_pretrained(str(directory), local_files_only=True), card
        raise CorruptArtifactError(
            f"card {directory / CARD_FILENAME} has unknown adapter_kind {kind!r} (expected one of "
            f"{ADAPTER_KINDS}). Retrain it with `{_train_hint(experiment, job)}`."
        )

    def has_adapter(self, experiment: str, job: str) -> bool:
        """True if an adapter card exists for ``experiment``/``job``."""
        return (self.adapter_dir(experiment, job) / CARD_FILENAME).is_file()

    def read_adapter_card(self, experiment: str, job: str) -> dict[str, Any]:
        """The card of an adapter, without loading or checking its weights."""
        return read_card(self.adapter_dir(experiment, job))

    # ---- routers -------------------------------------------------------------------------

    ROUTER_WEIGHTS = "router.safetensors"
    ROUTER_CONFIG = "router_config.json"

    def router_dir(self, experiment: str, name: str = "router") -> Path:
        """``<root>/experiments/<experiment>/<name>`` (a router: weights, config, card)."""
        validate_name(name, "router name")
        if _SHARD_RE.fullmatch(name) or name in RESERVED_JOBS or name == "paragon":
            raise InvalidNameError(
                f"router name {name!r} is taken by another kind of artifact (shard-KK, paragon, "
                f"{sorted(RESERVED_JOBS)}); use e.g. 'router' or 'router-small'"
            )
        return self.experiment_dir(experiment) / name

    def save_router(
        self,
        experiment: str,
        model_state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
        card: Mapping[str, Any],
        *,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Save a router atomically: ``router.safetensors`` + ``router_config.json`` + card.

        ``model_state`` holds the router's own weights only (never the backbone's); ``config``
        is what rebuilds its architecture. ``name`` defaults to ``card["name"]`` or "router".
        ``card`` must carry ``backbone_hash``; it gains ``kind`` (default "router"), ``name``,
        ``experiment``, ``created``, ``weights_file``, ``weights_sha256`` and
        ``router_config_sha256``. Returns the written card.
        """
        from safetensors.torch import save_file

        name = name or card.get("name") or "router"
        final = self.router_dir(experiment, name)
        if not card.get("backbone_hash"):
            raise StoreError(
                f"card for router {experiment}/{name} has no backbone_hash: a router is trained "
                "on the backbone's noise schedule (and maybe its features); pass its hash"
            )
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
        if not tensors:
            raise StoreError(f"router {experiment}/{name}: the state dict is empty")
        written: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / self.ROUTER_WEIGHTS), metadata={"format": "pt"})
            config_sha = atomic_write_json(tmp / self.ROUTER_CONFIG, dict(config))
            full = dict(card)
            full.setdefault("kind", "router")
            full.update(name=name, experiment=experiment, router_config_sha256=config_sha)
            full.setdefault("created", utc_now())
            full.update(_weights_record(tmp))
            written.update(_write_card(tmp, full))

        _write_dir_atomically(final, write)
        return written

    def load_router(
        self, experiment: str, name: str = "router", *, backbone_hash: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """Load a checked router -> ``(state_dict, config, card)``.

        Refuses (``StoreError`` subclasses) a missing router, weights or config whose sha256
        differs from the card, and, when ``backbone_hash`` is given, a router trained on
        another backbone.
        """
        from safetensors.torch import load_file

        directory = self.router_dir(experiment, name)
        _recover(directory)
        hint = f"cdm-train stage=router router.name={name} experiment={experiment}"
        if not (directory / CARD_FILENAME).is_file():
            raise MissingArtifactError(
                f"no router {name!r} for experiment {experiment!r} at {directory}. "
                f"Make it with: {hint}"
            )
        card = read_card(directory)
        stale = self.stale_reason(experiment, card)
        if stale:
            raise StaleArtifactError(
                f"router {experiment}/{name} is stale: it was trained on shard data the experiment "
                f"no longer holds ({stale}; see {self.certificate_dir(experiment)}). Retrain it "
                f"with `{hint} retrain=true`."
            )
        remedy = f"Retrain it with `{hint} retrain=true` or restore {directory} from a backup."
        _verify_weights(directory, card, remedy)
        config_path = directory / self.ROUTER_CONFIG
        if not config_path.is_file():
            raise CorruptArtifactError(f"router {directory} has no {self.ROUTER_CONFIG}. {remedy}")
        if sha256_file(config_path) != card.get("router_config_sha256"):
            raise CorruptArtifactError(
                f"router config {config_path} is corrupt: its sha256 differs from the card's "
                f"router_config_sha256. {remedy}"
            )
        trained_on = card.get("backbone_hash")
        if backbone_hash is not None and trained_on != backbone_hash:
            raise BackboneMismatchError(
                f"router {experiment}/{name} was trained on another backbone: its card has "
                f"backbone_hash {trained_on}, but the backbone given has {backbone_hash}. "
                f"Load the backbone it was trained on, or retrain it with `{hint} retrain=true`."
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        state = load_file(str(directory / card["weights_file"]))
        return state, config, card

    def has_router(self, experiment: str, name: str = "router") -> bool:
        """True if a router card exists for ``experiment``/``name``."""
        return (self.router_dir(experiment, name) / CARD_FILENAME).is_file()

    # ---- checkpoints ---------------------------------------------------------------------

    def list_slice_checkpoints(self, experiment: str, job: str) -> dict[int, Path]:
        """``{slice_index: path}`` of the ``slice-<ss>.ckpt`` files of a job."""
        directory = self.checkpoint_dir(experiment, job)
        if not directory.is_dir():
            return {}
        found = {}
        for path in directory.iterdir():
            match = _SLICE_RE.fullmatch(path.name)
            if match and path.is_file():
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """See module-level ``load_checkpoint``."""
        return load_checkpoint(path)

    def clear_checkpoints(self, experiment: str, job: str) -> bool:
        """Delete the checkpoint dir of a job (before retraining it); True if there was one."""
        directory = self.checkpoint_dir(experiment, job)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        return True

    # ---- forgetting (cdm-forget; SISA, paper App. B) ---------------------------------------

    def forget_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/forget``: forgotten ids, pending request, quarantine."""
        return self.experiment_dir(experiment) / "forget"

    def forget_pending_dir(self, experiment: str) -> Path:
        """``.../forget/pending``: the staged retrain and journal of a forget request in progress."""
        return self.forget_dir(experiment) / "pending"

    def pending_forget(self, experiment: str) -> dict[str, Any] | None:
        """The journal of the forget request in progress on ``experiment``, or None."""
        path = self.forget_pending_dir(experiment) / "journal.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptArtifactError(f"forget journal {path} is corrupt ({exc})") from exc

    def save_forget_journal(self, experiment: str, journal: Mapping[str, Any]) -> None:
        """Write the journal of the forget request in progress, atomically."""
        atomic_write_json(self.forget_pending_dir(experiment) / "journal.json", dict(journal))

    def quarantine_dir(self, experiment: str, tag: str) -> Path:
        """``.../forget/quarantine/<tag>``: derived artifacts set aside by one forget request."""
        return self.forget_dir(experiment) / "quarantine" / validate_name(tag, "quarantine tag")

    def forgotten_ids(self, experiment: str) -> list[str]:
        """Sample ids forgotten from ``experiment`` (sorted); every split of it leaves them out."""
        path = self.forget_dir(experiment) / "forgotten.json"
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text(encoding="utf-8"))["ids"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"{path} is corrupt ({exc}); restore it") from exc

    def all_forgotten_ids(self) -> set[str]:
        """Ids forgotten from any experiment of the store: store-wide artifacts such as the domain
        feature nets, which train on a dataset's whole train split, must leave them out too."""
        return {i for exp in self.list_experiments() for i in self.forgotten_ids(exp)}

    def add_forgotten_ids(self, experiment: str, ids: Iterable[str], certificate: str) -> None:
        """Add ``ids`` to the experiment's forgotten ids, atomically (idempotent)."""
        path = self.forget_dir(experiment) / "forgotten.json"
        record: dict[str, Any] = {"ids": [], "requests": []}
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
        new = sorted(set(ids) - set(record["ids"]))
        if not new and any(r.get("certificate") == certificate for r in record["requests"]):
            return
        record["ids"] = sorted(set(record["ids"]) | set(new))
        record["requests"].append({"certificate": certificate, "n_ids": len(new), "at": utc_now()})
        atomic_write_json(path, record)

    # ---- sources: shards added (cdm-add-source) and removed (cdm-forget forget.shard) --------

    def sources_path(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/sources.json``: shards added to or removed from the
        split the config makes (``cdm.jobs.context.split_data`` applies it)."""
        return self.experiment_dir(experiment) / "sources.json"

    def read_sources(self, experiment: str) -> dict[str, Any]:
        """``{"added": [...], "removed": [...]}`` (both empty for an experiment never changed)."""
        path = self.sources_path(experiment)
        if not path.is_file():
            return {"added": [], "removed": []}
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return {"added": list(record["added"]), "removed": list(record["removed"])}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(
                f"{path} is corrupt ({exc}): it lists the shards added to and removed from "
                f"experiment {experiment!r}; restore it from a backup"
            ) from exc

    def save_sources(self, experiment: str, record: Mapping[str, Any]) -> None:
        """Write the experiment's added/removed sources record atomically."""
        atomic_write_json(self.sources_path(experiment), dict(record))

    def source_data_path(self, experiment: str, source: str) -> Path:
        """``.../sources/<source>.npz``: the store's own copy of an added source's samples."""
        return (
            self.experiment_dir(experiment)
            / "sources"
            / f"{validate_name(source, 'source name')}.npz"
        )

    def delete_manifest(self, experiment: str, name: str) -> bool:
        """Delete a manifest (a forgotten source's shard); False if there was none."""
        path = self.manifest_path(experiment, name)
        if not path.is_file():
            return False
        path.unlink()
        _fsync_dir(path.parent)
        return True

    def delete_adapter(self, experiment: str, job: str) -> bool:
        """Delete an adapter's folder (weights and card); False if there was none."""
        directory = self.adapter_dir(experiment, job)
        if not directory.exists():
            return False
        shutil.rmtree(directory)
        _fsync_dir(directory.parent)
        return True

    def certificate_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>/certificates``."""
        return self.experiment_dir(experiment) / "certificates"

    def save_certificate(self, experiment: str, name: str, certificate: Mapping[str, Any]) -> Path:
        """Write a forget certificate ``certificates/<name>.json`` atomically; its path."""
        path = self.certificate_dir(experiment) / f"{validate_name(name, 'certificate name')}.json"
        atomic_write_json(path, dict(certificate))
        return path

    def list_certificates(self, experiment: str) -> list[Path]:
        """The forget certificates of ``experiment``, oldest first."""
        directory = self.certificate_dir(experiment)
        return sorted(directory.glob("[!.]*.json")) if directory.is_dir() else []

    def stale_reason(self, experiment: str, card: Mapping[str, Any]) -> str | None:
        """Why ``card``'s artifact no longer matches the experiment's manifests, or None.

        An adapter names the manifest it was fed (``manifest_name``/``manifest_hash``), a router
        every shard manifest (``shard_manifests``); after cdm-forget rewrites a manifest, every
        artifact trained on its old version (e.g. the paragon) is stale until retrained.
        """
        trained = []
        if card.get("manifest_name") and card.get("manifest_hash"):
            trained.append((card["manifest_name"], card["manifest_hash"]))
        trained += [(m.get("name"), m.get("hash")) for m in card.get("shard_manifests") or []]
        removed = {r.get("job") for r in self.read_sources(experiment)["removed"]}
        if card.get("shard_manifests"):  # a router covers exactly the experiment's shards
            have = {n for n in self.list_manifests(experiment) if _SHARD_RE.fullmatch(n)}
            new = sorted(have - {m.get("name") for m in card["shard_manifests"]})
            if new:
                return f"shards {new} were added after it was trained (cdm-add-source)"
        for name, old in trained:
            if name in removed:
                return f"source {name} was forgotten (cdm-forget forget.shard); its data is gone"
            if not name or not self.manifest_path(experiment, name).is_file():
                continue
            now = self.load_manifest(experiment, name).get("hash")
            if now != old:
                return f"manifest {name} was {str(old)[:12]} when trained, is {str(now)[:12]} now"
        return None

    # ---- listing -------------------------------------------------------------------------

    def _entry(self, artifact: str, directory: Path, **extra: Any) -> dict[str, Any]:
        try:
            entry: dict[str, Any] = read_card(directory)
        except StoreError as exc:
            entry = {"error": str(exc)}
        entry.update(artifact=artifact, path=str(directory), **extra)
        return entry

    def list_artifacts(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """Every backbone, manifest and adapter card under the root (or of one experiment).

        Each entry is the card plus ``artifact`` ("backbone" | "manifest" | "adapter"), ``path``
        and ``experiment`` (None for backbones), plus ``job`` for adapters and ``backbone_id`` for
        backbones. Hidden temp dirs are skipped; an unreadable card gives an entry with ``error``.
        Sorted by (experiment, artifact, name).
        """
        entries: list[dict[str, Any]] = []
        if experiment is None:
            for directory in _visible_dirs(self.root / "backbones"):
                if (directory / CARD_FILENAME).is_file():
                    entries.append(
                        self._entry(
                            "backbone", directory, experiment=None, backbone_id=directory.name
                        )
                    )
            experiments = self.list_experiments()
            from cdm.store.feature_nets import list_feature_nets  # lazy: it imports this module

            entries += list_feature_nets(self)
        else:
            experiments = [validate_name(experiment, "experiment name")]
        for exp in experiments:
            exp_dir = self.experiment_dir(exp)
            for name in self.list_manifests(exp):
                path = self.manifest_path(exp, name)
                entry: dict[str, Any] = {"kind": "manifest", "name": name}
                try:
                    manifest = self.load_manifest(exp, name)
                    for key in ("manifest_hash", "hash"):
                        if manifest.get(key):
                            entry["manifest_hash"] = manifest[key]
                            break
                    ids = manifest.get("ids")
                    entry["n_samples"] = manifest.get("n_samples", len(ids) if ids else None)
                    if "created" in manifest:
                        entry["created"] = manifest["created"]
                except StoreError as exc:
                    entry["error"] = str(exc)
                entry.update(artifact="manifest", path=str(path), experiment=exp)
                entries.append(entry)
            # adapters, routers, k-NN centroids, samples: any card outside manifests/checkpoints/logs
            for card_path in sorted(exp_dir.rglob(CARD_FILENAME)):
                parts = card_path.relative_to(exp_dir).parts
                if parts[0] in {"manifests", "checkpoints", "logs", "forget"} or any(
                    p.startswith((_TMP_PREFIX, _OLD_PREFIX)) for p in parts
                ):
                    continue
                directory = card_path.parent
                entry = self._entry("adapter", directory, experiment=exp, job=directory.name)
                entry["artifact"] = ARTIFACT_OF_KIND.get(entry.get("kind"), "adapter")
                entries.append(entry)
        order = {"backbone": 0, "manifest": 1, "adapter": 2, "router": 3, "knn": 4, "samples": 5,
                 "evaluation": 6, "feature_net": 7}  # fmt: skip
        entries.sort(
            key=lambda e: (
                e.get("experiment") or "",
                order.get(e["artifact"], 9),
                str(e.get("job") or e.get("backbone_id") or e.get("name") or ""),
                e["path"],
            )
        )
        return entries

    def clean_temp(self, max_age_s: float = 3600.0) -> list[Path]:
        """Remove hidden temp dirs/files older than ``max_age_s`` left by crashed writers.

        Set-aside previous versions (``.old-*``) are first put back where the artifact is missing.
        Returns the removed paths.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        now = time.time()
        for dirpath, dirnames, filenames in os.walk(self.root):
            base = Path(dirpath)
            for name in list(dirnames) + filenames:
                if not name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                    continue
                path = base / name
                if name.startswith(_OLD_PREFIX):  # ".old-<name>-<pid>-<uuid>"
                    _recover(base / name[len(_OLD_PREFIX) :].rsplit("-", 2)[0])
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
