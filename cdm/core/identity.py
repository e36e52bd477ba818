"""One identity per job: the settings that change its result, as named sections, and their hash.

``job_identity(config, stage)`` takes a resolved config (plain dicts) and keeps every key except
those that cannot change what ``stage`` computes: a deny-list (``USED_BY``), so a new setting is
part of every job's identity until it is listed here as another stage's or as inert. User files
(``data.root``, a sharding manifest, a pretrained backbone) enter by content, not by path.

Pure standard library (no torch, omegaconf): the config resolver of backbone ids imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_JOBS = ("shard", "paragon")
FITTED = (
    "backbone",
    *ADAPTER_JOBS,
    "router",
    "head",
    "feature_net",
)  # Lightning jobs: trainer matters
STAGES = (*FITTED, "knn")
CONSUMERS = (*STAGES, "sample", "evaluate")  # whatever computes a result that is cached or resumed
ON_SHARDS = (
    *ADAPTER_JOBS,
    "router",
    "head",
    "knn",
    "sample",
    "evaluate",
)  # everything but the backbone
ON_BACKBONE = ("backbone", *ADAPTER_JOBS, "router", "head", "sample", "evaluate")
SAMPLE = ("sample",)
INERT: tuple[str, ...] = ()
RUN_SETTINGS = ("trainer", "callbacks", "threads", "deterministic")  # how a job runs, not on what

# Dotted key -> the consumers whose result it can change (the longest listed prefix decides);
# a key not listed changes every consumer's result.
USED_BY: dict[str, tuple[str, ...]] = {
    # where outputs go, how runs are shown, whether a job restarts: never a result
    "paths": INERT,
    "logger": INERT,
    "hydra": INERT,
    "experiment_name": INERT,
    "stage": INERT,  # the identity names its stage itself
    "resume": INERT,
    "retrain": INERT,
    "resample": INERT,
    "overwrite": INERT,
    "kill_at_step": INERT,
    "progress": INERT,
    "name": INERT,  # the samples artifact's name
    "trainer.log_every_n_steps": INERT,
    "trainer.enable_progress_bar": INERT,
    "trainer.enable_model_summary": INERT,
    "trainer.enable_checkpointing": INERT,  # cdm's SliceCheckpoint writes the checkpoints
    "router.name": INERT,
    "knn.name": INERT,
    "feature_net.id": INERT,
    # entry points that only run other jobs (each with its own identity)
    "table1": INERT,
    "fig2": INERT,
    "serve": INERT,
    "source": INERT,
    "add": INERT,
    "forget": INERT,
    "provenance": INERT,
    "attribution": INERT,  # cdm-attribute: samples coalitions; its card records the whole config
    "job": INERT,  # the stage's job function (conf/stage): the identity names the stage itself
    # the data: the feature net learns the dataset's classes whatever the experiment
    "sharding": ON_SHARDS,
    "sharding.safe_fraction": (*ON_SHARDS, "backbone"),  # the backbone's safe split
    "sharding.safe_classes": (*ON_SHARDS, "backbone"),
    "data.conditional": ON_BACKBONE,
    # the backbone: its own job and every job that runs it; its id names the backbone job's
    # output (and carries this identity's hash), while it names a parent for the others
    "backbone": ON_BACKBONE,
    "backbone.id": ON_BACKBONE[1:],
    # each stage's own settings
    "pretrain": ("backbone",),
    "optim": ADAPTER_JOBS,
    "optim.cond_drop_prob": ("backbone", *ADAPTER_JOBS),
    "adapter": ADAPTER_JOBS,
    "shard": ("shard", "head"),
    "router": ("router", "head", "sample"),  # sample: +router=compartmental picks the heads
    "knn": ("knn", "sample"),
    "feature_net": ("feature_net",),
    "trainer": FITTED,
    "callbacks": FITTED,
    "evaluate": ("evaluate",),
    # sampling's own settings
    **{
        key: SAMPLE
        for key in (
            "composition",
            "shards",
            "prior",
            "fixed_weights",
            "topk",
            "router_name",
            "sampler",
            "steps",
            "num_samples",
            "batch_size",
            "guidance_scale",
            "labels",
            "prompts",  # text models' prompts (cdm.jobs.pipeline.prompt_list)
            "device",
            "cuda_graph",
        )
    },  # fmt: skip
}

# Keys that hold a path to user files: they enter an identity by content.
FILE_KEYS = (
    "data.root", "sharding.manifest_path", "backbone.pretrained_path", "knn.embedder.path",
    "backbone.text_encoder.path", "backbone.codec.path",  # e.g. an SD folder (backbone=sd_local)
)  # fmt: skip

# Keys that may name a text file of captions (one a line; else a list): such a file enters an
# identity by the captions it holds, not by its path or name (``captions_digest``).
CAPTION_FILE_KEYS = ("prompts",)

# Callbacks that only measure or show a run (their ``_target_``), left out of identities.
LOG_ONLY_CALLBACKS = frozenset(
    f"{package}.callbacks.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for name in (
        "Timer", "LearningRateMonitor", "DeviceStatsMonitor", "ModelSummary", "RichModelSummary",
        "TQDMProgressBar", "RichProgressBar",
    )
)  # fmt: skip


@dataclass(frozen=True)
class JobIdentity:
    """What a job computes from: ``sections`` (top-level config keys, filtered) and their hash."""

    stage: str
    sections: dict[str, Any]
    hash: str

    @property
    def short(self) -> str:
        """The first 8 hex digits of the hash (backbone ids carry it)."""
        return self.hash[:8]

    def content_short(self) -> str:
        """8 hex of the identity without ``RUN_SETTINGS``: what backbone ids carry. Every stage
        resolves the backbone's id with its own trainer, so the id leaves out how the backbone
        was run; its card's full identity refuses a rerun under other run settings."""
        content = {k: v for k, v in self.sections.items() if k not in RUN_SETTINGS}
        return _digest(content)[:8]

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """Dotted keys whose values differ between ``other`` (stored sections) and these."""
        return differing_keys(other, self.sections)


