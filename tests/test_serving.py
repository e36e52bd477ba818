"""cdm-serve on a tiny store: access policy, refusals, the audit log, adapters never read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdm.lifecycle.serving import (
    AccessDenied,
    PolicyError,
    audit_path,
    load_policy,
    resolve_sources,
    serve,
)
from cdm.store import ArtifactStore, CorruptArtifactError

TINY = ["experiment=digits_2split", "debug=tiny"]
SAMPLE = [*TINY, "num_samples=6", "batch_size=4", "steps=4", "progress=false"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("serve-store")
    for stage in ("stage=backbone", "stage=shard shard.index=0", "stage=shard shard.index=1", "stage=router"):  # fmt: skip
        run_inprocess(*TINY, *stage.split(), artifacts=root)
    return root


@pytest.fixture
def policy(tmp_path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"users": {"alice": ["shard-01"], "bob": ["*"]}}))
    return path


def request(store_root: Path, policy: Path, user: str, sources=None, *overrides: str) -> dict:
    """Compose ``conf/serve.yaml`` for ``user`` and serve the request in this process."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    args = [*SAMPLE, f"serve.user={user}", f"serve.policy={policy}", *overrides]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=[*args, f"paths.artifacts={store_root}"])
    return serve(cfg, user, sources)


def audit(store_root: Path) -> list[dict]:
    path = audit_path(store_root)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def adapters(card: dict) -> list[str]:
    return [p["name"] for p in card["parents"] if p["kind"] == "adapter"]


def test_an_allowed_request_composes_only_the_allowed_shards(store_root, policy):
    card = request(store_root, policy, "alice", None, "composition=average")
    assert card["shards"] == [1] and adapters(card) == ["shard-01"]
    assert [p["kind"] for p in card["parents"]] == ["backbone", "adapter"]
    last = audit(store_root)[-1]
    assert last["decision"] == "granted" and last["user"] == "alice"
    assert last["requested"] is None and last["allowed"] == ["shard-01"] and last["shards"] == [1]
    assert last["samples"] == str(card["path"]) and Path(card["path"]).is_dir()
    # bob may use every shard, so the joint router (trained on all of them) may weigh his subset
    routed = request(store_root, policy, "bob", ["shard-01"], "composition=classifier")
    assert routed["shards"] == [1] and adapters(routed) == ["shard-01"]
    assert [p["kind"] for p in routed["parents"]] == ["backbone", "adapter", "router"]
    last = audit(store_root)[-1]
    assert last["decision"] == "granted" and last["user"] == "bob" and last["shards"] == [1]
    both = request(store_root, policy, "bob", ["shard-00", 1], "composition=average")
    assert both["shards"] == [0, 1] and adapters(both) == ["shard-00", "shard-01"]
    one = request(store_root, policy, "bob", ["shard-00"], "composition=average", "name=bob-0")
    assert one["shards"] == [0] and adapters(one) == ["shard-00"]


def test_a_disallowed_source_is_refused_audited_and_writes_no_samples(store_root, policy):
    before = audit(store_root)
    with pytest.raises(AccessDenied, match=r"may not use \['shard-00'\].*may use \['shard-01'\]"):
        request(store_root, policy, "alice", ["shard-00", "shard-01"], "name=refused")
    assert not ArtifactStore(store_root).samples_dir("digits_2split", "refused").exists()
    after = audit(store_root)
    assert after[: len(before)] == before and len(after) == len(before) + 1
    last = after[-1]
    assert last["decision"] == "refused" and last["user"] == "alice"
    assert last["requested"] == ["shard-00", "shard-01"] and "shard-00" in last["error"]
    assert "samples" not in last


def test_a_disallowed_adapter_is_never_read(store_root, policy):
    # shard-00's weights are corrupted: alice (shard-01 only) is served; bob (all) hits the check
    path = (
        ArtifactStore(store_root).adapter_dir("digits_2split", "shard-00")
        / "adapter_model.safetensors"
    )
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\x00" * 8)
    try:
        card = request(store_root, policy, "alice", None, "composition=average", "name=corrupt-a")
        assert card["shards"] == [1] and adapters(card) == ["shard-01"]
        with pytest.raises(CorruptArtifactError, match="corrupt"):
            request(store_root, policy, "bob", None, "composition=average", "name=corrupt-b")
        assert audit(store_root)[-1]["decision"] == "error"
    finally:
        path.write_bytes(original)


