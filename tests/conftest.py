"""Shared test setup: offline, pinned threads, helpers to run the CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

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


def run_inprocess(*overrides: str, artifacts: Path, config: str = "train"):
    """Compose ``conf/<config>.yaml`` with overrides and run it in this process (fast path):
    a training job, ``sample`` (cdm-sample) or ``forget`` (cdm-forget)."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.jobs.run import run_job
    from cdm.jobs.sample import run_sampling
    from cdm.lifecycle.forget import run_forget

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name=config, overrides=[*overrides, f"paths.artifacts={artifacts}"])
    run = {"sample": run_sampling, "forget": run_forget}.get(config, run_job)
    return run(cfg)


@pytest.fixture(scope="module")
def tiny_digits_backbone(tmp_path_factory) -> Path:
    """A store holding a tiny safe backbone for digits (trained once per test module)."""
    root = tmp_path_factory.mktemp("artifacts")
    run_inprocess("experiment=digits_4split", "debug=tiny", "stage=backbone", artifacts=root)
    return root


@pytest.fixture
def train():
    return run_inprocess


TINY_ATTN_UNET = {
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


@pytest.fixture(scope="session")
def lora_shards(tmp_path_factory):
    """A tiny class-conditional UNet and 3 peft LoRA folders (different ranks and targets, random factors)."""
    from peft import LoraConfig, get_peft_model

    from cdm.models.backbone import build_unet

    torch.manual_seed(0)
    base = build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10)
    dirs = []
    targets = [
        ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        ["to_q", "conv1"],
        ["to_v", "conv2", "conv1"],
    ]
    for k, (rank, target) in enumerate(zip([4, 2, 8], targets, strict=True)):
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target)
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(
                        0,
                        0.2,
                        generator=torch.Generator().manual_seed(zlib.crc32(f"{k}{name}".encode())),
                    )
        d = tmp_path_factory.mktemp(f"shard{k}")
        model.save_pretrained(d)
        dirs.append(d)
    return base, dirs


# Test files that take minutes (the README's commands, every CLI error) run first, so that under
# `make test`'s pytest-xdist (--dist loadfile) they do not become the tail of the run.
HEAVY_FILES = (
    "test_readme.py",
    "test_cli_errors.py",
    "test_table1_user_data.py",
    "test_demo_ux.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))
