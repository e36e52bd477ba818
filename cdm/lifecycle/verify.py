"""``cdm-verify``: anyone can check a forget certificate by training from scratch.

A sample request's certificate (``cdm-forget``) carries a ``verify`` section
(``verification_record``): the experiment's shards after the request as a ``sharding=manifest``
sources file (every shard's remaining ids, the forgotten ones ``excluded``), the backbone's config
and weight hash, and for every retrained model (shard adapter, compartmental-router head) its
training config, the hash of its new manifest and of its weights. ``verify`` trains the backbone
and those models from scratch in a fresh store on exactly those ids (``sharding=manifest``, never
cdm's forgotten-ids path) and compares every weight hash with the certificate's.

This holds because every id's safe/shard/slice membership and its place in each epoch's order are
functions of the id and the seed alone (``cdm.data.sharding``): the SISA retrain ``cdm-forget`` ran
is bit-identical to a from-scratch run on the ids left (CPU, deterministic kernels, the same
thread count as on the cards). The joint classifier router is not checked (it learns from every
shard; ``router=compartmental`` heads are, with their shards).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.data.manifest import Manifest
from cdm.jobs.run import run_job
from cdm.lifecycle.downstream import job_config
from cdm.lifecycle.journal import stored_manifests
from cdm.store import ArtifactStore, atomic_write_json, read_card, sha256_file
from cdm.store.records import forgotten_ids, read_sources

log = get_logger(__name__)

SOURCES_FILE = "sources.json"
REPORT_FILE = "report.json"


class VerifyError(ValueError):
    """A certificate or store ``cdm-verify`` cannot use (a user error: one line, exit 2)."""


# ------------------------------------------------------------------ what a certificate carries


def verification_record(
    store: ArtifactStore, experiment: str, ids: Sequence[str], new_shards: Sequence[Manifest]
) -> dict[str, Any]:
    """The ``verify`` section of the certificate of a request forgetting ``ids`` (``new_shards``:
    the manifests of the shards that lost some), drafted before the commit while the retrained
    models are in ``forget/pending``; ``{"unsupported": why}`` where a from-scratch run cannot
    name the same shards."""
    changed = read_sources(store, experiment)
    if changed["added"] or changed["removed"]:
        return {
            "unsupported": "the experiment has added or removed sources, whose shards a "
            "sharding=manifest run of the config's dataset cannot rebuild"
        }
    shards = {n: m for n, m in stored_manifests(store, experiment).items() if ShardId.is_shard(n)}
    shards.update({m.name: m for m in new_shards})
    names = sorted(shards, key=lambda n: ShardId.parse(n).index)
    if [ShardId.parse(n).index for n in names] != list(range(len(names))):
        return {"unsupported": f"shard indices {names} have gaps"}
    artifacts = []
    for m in new_shards:
        for kind, directory in (
            ("adapter", store.pending_adapter_dir(experiment, m.name)),
            ("head", store.pending_head_dir(experiment, m.name)),
        ):
            if not (directory / "card.json").is_file():
                continue
            card = read_card(directory)
            artifacts.append(
                {
                    "artifact": f"{kind} {m.name}",
                    "kind": kind,
                    "job": m.name,
                    "manifest_hash": card.get("manifest_hash"),  # the ids it was fed, hashed
                    "weights_sha256": card["weights_sha256"],
                    "config": card["config"],
                }
            )
    if not artifacts:
        return {
            "unsupported": "no model was retrained (no adapter of these shards was trained yet)"
        }
    backbone_id = artifacts[0]["config"]["backbone"]["id"]
    backbone = read_card(store.backbone_dir(backbone_id))
    return {
        "how": "cdm-verify verify.certificate=<this file> paths.artifacts=<an empty folder>",
        "sharding": {
            "sources": {n: list(shards[n].ids) for n in names},
            "order": names,
            "excluded": sorted(set(forgotten_ids(store, experiment)) | set(ids)),
        },
        "manifests": {n: shards[n].hash for n in names},
        "backbone": {
            "id": backbone_id,
            "weights_sha256": backbone["weights_sha256"],
            "config": backbone["config"],
        },
        "artifacts": artifacts,
    }


# ------------------------------------------------------------------------------- the check


def read_certificate(path: str | Path) -> dict[str, Any]:
    """A sample request's forget certificate with its ``verify`` section (``VerifyError`` if not)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise VerifyError(
            f"verify.certificate={p} does not exist: give a certificate written by cdm-forget "
            "(artifacts/experiments/<exp>/certificates/<tag>.json)"
        )
    try:
        cert = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VerifyError(f"{p} is not a JSON certificate ({err})") from None
    if not isinstance(cert, dict) or cert.get("kind") != "forget_certificate":
        raise VerifyError(f"{p} is not a forget certificate (no kind: forget_certificate)")
    record = cert.get("verify")
    if record is None:
        raise VerifyError(
            f"{p} has no 'verify' section: it was written before cdm-verify existed or for a whole "
            "source (whose adapter is deleted, nothing to retrain); forget again to get one"
        )
    if "unsupported" in record:
        raise VerifyError(f"{p} cannot be verified from scratch: {record['unsupported']}")
    return cert


