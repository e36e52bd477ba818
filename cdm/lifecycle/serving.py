"""Access-rights serving (paper Sec. 5): compose only the shards a user may use, and audit it.

A policy file (YAML or JSON) maps users to the shards they may use::

    {"users": {"alice": ["shard-00", "shard-02"], "bob": ["*"]},
     "tokens": {"alice": "sha256:<hex digest of alice's bearer token>"}}

Entries are shard names (``shard-KK``) or, for ``sharding=manifest`` experiments, the source
names stored in the shard manifests' ``meta.source``; ``"*"`` means every shard. ``tokens``
(written by ``cdm-serve add-user``) holds only sha256 digests: the HTTP service
(``cdm.lifecycle.service``) knows a user by their bearer token alone. Every request, granted or
refused, appends one JSON line to ``<artifacts>/audit/serve.jsonl`` (size-based rotation to
``serve.jsonl.000001``, ... keeps every line).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.names import ShardId
from cdm.store import ArtifactStore, validate_name
from cdm.store.io import append_json_line, atomic_write_bytes

POLICY_EXAMPLE = '{"users": {"alice": ["shard-00", "shard-02"], "bob": ["*"]}}'
ALL = "*"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class AccessDenied(PermissionError):
    """The user may not use (some of) the requested shards, or is not in the policy."""


class PolicyError(ValueError):
    """The policy file is missing, malformed, or names shards/sources the experiment lacks."""


def read_policy_file(path: str | Path) -> dict:
    """The policy file's mapping (``users``, optional ``tokens``), checked for shape."""
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
    for user, names in users.items():
        ok = isinstance(names, list) and all(isinstance(n, str) and n for n in names)
        if not isinstance(user, str) or not ok:
            raise PolicyError(
                f"policy file {p}: user {user!r} must map to a list of shard/source names "
                f"(or ['*']), got {names!r}: {fix}"
            )
    tokens = data.get("tokens") or {}
    bad = [u for u, d in tokens.items() if u not in users or not DIGEST.fullmatch(str(d))] if isinstance(tokens, dict) else [tokens]  # fmt: skip
    if bad:
        raise PolicyError(
            f"policy file {p}: 'tokens' must map users of 'users' to 'sha256:<64 hex>' digests, "
            f"bad entries {bad}: recreate them with cdm-serve add-user NAME serve.policy={p}"
        )
    return {"users": {u: list(n) for u, n in users.items()}, "tokens": dict(tokens)}


def load_policy(path: str | Path) -> dict[str, list[str]]:
    """``{user: [shard or source names]}`` from a YAML/JSON policy file, checked for shape."""
    return read_policy_file(path)["users"]


def token_digest(token: str) -> str:
    """``sha256:<hex>`` of a bearer token: what the policy file stores (tokens are 256-bit
    random strings, so an unsalted sha256 cannot be reversed by guessing)."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def authenticate(authorization: str | None, policy_file: str | Path) -> str | None:
    """The user whose token is in ``Authorization: Bearer <token>`` (None: missing or wrong).

    Every stored digest is compared in constant time (``hmac.compare_digest``).
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = token_digest(token.strip()).encode()
    user = None
    for name, stored in read_policy_file(policy_file)["tokens"].items():
        if hmac.compare_digest(str(stored).encode(), digest):
            user = name
    return user


def add_user(policy_file: str | Path, user: str, sources: list[str] | None = None) -> str:
    """Create ``user`` (or give them a new token) in the policy file; return the token, once.

    ``sources`` replaces the user's shard/source list (required for a new user). The file is
    written atomically; only the token's sha256 digest is stored.
    """
    import yaml

    validate_name(user, "user name")
    path = Path(policy_file).expanduser()
    data = read_policy_file(path) if path.exists() else {"users": {}, "tokens": {}}
    if sources is None and user not in data["users"]:
        raise PolicyError(
            f"add-user {user!r}: a new user needs the shards/sources they may use, "
            f"e.g. serve.sources='[shard-00]' (or '[\"*\"]' for all)"
        )
    if sources is not None:
        if not sources or not all(isinstance(n, str) and n for n in sources):
            raise PolicyError(f"add-user {user!r}: serve.sources must be a non-empty list of names")
        data["users"][user] = [str(n) for n in sources]
    token = secrets.token_urlsafe(32)
    data["tokens"][user] = token_digest(token)
    text = (
        json.dumps(data, indent=2) + "\n"
        if path.suffix == ".json"
        else yaml.safe_dump(data, sort_keys=False)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))
    os.chmod(path, 0o600)
    return token


