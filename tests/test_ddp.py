"""A shard trained on 2 CPU processes (ddp_spawn, gloo): each rank a disjoint part of the shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cdm.data.datamodule import SliceSampler
from cdm.data.manifest import Manifest
from cdm.store import ArtifactStore, read_card, sha256_file
from cdm.store.records import add_forgotten_ids, list_certificates
from tests.conftest import REPO


def test_rank_parts_are_disjoint_and_cover_the_slice():
    indices = list(range(100, 203))  # 103 samples: not divisible by 2 ranks
    ids = [f"x/{i:06d}" for i in indices]
    parts = [
        SliceSampler(indices, ids=ids, seed=3, epoch=1, rank=r, world_size=2).indices
        for r in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == 52
    assert set(parts[0]) | set(parts[1]) == set(indices)
    # the only overlap is the one padding sample, repeated from the same shard
    assert len(set(parts[0]) & set(parts[1])) <= 1


def test_shard_trains_on_two_cpu_processes(tmp_path, cli, train):
    args = ["experiment=digits_2split", "debug=tiny"]
    train(*args, "stage=backbone", artifacts=tmp_path)  # in process: only the shard needs DDP
    cli(*args, "stage=shard", "shard.index=1", "trainer=ddp_cpu", artifacts=tmp_path)
    store = ArtifactStore(tmp_path)
    card = read_card(store.adapter_dir("digits_2split", "shard-01"))
    manifest = store.load_manifest("digits_2split", "shard-01")
    assert card["world_size"] == 2
    # the ids gathered from both ranks are exactly the shard's
    assert card["manifest_hash"] == manifest["hash"]
    assert card["n_samples_fed"] == len(manifest["ids"])


@pytest.mark.slow
def test_forgetting_under_ddp_equals_training_from_scratch_under_ddp(tmp_path, cli, train):
    """cdm-forget retrains a shard and its compartmental-router head, both trained on 2 processes,
    under the same DDP config (their cards'): bit-identical to that shard and head trained from
    scratch on 2 processes without the id."""
    exp, args = "digits_2split", ["experiment=digits_2split", "debug=tiny", "sharding.n_slices=2"]
    root, fresh = tmp_path / "store", tmp_path / "fresh"
    train(*args, "stage=backbone", artifacts=root)
    cli(*args, "stage=shard", "shard.index=1", "trainer=ddp_cpu", artifacts=root)
    cli(*args, "stage=head", "shard.index=1", "trainer=ddp_cpu", artifacts=root)
    store = ArtifactStore(root)
    sid = Manifest.from_json(store.load_manifest(exp, "shard-01")).slice_ids(1)[0]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cdm.cli.forget", f"experiment={exp}", f"forget.ids=[{sid}]",
         "forget.retrain_router=false", f"paths.artifacts={root}", f"hydra.run.dir={root}/hydra-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = list_certificates(store, exp)
    cert = json.loads(path.read_text())
    assert [r["artifact"] for r in cert["retrained"]] == ["adapter shard-01", "head shard-01"]
    for retrained in cert["retrained"]:
        assert retrained["restarted_from"]["kind"] == "slice_checkpoint", retrained
    card = read_card(store.adapter_dir(exp, "shard-01"))
    head = store.read_head_card(exp, "shard-01")
    assert card["world_size"] == head["world_size"] == 2
    assert head["forget"]["certificate"] == cert["name"]

    shutil.copytree(root / "backbones", fresh / "backbones")
    add_forgotten_ids(ArtifactStore(fresh), exp, [sid], "reference")
    cli(*args, "stage=shard", "shard.index=1", "trainer=ddp_cpu", artifacts=fresh)
    cli(*args, "stage=head", "shard.index=1", "trainer=ddp_cpu", artifacts=fresh)
    weights = "adapter_model.safetensors"
    assert sha256_file(store.adapter_dir(exp, "shard-01") / weights) == sha256_file(
        ArtifactStore(fresh).adapter_dir(exp, "shard-01") / weights
    )
    scratch = ArtifactStore(fresh).read_head_card(exp, "shard-01")
    assert head["manifest_hash"] == scratch["manifest_hash"]
    assert head["weights_sha256"] == scratch["weights_sha256"]
    assert head["weights_sha256"] != next(  # the retrain changed the head
        r["old_weights_sha256"] for r in cert["retrained"] if r["artifact"] == "head shard-01"
    )
