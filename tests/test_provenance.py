"""cdm-provenance: what depends on a sample or a source, as a query over the store's cards.

A tiny digits_2split (3 SISA slices per shard) with both shards, a router, k-NN centroids, the
paragon, samples drawn from shard 0 only / both shards / the router / the paragon / shard 1's
centroids, two evaluations and a table. The expected sets are written out name by name.
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
from cdm.lifecycle.forget import run_forget
from cdm.provenance import ProvenanceError, dependents, locate, what_depends_on
from cdm.store import ArtifactStore, atomic_write_json, make_card
from tests.conftest import REPO, run_inprocess

EXP = "digits_2split"
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_slices=3"]
DRAW = ["num_samples=4", "steps=2", "progress=false"]
SAMPLES = {  # name -> overrides
    "only0": ["composition=average", "shards=[0]"],
    "both": ["composition=average"],
    "routed0": [
        "composition=classifier",
        "shards=[0]",
    ],  # shard 0's adapter, but the router saw all
    "paragon": ["composition=paragon"],
    "knn1": ["composition=knn", "shards=[1]"],
}


def compose(config: str, root: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config, overrides=[*overrides, f"paths.artifacts={root}"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from cdm.jobs.evaluate import run_evaluation
    from cdm.paper.table1 import save_table

    root = tmp_path_factory.mktemp("provenance")
    for stage in ("backbone", "shard", "router", "paragon", "knn"):
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    run_inprocess(*TINY, "stage=shard", "shard.index=1", artifacts=root)
    for name, overrides in SAMPLES.items():
        run_inprocess(*TINY, *DRAW, *overrides, f"name={name}", artifacts=root, config="sample")
    cfg = compose("eval", root, *TINY, *DRAW, "evaluate.samples=[only0,both]",
                  "evaluate.feature_spaces=[pixels]", "evaluate.kid_subsets=2",
                  "evaluate.kid_subset_size=4")  # fmt: skip
    evals = run_evaluation(cfg)
    cells = [{"dataset": "digits", "n": 2, "method": c["name"], "experiment": EXP,
              "samples": c["name"], "metrics": c["metrics"]} for c in evals]  # fmt: skip
    save_table(ArtifactStore(root), "t1", "| t1 |\n", [["t1"]],
               make_card(kind="table", name="t1", cells=cells))  # fmt: skip
    return root


def manifest(root: Path, name: str) -> Manifest:
    return Manifest.from_json(ArtifactStore(root).load_manifest(EXP, name))


def names(result: dict, key: str = "artifacts") -> set[tuple[str, str]]:
    return {(a["kind"], a["name"]) for a in result[key]}


def stats_key(root: Path) -> str:
    return f"digits-r8-private-{manifest(root, 'private').hash[:16]}"


def test_a_sample_of_shard_1_lists_exactly_what_it_fed(trained):
    store = ArtifactStore(trained)
    shard1 = manifest(trained, "shard-01")
    sid = shard1.slice_ids(1)[2]
    result = what_depends_on(store, sample_id=sid)

    assert names(result) == {
        ("adapter", "shard-01"),
        ("adapter", "paragon"),
        ("router", "router"),
        ("knn_centroids", "pixels/shard-01"),
        ("ref_stats", stats_key(trained)),  # the private reference set holds it
        ("samples", "both"),
        ("samples", "routed0"),
        ("samples", "paragon"),
        ("samples", "knn1"),
        ("evaluation", "both"),
        ("evaluation", "only0"),  # its samples did not see the id, its reference features did
        ("table", "t1"),
    }
    for absent in [("adapter", "shard-00"), ("samples", "only0"), ("knn_centroids", "pixels/shard-00")]:  # fmt: skip
        assert absent not in names(result)
    assert {a["status"] for a in result["artifacts"]} == {"served"}
    assert result["served"] == result["artifacts"] and result["deleted"] == []
    via = {(a["kind"], a["name"]): a["via"] for a in result["artifacts"]}
    assert (
        via[("adapter", "paragon")]
        == f"manifest private ({manifest(trained, 'private').hash[:12]})"
    )
    assert via[("samples", "paragon")] == "adapter paragon"
    assert via[("adapter", "shard-01")] == f"manifest shard-01 ({shard1.hash[:12]})"
    assert via[("samples", "routed0")] == "router router"
    assert (
        via[("evaluation", "only0")] == f"ref_stats pixels/{stats_key(trained)}"
    )  # its feature space
    by_kind = {(a["kind"], a["name"]): a for a in result["artifacts"]}
    card = store.read_adapter_card(EXP, "shard-01")
    assert by_kind[("adapter", "shard-01")]["hash"] == card["weights_sha256"]
    assert by_kind[("adapter", "shard-01")]["path"] == str(store.adapter_dir(EXP, "shard-01"))

    # where it is: shard 1 and the private manifest, with the manifests' slice and content hash
    where = {loc["manifest"]: loc for loc in locate(store, sid)}
    assert sorted(where) == ["private", "shard-01"]
    loc = where["shard-01"]
    assert (loc["experiment"], loc["shard"], loc["slice"]) == (EXP, 1, shard1.slice_of(sid))
    assert loc["slice"] == 1
    assert loc["content_hash"] == shard1.content_hashes[shard1.ids.index(sid)]
    assert loc["manifest_hash"] == shard1.hash and not loc["forgotten"]
    private = manifest(trained, "private")
    assert where["private"]["slice"] == private.slice_of(sid)
    assert where["private"]["shard"] is None
    assert result["locations"] == locate(store, sid)


def test_a_source_query_lists_what_shard_0_fed(trained):
    result = what_depends_on(ArtifactStore(trained), source="shard-00")
    assert names(result) == {
        ("adapter", "shard-00"),
        ("adapter", "paragon"),
        ("router", "router"),
        ("knn_centroids", "pixels/shard-00"),
        ("ref_stats", stats_key(trained)),
        ("samples", "only0"),
        ("samples", "both"),
        ("samples", "routed0"),
        ("samples", "paragon"),
        ("evaluation", "only0"),
        ("evaluation", "both"),
        ("table", "t1"),
    }
    assert [(loc["manifest"], loc["shard"]) for loc in result["locations"]] == [("shard-00", 0)]
    assert result["locations"][0]["n_samples"] == len(manifest(trained, "shard-00"))
    # dependents() of the same manifest is the same list
    assert dependents(trained, EXP, ["shard-00"]) == result["artifacts"]


def test_after_forgetting_nothing_derived_from_the_id_is_served(trained, tmp_path):
    root = Path(shutil.copytree(trained, tmp_path / "artifacts"))
    store = ArtifactStore(root)
    old1 = manifest(root, "shard-01")
    sid, other = old1.slice_ids(1)[2], old1.slice_ids(2)[0]
    before = {(a["kind"], a["name"]) for a in what_depends_on(store, sample_id=sid)["artifacts"]}
    cert = run_forget(compose("forget", root, f"experiment={EXP}", f"forget.ids=[{sid}]",
                              "forget.retrain_router=false"))  # fmt: skip

    result = what_depends_on(store, sample_id=sid)
    assert result["served"] == []
    status = {(a["kind"], a["name"]): a["status"] for a in result["artifacts"]}
    assert status == {
        ("adapter", "paragon"): "stale",  # trained on the old private manifest, refused on load
        ("router", "router"): "stale",  # forget.retrain_router=false
        ("ref_stats", stats_key(trained)): "quarantined",
        ("samples", "both"): "quarantined",
        ("samples", "routed0"): "quarantined",
        ("samples", "paragon"): "quarantined",
        ("samples", "knn1"): "quarantined",
        ("evaluation", "both"): "quarantined",
        ("evaluation", "only0"): "stale",  # its reference features were set aside
        ("table", "t1"): "stale",
    }
    assert set(status) == before - {("adapter", "shard-01"), ("knn_centroids", "pixels/shard-01")}
    quarantine = store.forget_dir(EXP) / "quarantine" / cert["name"]
    paths = {a["name"]: a["path"] for a in result["artifacts"] if a["kind"] == "samples"}
    assert paths["both"] == str(quarantine / "samples" / "both")
    # the replaced adapter and centroids are gone, known by their certificate's hashes
    gone = {(d["kind"], d["name"]): d["hash"] for d in result["deleted"]}
    assert gone == {
        ("adapter", "shard-01"): cert["retrained"][0]["old_weights_sha256"],
        ("knn_centroids", "pixels/shard-01"): cert["knn_centroids"][0]["old_weights_sha256"],
    }
    # where it was: forgotten by this certificate, with its old slice and content hash
    [loc] = result["locations"]
    assert loc["forgotten"] and loc["certificate"] == cert["path"]
    assert (loc["manifest"], loc["shard"], loc["slice"]) == ("shard-01", 1, 1)
    assert loc["content_hash"] == old1.content_hashes[old1.ids.index(sid)]
    assert loc["manifest_hash"] == old1.hash

    # another id of shard 1: the retrained adapter (served) and, through the certificate's
    # old -> new manifest hashes, everything that was trained on the old shard 1 too
    result = what_depends_on(store, sample_id=other)
    status = {(a["kind"], a["name"]): a["status"] for a in result["artifacts"]}
    assert status[("adapter", "shard-01")] == "served"
    assert status[("knn_centroids", "pixels/shard-01")] == "served"
    assert (
        status[("adapter", "paragon")] == "stale" and status[("samples", "both")] == "quarantined"
    )
    assert ("adapter", "shard-00") not in status and ("samples", "only0") not in status


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"sample_id": "digits/999999"}, r"in no manifest .*experiments/<experiment>/manifests"),
        ({}, "exactly one of a sample id"),
        ({"sample_id": "x", "source": "shard-00"}, "exactly one of a sample id"),
        ({"source": "alice"}, "no shard manifest or source named 'alice'.*shard-00"),
        ({"sample_id": "digits/000001", "experiment": "nope"}, "no experiment 'nope'"),
    ],
)
def test_bad_queries_are_refused_clearly(trained, query, message):
    with pytest.raises(ProvenanceError, match=message):
        what_depends_on(ArtifactStore(trained), **query)


def test_feature_nets_removed_sources_and_shard_gaps(tmp_path):
    """Cards only: a feature net trained on the dataset's train split, reference features made
    with it, shards 00 and 03 (a gap), and shard-02 forgotten as a whole source."""
    store = ArtifactStore(tmp_path)
    ids = {n: [f"digits/{i:06d}" for i in range(k, k + 4)] for n, k in [("shard-00", 0), ("shard-03", 10)]}  # fmt: skip
    meta = {"dataset": "digits", "split": "train"}
    for name, sids in [*ids.items(), ("private", ids["shard-00"] + ids["shard-03"])]:
        store.save_manifest(EXP, {"name": name, "hash": f"h-{name}", "classes": [0],
                                  "slices": [[0, 2], [2, len(sids)]], "meta": meta, "ids": sids,
                                  "content_hashes": ["c"] * len(sids)})  # fmt: skip
    net = tmp_path / "feature_nets" / "digits-r8-seed0"
    net.mkdir(parents=True)
    (net / "card.json").write_text(json.dumps({"kind": "feature_net", "name": net.name,
                                               "dataset": "digits", "split": "train",
                                               "weights_sha256": "f" * 64}))  # fmt: skip
    ref = tmp_path / "stats" / "domain" / ("digits-r8-test-" + "0" * 16)
    ref.mkdir(parents=True)
    (ref / "card.json").write_text(json.dumps({"kind": "ref_stats", "name": ref.name,
        "ids_hash": "t", "weights_sha256": "r" * 64,
        "parents": [{"kind": "feature_net", "name": net.name, "hash": "f" * 64}]}))  # fmt: skip
    atomic_write_json(store.experiment_dir(EXP) / "sources.json", {"added": [], "removed": [
        {"job": "shard-02", "source": "carol", "manifest_hash": "h-shard-02", "certificate": "c1"}]})  # fmt: skip
    router = store.experiment_dir(EXP) / "router"
    router.mkdir(parents=True)
    (router / "card.json").write_text(json.dumps({"kind": "router", "weights_sha256": "w" * 64,
        "shard_manifests": [{"name": "shard-00", "hash": "h-shard-00"},
                            {"name": "shard-02", "hash": "h-shard-02"}]}))  # fmt: skip

    result = what_depends_on(store, sample_id="digits/000011")
    assert [(loc["manifest"], loc["shard"], loc["slice"]) for loc in result["locations"]] == [
        ("private", None, 1),
        ("shard-03", 3, 0),
    ]
    got = {(a["kind"], a["name"]): a for a in result["artifacts"]}
    assert set(got) == {("feature_net", net.name), ("ref_stats", ref.name)}
    assert got[("feature_net", net.name)]["via"] == "trained on the dataset's train split (digits)"
    assert got[("ref_stats", ref.name)]["via"] == f"feature_net {net.name}"
    # the removed source carol is found by name; the router trained with it is stale
    result = what_depends_on(store, source="carol")
    assert result["locations"][0]["forgotten"] and result["locations"][0]["manifest"] == "shard-02"
    router_entry = next(a for a in result["artifacts"] if a["kind"] == "router")
    if hasattr(store, "read_sources"):  # the store refuses routers of forgotten sources
        assert router_entry["status"] == "stale" and router_entry["reason"]


def test_cli_prints_the_ledger_and_writes_json(trained, tmp_path):
    sid = manifest(trained, "shard-01").slice_ids(0)[0]
    expected = what_depends_on(ArtifactStore(trained), sample_id=sid)
    out = tmp_path / "ledger.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cdm.cli.provenance", f"provenance.sample={sid}",
           f"provenance.json={out}", f"paths.artifacts={trained}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(expected["artifacts"])
    assert f"{n} artifacts derived from {sid}, {n} still served" in proc.stdout
    assert "adapter        digits_2split/shard-01" in proc.stdout
    assert json.loads(out.read_text())["artifacts"] == expected["artifacts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ledger.json"
    ]  # a query writes nothing else

    bad = subprocess.run([*cmd[:3], "provenance.sample=digits/999999", f"paths.artifacts={trained}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "manifests/*.json" in bad.stderr


def test_provenance_config_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cdm.jobs.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose("provenance", overrides=["provenance.source=shard-03"])
    assert cfg.provenance.source == "shard-03" and cfg.provenance.sample is None
    assert cfg.provenance.json is None and cfg.experiment_name is None
    assert cfg.paths.artifacts
    assert (REPO / "cdm" / "conf" / "provenance.yaml").is_file()


def test_rows_say_what_tells_them_apart_and_replaced_samples_are_not_called_gone(trained, tmp_path):
    """Issue 11 item 15: one reference set has statistics per feature space (each row names its
    space), and an evaluation whose samples were redrawn under the same name says so."""
    from cdm.provenance import format_report

    root = Path(shutil.copytree(trained, tmp_path / "artifacts"))
    key = stats_key(root)
    other = root / "stats" / "other_space" / key
    shutil.copytree(root / "stats" / "pixels" / key, other)
    card = json.loads((other / "card.json").read_text())
    (other / "card.json").write_text(json.dumps({**card, "feature_space": "other_space"}))
    samples = ArtifactStore(root).samples_dir(EXP, "both") / "card.json"
    card = json.loads(samples.read_text())  # a newer run drew "both" again with other settings
    card["files"]["samples.npz"] = "f" * 64
    samples.write_text(json.dumps(card))

    sid = manifest(root, "shard-01").slice_ids(0)[0]
    result = what_depends_on(ArtifactStore(root), sample_id=sid)
    stats = [a for a in result["artifacts"] if a["kind"] == "ref_stats"]
    assert sorted(a["feature_space"] for a in stats) == ["other_space", "pixels"]
    report = format_report(result)
    rows = [line for line in report.splitlines() if line.startswith("ref_stats")]
    assert len(rows) == 2 and len({r.split()[1] for r in rows}) == 2, report
    assert f"pixels/{key}" in report and f"other_space/{key}" in report

    evaluation = next(a for a in result["artifacts"] if a["kind"] == "evaluation" and a["name"] == "both")  # fmt: skip
    assert evaluation["status"] == "stale"
    assert "replaced by a newer run (ffffffffffff" in evaluation["reason"], evaluation["reason"]
    assert "no longer in the store" not in evaluation["reason"]
    assert f"stale: evaluation {EXP}/both: its parent samples both" in report
