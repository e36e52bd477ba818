"""The model sizes the benchmark scripts share: the backbone presets of ``cdm/conf/backbone`` read
without Hydra, and the command-line flags that pick one (preset, resolution, channels, batch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("tiny", "small", "base")


def backbone_conf(preset: str) -> DictConfig:
    """conf/backbone/<preset>.yaml merged over its Hydra ``defaults`` (omegaconf only)."""
    cfg = OmegaConf.load(ROOT / "cdm" / "conf" / "backbone" / f"{preset}.yaml")
    parents = [backbone_conf(d) for d in cfg.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*parents, cfg)


def add_size_args(
    p: argparse.ArgumentParser, preset: str, batch_size: int, batch_help: str | None = None
) -> None:
    """--preset, --resolution, --channels and --batch-size, with this script's defaults."""
    p.add_argument("--preset", choices=list(PRESETS), default=preset)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)


def fill_size_defaults(args: argparse.Namespace) -> None:
    """Resolution/channels left unset: 8/1 for tiny and small, 32/3 for base (its GPU size)."""
    big = args.preset == "base"
    args.resolution = args.resolution or (32 if big else 8)
    args.channels = args.channels or (3 if big else 1)