def shard_labels(store: ArtifactStore, experiment: str) -> dict[int, list[str]]:
    """``{k: names shard k answers to}``: ``shard-KK`` plus its manifest's source, if any."""
    from cdm.jobs.pipeline import (
        shard_indices,
    )  # diffusers: the service imports it in the background

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
        elif isinstance(name, int) and not isinstance(name, bool) and name in labels:
            found.add(name)
        elif isinstance(name, str) and name in lookup:
            found.add(lookup[name])
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


def _names(labels: dict[int, list[str]], shards: list[int]) -> list[str]:
    """Human names of shards: ``source (shard-KK)`` where a source is known."""
    return [" ".join([labels[k][-1]] + ([f"({labels[k][0]})"] if len(labels[k]) > 1 else [])) for k in shards]  # fmt: skip


def joint_router(cfg: DictConfig) -> bool:
    """Whether ``cfg.composition`` weighs shards with the classifier router, trained on every
    shard at once. ``composition=classifier`` reads the shards' own heads instead when
    ``router=compartmental`` is configured (its ``router`` is then ``compartmental``)."""
    return cfg.composition.get("router") == "classifier"


def grant_shards(
    store: ArtifactStore,
    experiment: str,
    policy_file: str | Path,
    user: str,
    sources: list | None,
    record: dict,
    *,
    composition: str,
    joint: bool,
) -> list[int]:
    """The shards to compose for ``user``'s request (all they may use, or ``sources``).

    Refuses (``AccessDenied``) a user outside the policy, a disallowed source, and a user who
    may not use every shard a composition with a model trained on all of them (the paragon, a
    ``joint`` router); unknown names raise ``PolicyError``. ``record`` gets ``allowed``.
    """
    policy_file = Path(policy_file).expanduser()
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
    requested = allowed
    may = f"user {user!r} may use {record['allowed']} (serve.sources=null uses all of them)"
    if sources is not None:
        requested = resolve_sources(store, experiment, sources, origin="serve.sources", hint=may)
        denied = [k for k in requested if k not in allowed]
        if denied:
            raise AccessDenied(
                f"access denied: user {user!r} may not use {_names(labels, denied)} of "
                f"{experiment!r}; {may}"
            )
        if not requested:
            raise PolicyError(f"serve.sources is empty: name at least one shard; {may}")
    if composition == "paragon" and allowed != sorted(labels):
        raise AccessDenied(
            f"composition=paragon uses all private data; user {user!r} may use only "
            f"{record['allowed']}: use a composition over the allowed shards"
        )
    if joint and allowed != sorted(labels):
        raise AccessDenied(
            f"composition={composition} weighs shards with the joint classifier router, trained "
            f"on every shard; user {user!r} may use only {record['allowed']}: serve with "
            f"router=compartmental (one head per shard) or use composition=knn"
        )
    return requested


def serve(cfg: DictConfig, user: str, sources: list[str | int] | None = None) -> dict:
    """Sample from the shards ``user`` may use (all, or the requested ``sources``); audit it.

    The one-shot path (``cdm-serve serve.once=true``). Returns the samples card. Refusals raise
    ``AccessDenied``; every request is audited.
    """
    from cdm.jobs.sample import run_sampling

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
    max_bytes = cfg.serve.get("audit_max_bytes")
    started = time.perf_counter()
    try:
        validate_name(user, "user name")
        shards = grant_shards(
            store, cfg.experiment_name, str(cfg.serve.policy), user, requested, record,
            composition=cfg.composition.name, joint=joint_router(cfg),
        )  # fmt: skip
        cfg = cfg.copy()
        OmegaConf.update(cfg, "shards", shards, force_add=True)
        card = run_sampling(cfg)
    except Exception as e:
        record["decision"] = "refused" if isinstance(e, AccessDenied) else "error"
        record["error"] = "".join(traceback.format_exception_only(e)).strip()
        status = 403 if isinstance(e, AccessDenied) else 400 if isinstance(e, PolicyError) else 500  # fmt: skip
        record |= {"status": status, "latency_ms": round(1000 * (time.perf_counter() - started), 2)}  # fmt: skip
        append_json_line(audit_path(cfg.paths.artifacts), record, max_bytes)
        raise
    record |= {"decision": "granted", "shards": shards, "samples": str(card["path"]), "status": 200}  # fmt: skip
    record["latency_ms"] = round(1000 * (time.perf_counter() - started), 2)
    append_json_line(audit_path(cfg.paths.artifacts), record, max_bytes)
    return card