def test_unknown_users_and_sources_are_clear_errors(store_root, policy, tmp_path):
    with pytest.raises(AccessDenied, match=rf"'mallory' is not in the policy file {policy}.*add"):
        request(store_root, policy, "mallory")
    assert audit(store_root)[-1]["decision"] == "refused"
    with pytest.raises(PolicyError, match=r"serve.sources.*unknown.*\['shard-07'\].*may use"):
        request(store_root, policy, "bob", ["shard-07"])
    bad = tmp_path / "bad-source.json"
    bad.write_text(json.dumps({"users": {"carol": ["nobody"]}}))
    with pytest.raises(PolicyError, match=rf"policy file {bad}, user 'carol'.*\['nobody'\]"):
        request(store_root, bad, "carol")
    with pytest.raises(AccessDenied, match="paragon"):
        request(store_root, policy, "alice", None, "composition=paragon")


@pytest.mark.parametrize(
    "composition", ["classifier", "topk", "topk +router=compartmental"]
)  # topk always reads the joint router
def test_a_joint_router_is_refused_to_a_restricted_user(store_root, policy, composition):
    # the classifier router learnt from shard-00, which alice may not use
    before = len(audit(store_root))
    with pytest.raises(AccessDenied, match=r"joint classifier router.*router=compartmental.*composition=knn"):  # fmt: skip
        request(store_root, policy, "alice", None, *f"composition={composition}".split(), "name=joint")  # fmt: skip
    assert not ArtifactStore(store_root).samples_dir("digits_2split", "joint").exists()
    assert [r["decision"] for r in audit(store_root)[before:]] == ["refused"]


def test_the_compartmental_router_is_not_refused_to_a_restricted_user(store_root, policy):
    # composition=classifier with router=compartmental reads only the allowed shards' heads
    # (none are trained in this store: the pipeline says so, the policy does not refuse)
    with pytest.raises(Exception) as raised:
        request(store_root, policy, "alice", None, "composition=classifier", "+router=compartmental", "name=heads")  # fmt: skip
    assert not isinstance(raised.value, AccessDenied), raised.value
    assert audit(store_root)[-1]["decision"] == "error"


@pytest.mark.parametrize(
    "text, match",
    [
        ("users: [alice", "cannot be parsed"),
        ('{"people": {"alice": ["*"]}}', "non-empty mapping 'users'"),
        ('{"users": {"alice": "shard-00"}}', "must map to a list"),
        ('{"users": {}}', "non-empty mapping 'users'"),
    ],
)
def test_malformed_policy_files_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=rf"policy file {path}.*{match}.*serve.policy="):
        load_policy(path)
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.yaml")


def test_source_names_of_manifest_sharding_resolve_to_shards(store_root, monkeypatch):
    store = ArtifactStore(store_root)
    load = store.load_manifest
    owners = {"shard-00": "hospital-a", "shard-01": "hospital-b"}

    def with_source(experiment: str, name: str) -> dict:
        manifest = load(experiment, name)
        return {**manifest, "meta": {**manifest.get("meta", {}), "source": owners[name]}}

    monkeypatch.setattr(store, "load_manifest", with_source)
    assert resolve_sources(store, "digits_2split", ["hospital-b"]) == [1]
    assert resolve_sources(store, "digits_2split", ["shard-00", "hospital-b"]) == [0, 1]
    assert resolve_sources(store, "digits_2split", ["*"]) == [0, 1]
    with pytest.raises(PolicyError, match="hospital-c"):
        resolve_sources(store, "digits_2split", ["hospital-c"])


def test_cdm_serve_cli_grants_and_refuses(store_root, policy):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = [sys.executable, "-m", "cdm.cli.serve", *SAMPLE, f"serve.policy={policy}", "serve.once=true",
              f"paths.artifacts={store_root}", f"hydra.run.dir={store_root}/hydra-serve"]  # fmt: skip
    before = audit(store_root)
    ok = subprocess.run(
        [*common, "serve.user=bob", "serve.sources=[shard-01]", "composition=average"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "samples for 'bob' (shards [1])" in ok.stdout
    no = subprocess.run(
        [*common, "serve.user=alice", "serve.sources=shard-00"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert no.returncode != 0 and "access denied" in no.stderr
    after = audit(store_root)
    assert after[: len(before)] == before
    assert [r["decision"] for r in after[len(before) :]] == ["granted", "refused"]
