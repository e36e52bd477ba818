"""``benchmarks/compose_step.py`` and ``benchmarks/train_step.py`` at tiny size on the CPU: the
flags the GPU run uses (benchmarks/gpu_run.sh) parse, and what the scripts check holds (no
timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def run(script: str, *args: str, out: Path) -> dict:
    cmd = [sys.executable, f"benchmarks/{script}", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())


def test_compose_step_static_topk_matches_and_profiles(tmp_path):
    result = run(
        "compose_step.py", "--preset", "tiny", "--batch-size", "4", "--shards", "1", "3",
        "--rounds", "1", "--iters", "1", "--warmup", "1", "--steps", "3", "--profile",
        out=tmp_path / "compose.json",
    )  # fmt: skip
    for n in ("1", "3"):
        row = result["results"][n]
        assert row["allclose"], row
        # k pairs per sample, padded, give the kept-pairs trajectory's x_0
        assert row["max_abs_diff_topk_static_vs_topk_x0"] < 1e-4
        assert row["topk_static"]["ms"] > 0 and 1 <= row["topk_mean_kept_per_sample"] <= 2
    assert result["config"]["methods"][-1] == "bare_nB" and result["config"]["errors"] == {}
    profile = result["results"]["profile"]
    assert profile["n"] == 3 and set(profile) == {"n", "one_adapter", "grouped", "bare_nB"}
    assert all(
        p["wall_ms"] > 0 and p["top"] and p["kernel_ms"] is None
        for k, p in profile.items()
        if k != "n"
    )


def test_train_step_unsynced_profiled_losses_agree(tmp_path):
    result = run(
        "train_step.py", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--rounds", "1", "--unsynced", "--cudnn-benchmark", "--profile",
        out=tmp_path / "train.json",
    )  # fmt: skip
    report = result["results"]
    assert report["max_abs_loss_diff"] == 0.0  # ours and the bare loop train the same weights
    assert report["ours"]["period_ms"] > 0 and report["bare"]["period_ms"] > 0
    top = [name for name, _, _ in report["profile_bare_step"]["top"]]
    assert any("convolution" in name for name in top), top
