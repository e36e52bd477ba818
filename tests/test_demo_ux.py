"""What a user of the demo sees (issue 11, items 12 and 15): a short log, quiet numerics, and a word
wherever a KID value is shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np

from cdm.eval.frechet import FeatureStats, frechet_distance, stats_from_features
from cdm.paper.table1 import format_table as table1_markdown
from cdm.store import ArtifactStore
from cdm.store.listing import format_table as listing_table
from cdm.store.stats import KID_NOTE, save_evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what the demo's log held before (issue 11 item 12): none of it may come back
NOISE = (
    "litlogger",
    "GPU available",
    "TPU available",
    "LeafSpec",
    "smaller than the logging interval",
    "singular",
    "Warning",
    "Traceback",
)
# a tqdm progress bar line: "label:  40%|####      | 2/5 [00:01<00:02, ...]"
PROGRESS = re.compile(r"\d+%\|.*\|")


def without_progress_bars(log: str) -> str:
    """The log with progress-bar redraws removed (each ``\\r`` starts a redraw)."""
    kept = []
    for line in log.replace("\r", "\n").splitlines():
        if not PROGRESS.search(line) and line.strip():
            kept.append(line)
    return "\n".join(kept)


def test_a_tiny_table1_logs_facts_only(tmp_path):
    """End to end as ``make demo`` runs it (a subprocess), debug=tiny: under 5 KB without the
    progress bars, none of the known noise, and the facts (training, the table) still there."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("PYTHONWARNINGS", None)
    cmd = [
        sys.executable, "-m", "cdm.cli.table1", "table1.name=ux", "table1.splits=[2]",
        "num_samples=8", "batch_size=8", "steps=2", "debug=tiny", "table1.n_jobs=2",
        f"paths.artifacts={tmp_path / 'art'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540, check=False
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    text = without_progress_bars(log)
    for noise in NOISE:
        assert noise not in text, f"{noise!r} is back in the demo log:\n{text}"
    assert len(text.encode()) < 5000, f"{len(text.encode())} bytes:\n{text}"
    assert "| digits |" in text and "shard-01: " in text and "samples fed" in text  # the facts stay


def test_frechet_distance_of_constant_pixels_is_quiet_and_finite():
    """Constant pixels give a singular covariance: the eps offset of clean-fid / pytorch-fid is
    used without scipy's "Matrix is singular" warning reaching the log."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    b = rng.normal(size=(50, 6))
    a[:, :3] = 0.0  # constant features (border pixels are always black)
    b[:, :3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fd = frechet_distance(stats_from_features(a), stats_from_features(b))
    assert np.isfinite(fd) and fd >= 0


def test_frechet_distance_of_a_regular_product_is_unchanged():
    """The retry only runs for a singular product: a regular one gives the formula's value."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    sa, sb = (stats_from_features(rng.normal(size=(40, 5)) * s) for s in (1.0, 2.0))
    covmean = linalg.sqrtm(sa.sigma @ sb.sigma).real  # the formula as clean-fid writes it
    diff = sa.mu - sb.mu
    expected = diff @ diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * np.trace(covmean)
    assert frechet_distance(sa, sb) == float(expected)
    assert frechet_distance(sa, FeatureStats(sa.mu, sa.sigma, sa.n)) < 1e-6


def test_kid_is_explained_once_wherever_it_is_shown(tmp_path):
    """cdm-list, the table and the evaluation card say that the unbiased KID can be negative."""
    metrics = {"FD_digits": 1.2, "KID_digits": -0.0004, "KID_digits_std": 0.001}
    store = ArtifactStore(tmp_path)
    card = save_evaluation(store, "digits_4split", "classifier", {"name": "x", "metrics": metrics})
    assert card["notes"]["KID"] == KID_NOTE and "negative" in KID_NOTE
    entries = [{"artifact": "evaluation", "kind": "evaluation", "name": "x", "metrics": metrics}]
    listed = listing_table(entries * 2)
    assert listed.count(KID_NOTE) == 1
    assert KID_NOTE not in listing_table([{**entries[0], "metrics": {"FD_digits": 1.2}}])
    cells = [{"dataset": "digits", "n": 2, "method": m, "value": -0.0004 + i,
              "metric_name": "KID_digits"} for i, m in enumerate(["classifier", "average"])]  # fmt: skip
    markdown, _ = table1_markdown(cells, [2], ["classifier", "average"])
    assert markdown.count(KID_NOTE) == 1
    fd_cells = [{**c, "metric_name": "FD_digits"} for c in cells]
    assert KID_NOTE not in table1_markdown(fd_cells, [2], ["classifier", "average"])[0]


def test_the_demo_shows_the_router_at_work_and_says_why_the_conditional_plot_is_flat():
    """Issue 11 item 14: ``make demo`` also samples the unconditional 4 shards with the router
    (their weights pick a shard, paper Fig. 3), prints that plot's path and why the class-conditional
    one is flat; every cdm-train / cdm-sample command it runs composes."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    dry = subprocess.run(
        ["make", "-n", "demo", "ART=/tmp/art", "VENV=.venv"], cwd=REPO, capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    commands = [line.split() for line in dry.splitlines() if line.startswith(".venv/bin/cdm-")]
    sample = [c for c in commands if c[0].endswith("cdm-sample")]
    assert sample and "experiment=digits_4split_uncond" in sample[0]
    assert "composition=classifier" in sample[0]
    trained = {
        a for c in commands if c[0].endswith("cdm-train") for a in c if a.startswith("stage=")
    }
    assert {"stage=backbone", "stage=shard", "stage=router"} <= trained
    assert "/tmp/art/experiments/digits_4split_uncond/samples/classifier/weights.png" in dry
    assert "flat: with by-class shards the label names the shard" in dry
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for command in commands:
            config = {"cdm-train": "train", "cdm-sample": "sample"}.get(command[0].split("/")[-1])
            if config is None:
                continue
            overrides = [a.split(",")[0] for a in command[1:] if a != "-m"]  # a sweep's first job
            cfg = compose(config, overrides=overrides)
            assert cfg.experiment_name in ("digits_4split", "digits_4split_uncond")


def test_table1_says_when_device_cuda_leaves_training_on_the_cpu():
    """device=cuda is the sampler's device: with the CPU trainer, cdm-table1 says so once."""
    from omegaconf import OmegaConf

    from cdm.paper.table1 import training_device_note

    def cfg(device: str, accelerator: str):
        return OmegaConf.create({"device": device, "trainer": {"accelerator": accelerator}})

    assert "add trainer=gpu" in training_device_note(cfg("cuda", "cpu"))
    assert "device=cuda:1" in training_device_note(cfg("cuda:1", "cpu"))
    assert training_device_note(cfg("cuda", "gpu")) is None
    assert training_device_note(cfg("cpu", "cpu")) is None
