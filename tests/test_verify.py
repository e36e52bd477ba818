"""cdm-verify: a forget certificate checked by training from scratch in a fresh store (issue 12).

Train a tiny experiment, forget some ids of shard 0 (SISA retrain from a slice checkpoint), then
run the ``cdm-verify`` command on the certificate into an empty store: it trains the backbone and
shard 0 from scratch on the certified ids (``sharding=manifest``) and every weight hash matches.
A certificate whose expected hash was altered makes it exit 1 with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdm.data.manifest import Manifest
from cdm.store import ArtifactStore
from tests.conftest import REPO, run_inprocess

EXP = "digits_2split"
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_slices=3"]


def verify_cli(certificate: Path, store: Path) -> subprocess.CompletedProcess:
    """``cdm-verify`` in a fresh process, as a third party runs it."""
    cmd = [sys.executable, "-m", "cdm.cli.verify", f"verify.certificate={certificate}",
           f"paths.artifacts={store}", f"hydra.run.dir={store}/hydra-run"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def train_and_forget(root: Path, *stages: str) -> Path:
    """Train ``stages`` of a tiny digits_2split (shard 0's jobs), then forget ids of slices 1 and 2
    of shard 0; the certificate's path."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.lifecycle.forget import run_forget

    for stage in stages:  # shard 1's manifest is recorded too
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    shard0 = Manifest.from_json(ArtifactStore(root).load_manifest(EXP, "shard-00"))
    ids = [*shard0.slice_ids(1)[:2], shard0.slice_ids(2)[0]]
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "forget",
            overrides=[
                f"experiment={EXP}",
                f"forget.ids=[{','.join(ids)}]",
                f"paths.artifacts={root}",
            ],
        )
    cert = run_forget(cfg)
    assert cert["retrained"][0]["restarted_from"]["kind"] == "slice_checkpoint"
    return Path(cert["path"])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """The certificate of a forget request on shard 0 (backbone and shard 0 trained)."""
    return train_and_forget(tmp_path_factory.mktemp("trained"), "backbone", "shard")


def verify(certificate: Path, store: Path) -> dict:
    """``run_verify`` (cdm-verify's library entry point) in this process."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.lifecycle.verify import run_verify

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "verify", overrides=[f"verify.certificate={certificate}", f"paths.artifacts={store}"]
        )
    return run_verify(cfg)


def forge(certificate: Path, path: Path, what: str) -> Path:
    """A copy of the certificate claiming other weights for ``what`` (backbone or artifact 0)."""
    cert = json.loads(certificate.read_text())
    record = cert["verify"]
    entry = record["backbone"] if what == "backbone" else record["artifacts"][0]
    entry["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(cert))
    return path


def test_the_certificate_carries_the_ids_left_and_the_hashes(certificate):
    cert = json.loads(certificate.read_text())
    record = cert["verify"]
    requested = {s["id"] for s in cert["request"]["samples"]}
    assert set(record["sharding"]["excluded"]) == requested
    sources = record["sharding"]["sources"]
    assert record["sharding"]["order"] == ["shard-00", "shard-01"] == list(sources)
    assert not requested & {i for ids in sources.values() for i in ids}
    assert record["manifests"]["shard-00"] == cert["manifests"]["shard-00"]["new_hash"]
    assert [a["artifact"] for a in record["artifacts"]] == ["adapter shard-00"]
    assert record["artifacts"][0]["weights_sha256"] == cert["retrained"][0]["new_weights_sha256"]
    assert record["artifacts"][0]["manifest_hash"] == cert["retrained"][0]["new_manifest_hash"]


def test_verify_retrains_from_scratch_and_every_hash_matches(certificate, tmp_path):
    cert = json.loads(certificate.read_text())
    fresh = tmp_path / "fresh"
    report = verify(certificate, fresh)
    assert report["all_match"], report["results"]
    assert [r["artifact"] for r in report["results"]][1:] == ["adapter shard-00"]
    assert report["results"][1]["actual"] == cert["retrained"][0]["new_weights_sha256"]
    store = ArtifactStore(fresh)
    # trained through sharding=manifest on the certified ids, not through a forgotten-ids record
    assert not store.forgotten_path(EXP).exists()
    assert store.read_adapter_card(EXP, "shard-00")["config"]["sharding"]["strategy"] == "manifest"
    assert json.loads(Path(report["path"]).read_text())["all_match"]

    # a certificate that claims other adapter weights: the from-scratch model differs
    second = tmp_path / "second"  # the backbone, checked by hash, may be reused
    shutil.copytree(fresh / "backbones", second / "backbones")
    report = verify(forge(certificate, tmp_path / "forged.json", "adapter"), second)
    assert not report["all_match"]
    assert [(r["artifact"], r["match"]) for r in report["results"]][1:] == [
        ("adapter shard-00", False)
    ]


def test_cdm_verify_exits_1_with_one_line_when_a_hash_differs(certificate, tmp_path):
    """Through the command: a backbone other than the certified one stops the check (exit 1)."""
    fresh = tmp_path / "fresh"
    shutil.copytree(certificate.parents[3] / "backbones", fresh / "backbones")
    proc = verify_cli(forge(certificate, tmp_path / "forged.json", "backbone"), fresh)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "backbone" in proc.stdout and "DIFFERS" in proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cdm-verify: backbone") and "forged.json" in line


def test_verify_refuses_what_it_cannot_check(certificate, tmp_path):
    from cdm.lifecycle.verify import VerifyError

    with pytest.raises(VerifyError, match="already holds experiment 'digits_2split'.*empty folder"):
        verify(certificate, certificate.parents[3])
    with pytest.raises(VerifyError, match="does not exist"):
        verify(tmp_path / "missing.json", tmp_path / "fresh")
    cert = json.loads(certificate.read_text())
    del cert["verify"]
    (tmp_path / "old.json").write_text(json.dumps(cert))
    with pytest.raises(VerifyError, match="no 'verify' section"):
        verify(tmp_path / "old.json", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_cdm_verify_command_end_to_end(certificate, tmp_path):
    """The command as a third party runs it: exit 0 when every hash matches, 1 for a forged
    adapter hash (after retraining it), 2 for a store that is not fresh."""
    fresh = tmp_path / "fresh"
    proc = verify_cli(certificate, fresh)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[cdm] adapter shard-00: matches" in proc.stdout and "DIFFERS" not in proc.stdout
    second = tmp_path / "second"
    shutil.copytree(fresh / "backbones", second / "backbones")
    proc = verify_cli(forge(certificate, tmp_path / "forged.json", "adapter"), second)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "[cdm] adapter shard-00: DIFFERS" in proc.stdout
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cdm-verify: adapter shard-00 trained from scratch")
    proc = verify_cli(certificate, certificate.parents[3])
    assert proc.returncode == 2 and "empty folder" in proc.stderr


@pytest.mark.slow
def test_verify_checks_the_compartmental_heads_too(tmp_path):
    """A shard's head (router=compartmental) is retrained with it and verified like it."""
    certificate = train_and_forget(tmp_path / "trained", "backbone", "shard", "head")
    record = json.loads(certificate.read_text())["verify"]
    assert [a["artifact"] for a in record["artifacts"]] == ["adapter shard-00", "head shard-00"]
    report = verify(certificate, tmp_path / "fresh")
    assert report["all_match"], report["results"]
    assert [r["artifact"] for r in report["results"]][1:] == ["adapter shard-00", "head shard-00"]
