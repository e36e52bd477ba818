"""Where the shipped Hydra configs live, and the resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_resolvers() -> None:
    """``${job_name:stage,index}`` -> ``backbone`` | ``paragon`` | ``shard-03``."""
    from cdm.core.names import job_name

    if not OmegaConf.has_resolver("job_name"):
        OmegaConf.register_new_resolver("job_name", lambda stage, index: job_name(stage, index))


def config_dir() -> str:
    """Absolute path of the shipped configs, ``cdm/conf`` (package data: editable or not)."""
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise FileNotFoundError(
            f"cdm's configs are not at {CONFIG_DIR}: the installation is incomplete; reinstall "
            "cdm (`make install`, or `pip install .` from its checkout)"
        )
    return str(CONFIG_DIR)
