"""Shared test setup: offline, pinned threads, helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["PYTHONHASHSEED"] = "0"

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, artifacts: Path, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m cdm.cli.train`` with overrides in a fresh process (as a user would)."""
    env = {**os.environ, "CDM_ARTIFACTS": str(artifacts), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cdm.cli.train", *args, f"paths.artifacts={artifacts}",
           f"hydra.run.dir={artifacts}/hydra-run", f"hydra.sweep.dir={artifacts}/hydra-sweep"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def cli():
    return run_cli


def run_inprocess(*overrides: str, artifacts: Path) -> dict | None:
    """Compose ``conf/train.yaml`` with overrides and run the job in this process (fast path)."""
    from hydra import compose, initialize_config_dir

    from cdm.cli.config import config_dir, register_resolvers
    from cdm.training import run_job

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.artifacts={artifacts}"])
    return run_job(cfg)


@pytest.fixture
def train():
    return run_inprocess
