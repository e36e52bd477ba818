"""Access-rights serving (paper Sec. 5): compose only the shards a user may use, and audit it.

A policy file (YAML or JSON) maps users to the shards they may use::

    {"users": {"alice": ["shard-00", "shard-02"], "bob": ["*"]}}

Entries are shard names (``shard-KK``) or, for ``sharding=manifest`` experiments, the source
names stored in the shard manifests' ``meta.source``; ``"*"`` means every shard. Every request,
granted or refused, appends one JSON line to ``<artifacts>/audit/serve.jsonl``.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.names import ShardId
from cdm.jobs.pipeline import shard_indices
from cdm.jobs.sample import run_sampling
from cdm.store import ArtifactStore, validate_name

POLICY_EXAMPLE = '{"users": {"alice": ["shard-00", "shard-02"], "bob": ["*"]}}'
ALL = "*"


class AccessDenied(PermissionError):
    """The user may not use (some of) the requested shards, or is not in the policy."""


class PolicyError(ValueError):
    """The policy file is missing, malformed, or names shards/sources the experiment lacks."""


def load_policy(path: str | Path) -> dict[str, list[str]]:
    """``{user: [shard or source names]}`` from a YAML/JSON policy file, checked for shape."""
    import yaml

    p = Path(path).expanduser()
    fix = f"write it as {POLICY_EXAMPLE} (YAML or JSON) and pass serve.policy=<path>"
    if not p.is_file():
        raise PolicyError(f"policy file {p} does not exist: {fix}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())  # one line: the message also goes to the audit log
        raise PolicyError(f"policy file {p} cannot be parsed ({reason}): {fix}") from e
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict) or not users:
        raise PolicyError(f"policy file {p}: expected a non-empty mapping 'users': {fix}")
    policy: dict[str, list[str]] = {}
    for user, names in users.items():
        ok = isinstance(names, list) and all(isinstance(n, str) and n for n in names)
        if not isinstance(user, str) or not ok:
            raise PolicyError(
                f"policy file {p}: user {user!r} must map to a list of shard/source names "
                f"(or ['*']), got {names!r}: {fix}"
            )
        policy[user] = list(names)
    return policy


def shard_labels(store: ArtifactStore, experiment: str) -> dict[int, list[str]]:
    """``{k: names shard k answers to}``: ``shard-KK`` plus its manifest's source, if any."""
    labels = {}
    for k in shard_indices(store, experiment):
        name = ShardId(k).name
        source = store.load_manifest(experiment, name).get("meta", {}).get("source")
        labels[k] = [name] + ([str(source)] if source is not None else [])
    return labels


def resolve_sources(
    store: ArtifactStore,
    experiment: str,
    names: list[str | int],
    *,
    origin: str = "request",
    hint: str | None = None,
) -> list[int]:
    """Sorted shard indices named by ``names`` (``shard-KK``, a source name, an index or ``*``).

    Unknown names raise ``PolicyError`` naming ``origin`` and ``hint`` (default: every name the
    experiment knows; a user's request gets only what that user may use).
    """
    labels = shard_labels(store, experiment)
    lookup = {label: k for k, ls in labels.items() for label in ls}
    found, unknown = set(), []
    for name in names:
        if name == ALL:
            found.update(labels)
        elif isinstance(name, int) and name in labels:
            found.add(name)
        elif str(name) in lookup:
            found.add(lookup[str(name)])
        else:
            unknown.append(name)
    if unknown:
        raise PolicyError(
            f"{origin}: unknown shards/sources {unknown} for experiment {experiment!r}; "
            f"{hint or f'it has {sorted(lookup)} (or * for all)'}"
        )
    return sorted(found)


def audit_path(artifacts: str | Path) -> Path:
    """``<artifacts>/audit/serve.jsonl``."""
    return ArtifactStore(artifacts).audit_log_path("serve")


def append_audit(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` and fsync it; earlier lines are never rewritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _names(labels: dict[int, list[str]], shards: list[int]) -> list[str]:
    """Human names of shards: ``source (shard-KK)`` where a source is known."""
    return [" ".join([labels[k][-1]] + ([f"({labels[k][0]})"] if len(labels[k]) > 1 else [])) for k in shards]  # fmt: skip


def _grant(
    cfg: DictConfig, store: ArtifactStore, user: str, sources: list | None, record: dict
) -> list[int]:
    """The shards to compose for this request; raises ``AccessDenied``/``PolicyError``."""
    experiment = cfg.experiment_name
    policy_file = Path(str(cfg.serve.policy)).expanduser()
    policy = load_policy(policy_file)
    if user not in policy:
        raise AccessDenied(
            f"user {user!r} is not in the policy file {policy_file} (users: {sorted(policy)}): "
            f"add them under 'users' with the shards they may use, e.g. {POLICY_EXAMPLE}"
        )
    labels = shard_labels(store, experiment)
    allowed = resolve_sources(
        store, experiment, policy[user], origin=f"policy file {policy_file}, user {user!r}"
    )
    record["allowed"] = _names(labels, allowed)
    if not allowed:
        raise AccessDenied(f"user {user!r} may use no shard of {experiment!r} ({policy_file})")
    if cfg.composition.name == "paragon" and allowed != sorted(labels):
        raise AccessDenied(
            f"composition=paragon uses all private data; user {user!r} may use only "
            f"{record['allowed']}: use a composition over the allowed shards"
        )
    if sources is None:
        return allowed
    may = f"user {user!r} may use {record['allowed']} (serve.sources=null uses all of them)"
    requested = resolve_sources(store, experiment, sources, origin="serve.sources", hint=may)
    denied = [k for k in requested if k not in allowed]
    if denied:
        raise AccessDenied(
            f"access denied: user {user!r} may not use {_names(labels, denied)} of "
            f"{experiment!r}; {may}"
        )
    if not requested:
        raise PolicyError(f"serve.sources is empty: name at least one shard; {may}")
    return requested


def serve(cfg: DictConfig, user: str, sources: list[str | int] | None = None) -> dict:
    """Sample from the shards ``user`` may use (all, or the requested ``sources``); audit it.

    Returns the samples card. Refusals raise ``AccessDenied``; every request is audited.
    """
    store = ArtifactStore(cfg.paths.artifacts)
    requested = None if sources is None else list(sources)
    record: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "user": user,
        "experiment": cfg.experiment_name,
        "composition": cfg.composition.name,
        "requested": requested,
        "allowed": None,
    }
    try:
        validate_name(user, "user name")
        shards = _grant(cfg, store, user, requested, record)
        cfg = cfg.copy()
        OmegaConf.update(cfg, "shards", shards, force_add=True)
        card = run_sampling(cfg)
    except Exception as e:
        record["decision"] = "refused" if isinstance(e, AccessDenied) else "error"
        record["error"] = "".join(traceback.format_exception_only(e)).strip()
        append_audit(audit_path(cfg.paths.artifacts), record)
        raise
    record |= {"decision": "granted", "shards": shards, "samples": str(card["path"])}
    append_audit(audit_path(cfg.paths.artifacts), record)
    return card