def job_identity(config: Mapping[str, Any], stage: str) -> JobIdentity:
    """The identity of the ``stage`` job (or ``sample`` / ``evaluate``) of a resolved config."""
    if stage not in CONSUMERS:
        raise ValueError(f"unknown stage {stage!r} for a job identity: choose one of {CONSUMERS}")
    sections: dict[str, Any] = {"stage": stage, **_kept(config, "", stage)}
    if "callbacks" in sections:
        sections["callbacks"] = {
            name: spec
            for name, spec in sections["callbacks"].items()
            if spec is not None and _target(spec) not in LOG_ONLY_CALLBACKS
        }
    for key in FILE_KEYS:
        head, _, leaf = key.rpartition(".")
        parent = _lookup(sections, head)
        if isinstance(parent, dict) and parent.get(leaf) is not None:
            parent[leaf] = path_digest(str(parent[leaf]))
    for key in CAPTION_FILE_KEYS:
        head, _, leaf = key.rpartition(".")
        parent = _lookup(sections, head)
        if isinstance(parent, dict) and isinstance(parent.get(leaf), str):
            parent[leaf] = captions_digest(parent[leaf])
    return JobIdentity(stage, sections, _digest(sections))


def differing_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys (sorted) whose values differ between two nested dicts; a missing key differs."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out += differing_keys(old[key], new[key], path)
        return out
    return [] if old == new else [prefix or "<all>"]


def describe_differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """``key: old -> new, ...`` for the keys that differ (at most ``limit``, then a count)."""
    keys = differing_keys(old, new)
    shown = [f"{k}: {_short(_lookup(old, k))} -> {_short(_lookup(new, k))}" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def refusal(
    what: str, stored: Mapping[str, Any] | None, current: Mapping[str, Any], fix: str
) -> str:
    """One line refusing to resume or reuse ``what``, made with other settings, and the fix;
    ``stored``/``current`` are identity sections (``stored`` None: not recorded, an older run)."""
    changed = describe_differences(stored, current) if stored else "not recorded: an older run"
    return f"{what} was made with other settings ({changed}): {fix}"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in this process."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def path_digest(path: str) -> dict[str, str]:
    """The content of a user file or folder: ``{"sha256": ..., "name": ...}`` (a folder: of its
    files' relative paths and hashes), or ``{"missing": path}`` so that the code reading it reports
    the problem. The name counts too: loaders name a dataset, and so its sample ids, after its
    file (``mine.npz`` -> ``mine/train/000001``), so equal bytes under two names are two datasets."""
    root = Path(path).expanduser()
    if root.is_file():
        return {"sha256": file_digest(root), "name": root.name}
    if not root.is_dir():
        return {"missing": str(path)}
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()} {file_digest(file)}\n".encode())
    return {"sha256": digest.hexdigest(), "name": root.name}


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of a prompts file: one a line, stripped, blank lines skipped."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def captions_digest(path: str) -> dict[str, str]:
    """The captions a prompts file holds, ``{"captions_sha256": ...}`` (sha256 of their JSON list:
    two files with the same captions are one, an edited file another), or ``{"missing": path}``
    so that the code reading it reports the problem."""
    if not Path(path).expanduser().is_file():
        return {"missing": str(path)}
    captions = json.dumps(read_captions(path), ensure_ascii=False)
    return {"captions_sha256": hashlib.sha256(captions.encode()).hexdigest()}


def _digest(sections: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def _users(path: str) -> tuple[str, ...]:
    """The consumers ``path`` concerns (the longest listed prefix decides; unlisted: all)."""
    best = ""
    for key in USED_BY:
        if (path == key or path.startswith(key + ".")) and len(key) > len(best):
            best = key
    return USED_BY[best] if best else CONSUMERS


def _kept(node: Mapping[str, Any], prefix: str, stage: str) -> dict[str, Any]:
    """``node`` without the keys that cannot change ``stage``'s result."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if stage in _users(path):
            out[key] = _kept(value, path, stage) if isinstance(value, Mapping) else value
        elif isinstance(value, Mapping) and any(
            k.startswith(path + ".") and stage in users for k, users in USED_BY.items()
        ):  # a used key under an unused section (optim.cond_drop_prob for the backbone)
            kept = _kept(value, path, stage)
            if kept:
                out[key] = kept
    return out


def _lookup(node: Any, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _target(spec: Any) -> str | None:
    return spec.get("_target_") if isinstance(spec, Mapping) else None


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."