def verify_config(
    config: dict, store: ArtifactStore, experiment: str, sources: Path, sharding: dict | None = None
) -> DictConfig:
    """A certified job's config, pointed at the fresh store, splitting by ``sources``
    (``sharding=manifest``; ``sharding`` replaces the job's own sharding settings first)."""
    cfg = job_config(config, store, experiment)
    if sharding is not None:
        cfg.sharding = OmegaConf.create(sharding)
    cfg.sharding.strategy = "manifest"
    cfg.sharding.manifest_path = str(sources)
    cfg.sharding.n_shards = 0
    return cfg


def check(artifact: str, expected: str, directory: Path, manifest_hash: str | None) -> dict:
    """One line of the report: the weight file's sha256 against the certificate's."""
    card = read_card(directory)
    actual = sha256_file(directory / card["weights_file"])
    result = {"artifact": artifact, "expected": expected, "actual": actual}
    result["match"] = actual == expected
    if manifest_hash is not None:  # the ids it was fed (the ArtifactWriter's hash) are certified
        result["manifest_match"] = card.get("manifest_hash") == manifest_hash
        result["match"] = result["match"] and result["manifest_match"]
    return result


def run_verify(cfg: DictConfig) -> dict[str, Any]:
    """Train the certified models from scratch in the fresh store ``cfg.paths.artifacts`` and
    compare their weight hashes with ``cfg.verify.certificate``'s; the report (also written to
    ``experiments/<exp>/verify/<tag>/report.json``)."""
    cert = read_certificate(cfg.verify.certificate)
    record, experiment = cert["verify"], cert["experiment"]
    store = ArtifactStore(cfg.paths.artifacts)
    if store.experiment_dir(experiment).exists():
        raise VerifyError(
            f"paths.artifacts={store.root} already holds experiment {experiment!r}: give cdm-verify "
            "an empty folder (a fresh store), so nothing but the certificate's ids is trained on"
        )
    out = store.verify_dir(experiment, cert["name"])
    sources = out / SOURCES_FILE
    atomic_write_json(sources, record["sharding"])
    first = record["artifacts"][0]["config"]
    b = record["backbone"]
    directory = store.backbone_dir(b["id"])
    if not (directory / "card.json").is_file():
        log.info("verify: training the backbone %s from scratch", b["id"])
        run_job(verify_config(b["config"], store, experiment, sources, first["sharding"]))
    results = [check(f"backbone {b['id']}", b["weights_sha256"], directory, None)]
    if results[0]["match"]:
        where = {"adapter": store.adapter_dir, "head": store.head_dir}
        for entry in record["artifacts"]:
            log.info("verify: training %s from scratch", entry["artifact"])
            run_job(verify_config(entry["config"], store, experiment, sources))
            results.append(
                check(
                    entry["artifact"],
                    entry["weights_sha256"],
                    where[entry["kind"]](experiment, entry["job"]),
                    entry["manifest_hash"],
                )
            )
    report = {
        "certificate": str(Path(str(cfg.verify.certificate)).expanduser()),
        "experiment": experiment,
        "results": results,
        "not_verified": [  # trained on every shard (joint router) or not a trained model
            r["artifact"]
            for r in [*cert.get("routers", []), *cert.get("knn_centroids", [])]
            if r.get("new_weights_sha256")
        ],
        "all_match": all(r["match"] for r in results)
        and len(results) == len(record["artifacts"]) + 1,
    }
    atomic_write_json(out / REPORT_FILE, report)
    report["path"] = str(out / REPORT_FILE)
    return report
