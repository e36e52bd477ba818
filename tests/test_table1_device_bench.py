"""``benchmarks/table1_device.py``: cdm-table1 end to end with a time per stage (issue 16, goal 4).

One tiny CPU run (8x8 grey images, 4 classes, 2 shards, one epoch per stage, 8 samples of 2
steps) checks what the GPU run will rely on: every stage is timed, the stage times fit in the
run's wall time, the jobs' own times fit in their stages, and the Table 1 in the JSON is the one
the store holds. ``--compare`` and the argument checks run on hand-made JSONs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.table1_device import compare

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "table1_device.py"
TINY = [
    "--backbone", "tiny", "--train-images", "120", "--test-images", "20", "--classes", "4",
    "--resolution", "8", "--channels", "1", "--splits", "2",
    "--compositions", "classifier", "compartmental", "average",
    "--backbone-epochs", "1", "--shard-epochs", "1", "--router-epochs", "1",
    "--feature-net-epochs", "1", "--num-samples", "8", "--batch-size", "8", "--steps", "2",
    "--threads", "1",
]  # fmt: skip
EXPECTED = {
    "train_backbone", "train_shard", "train_router", "train_head", "train_paragon",
    "train_feature_net", "sample_paragon", "sample_classifier", "sample_compartmental",
    "sample_average", "evaluate",
}  # fmt: skip


def script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    """The tiny CPU run: (its JSON, its kept artifacts folder)."""
    tmp = tmp_path_factory.mktemp("table1_device")
    out, artifacts = tmp / "table1-cpu.json", tmp / "artifacts"
    proc = script(*TINY, "--artifacts", str(artifacts), "--out", str(out))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "total" in proc.stdout and f"wrote {out}" in proc.stdout
    return json.loads(out.read_text()), artifacts


def test_every_stage_is_timed_and_the_times_add_up(tiny_run):
    result, _ = tiny_run
    res = result["results"]
    assert "error" not in res
    assert set(res["stages"]) == EXPECTED
    assert all(s > 0 for s in res["stages"].values()), res["stages"]
    assert sum(res["stages"].values()) <= res["total_s"] <= result["wall_s"]
    assert res["other_s"] >= 0
    # each job's own wall time (its card) lies inside the span of its stage (jobs run one at a time)
    assert set(res["card_wall_time_s"]) == EXPECTED
    for stage, inside in res["card_wall_time_s"].items():
        assert 0 < inside <= res["stages"][stage] + 0.01, stage
    # the recorded calls are what the stages sum
    assert sum(c["s"] for c in res["calls"]) == pytest.approx(sum(res["stages"].values()), abs=0.01)
    assert result["config"]["device"] == "cpu" and result["machine"]["cpu_count"] >= 1


def test_the_table_in_the_json_is_the_one_in_the_store(tiny_run):
    result, artifacts = tiny_run
    table = artifacts / "store" / "tables" / "bench-cpu"
    with open(table / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    res = result["results"]
    assert res["table"]["rows"] == rows
    assert rows[0] == ["Dataset", "No split: Paragon", "2-Splits: Classifier",
                       "2-Splits: Compartmental", "2-Splits: Naive Avg"]  # fmt: skip
    assert rows[1][0] == "randcifar" and "-" not in rows[1][1:]
    card = json.loads((table / "card.json").read_text())
    stored = [(c["experiment"], c["n"], c["method"], c["value"]) for c in card["cells"]]
    assert [
        (c["experiment"], c["n"], c["method"], c["value"]) for c in res["table"]["cells"]
    ] == stored
    # each cell's samples were drawn in a timed stage and stored with a card of this run
    methods = {c["method"] for c in card["cells"]}
    assert methods == {"paragon", "classifier", "compartmental", "average"}
    assert {f"sample_{m}" for m in methods} <= set(res["stages"])
    samples = {c["name"] for c in res["cards"] if c["kind"] == "samples"}
    assert samples == methods
    # trained models: two shards, two heads, one of everything else
    kinds = [c["kind"] for c in res["cards"] if c["stage"] and c["stage"].startswith("train_")]
    assert sorted(kinds) == sorted(["backbone", "shard", "shard", "head", "head", "router",
                                    "paragon", "feature_net"])  # fmt: skip
    # trained with the default (CPU) trainer, drawn on the CPU without CUDA graphs
    trained = [c for c in res["cards"] if c["stage"] and c["stage"].startswith("train_")]
    assert len(trained) == 8 and {c["accelerator"] for c in trained} == {"cpu"}
    drawn = [c for c in res["cards"] if c["kind"] == "samples"]
    assert {(c["sample_device"], c["cuda_graph"]) for c in drawn} == {("cpu", False)}
    assert all(c["evaluated_pairs_per_sample_step"] >= 1 for c in drawn)


def fake(path: Path, device: str, stages: dict[str, float], total: float) -> Path:
    path.write_text(json.dumps({"config": {"device": device},
                                "results": {"stages": stages, "total_s": total, "other_s": 1.0}}))  # fmt: skip
    return path


def test_compare_gives_per_stage_ratios(tmp_path):
    gpu = fake(tmp_path / "gpu.json", "cuda", {"train_shard": 3.0, "sample_average": 0.5,
                                               "train_head": 2.0}, 10.0)  # fmt: skip
    cpu = fake(tmp_path / "cpu.json", "cpu", {"train_shard": 12.0, "sample_average": 4.0,
                                              "evaluate": 5.0}, 40.0)  # fmt: skip
    ratios = compare(json.loads(gpu.read_text()), json.loads(cpu.read_text()))
    assert ratios == {
        "train_shard": {"this_s": 3.0, "other_s": 12.0, "ratio": 0.25},
        "sample_average": {"this_s": 0.5, "other_s": 4.0, "ratio": 0.125},
        "train_head": {"this_s": 2.0, "other_s": None, "ratio": None},
        "total": {"this_s": 10.0, "other_s": 40.0, "ratio": 0.25},
        "evaluate": {"this_s": None, "other_s": 5.0, "ratio": None},
    }
    proc = script("--load", str(gpu), "--compare", str(cpu), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert lines["stage"] == ["stage", "cuda", "s", "in", "jobs", "s", "cpu", "s", "ratio"]
    assert lines["train_shard"][-2:] == ["12.0", "0.250"]
    assert lines["sample_average"][-2:] == ["4.0", "0.125"]
    assert lines["train_head"][-2:] == ["-", "-"] and lines["total"][-1] == "0.250"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--splits", "0"], "--splits [0]: each must be in 1..--classes=10"),
        (["--splits", "2", "--classes", "4", "--train-images", "8"], "need at least 4 train"),
        (["--steps", "0"], "--steps=0: must be >= 1"),
        (["--resolution", "30"], "--resolution=30: must be a multiple of 4"),
        (["--set", "table1.splits=[1]"], "--set 'table1.splits=[1]'"),
        (["--compare", "nowhere.json"], "--compare nowhere.json: no such file"),
        (["--backbone", "huge"], "invalid choice: 'huge'"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    proc = script(*args, "--out", "/dev/null", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_a_json_that_is_not_ours_is_refused(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"results": {}}')
    proc = script("--load", str(other), timeout=120)
    assert proc.returncode == 2 and "no results.stages" in proc.stderr


def test_cuda_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    proc = script("--device", "cuda", "--out", "/dev/null", timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--device cuda: no CUDA device on this machine" in proc.stderr
