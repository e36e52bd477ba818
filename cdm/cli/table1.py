"""cdm-table1: reproduce the paper's Table 1 (FD/FID of CDMs vs the paragon) from scratch or the store.

cdm-table1                                  # digits, 1/2/4/8 splits
cdm-table1 table1.datasets='[fashion]' paths.artifacts=/data/cdm
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="table1")
def main(cfg: DictConfig) -> None:
    from cdm.paper.table1 import run_table1

    # the user's overrides apply to every experiment of the table (paths, steps, debug, ...)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("table1.")]
    run_table1(cfg, overrides)


if __name__ == "__main__":
    main()
