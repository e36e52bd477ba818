"""cdm-attribute: shard values by composition and the credit of paper eq. 6 (issue 13).

cdm-attribute experiment=digits_4split                                  # Shapley/Banzhaf/LOO + router weight + eq. 6
cdm-attribute experiment=cross_domain_2split attribution/method=credit  # eq. 6 credit and the Fig. 3 plot
"""

from __future__ import annotations

import re

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()
UNNAMED = ("paths.", "hydra", "experiment=", "attribution.name=", "progress=")


def sweep_name(name: str, overrides: list[str]) -> str:
    """``name`` plus this job's overrides (their last key segment, e.g. ``pruning_ratio=0.2``),
    so that the jobs of a multirun sweep write to separate result folders."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not override.lstrip("+~").startswith(UNNAMED):
            parts.append(f"{key.replace('/', '.').split('.')[-1]}={value}")
    suffix = re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join(parts)).replace("..", "_")
    full = f"{name}-{suffix}" if suffix else name
    if len(full) <= 128:
        return full
    from cdm.core.hashing import sha256_bytes  # noqa: PLC0415 (a bad override must not import torch)

    return f"{full[:111]}-{sha256_bytes(full.encode())[:16]}"  # still one folder per job


@cdm_main("cdm-attribute", "attribute")
def main(cfg: DictConfig) -> None:
    from cdm.attribution.composition import TABLE_FILE, run_attribution
    from cdm.cli.checks import check_store

    check_store(cfg)  # shards=... exist, before any model is loaded
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN and not any(
        o.startswith("attribution.name=") for o in hydra.overrides.task
    ):
        with open_dict(cfg):
            cfg.attribution.name = sweep_name(str(cfg.attribution.name), list(hydra.overrides.task))
    card = run_attribution(cfg)
    print(open(f"{card['path']}/{TABLE_FILE}").read())
    print(f"[cdm] attribution written to {card['path']} ({card['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
