"""cdm-table1: reproduce the paper's Table 1 (FD/FID of CDMs vs the paragon) from scratch or the store.

cdm-table1                                  # digits, 1/2/4/8 splits
cdm-table1 table1.datasets='[fashion]' paths.artifacts=/data/cdm
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-table1", "table1")
def main(cfg: DictConfig) -> None:
    from cdm.paper.table1 import run_table1

    # the user's overrides apply to every experiment of the table (paths, steps, debug, ...)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("table1.")]
    run_table1(cfg, overrides)


if __name__ == "__main__":
    main()
