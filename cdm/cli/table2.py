"""cdm-table2: the paper's Table 2 (prompt alignment as TIFA-domain, and FD, of text-to-image CDMs
vs the paragon and the base model) on the embedded captioned canvases, from scratch or the store.

cdm-table2                                            # experiment=captioned_3band
cdm-table2 table2.compositions='[classifier,knn,average,random]' paths.artifacts=/data/cdm
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-table2", "table2")
def main(cfg: DictConfig) -> None:
    from cdm.paper.table2 import run_table2

    # every job of the table gets the user's overrides (paths, steps, guidance_scale, debug, ...)
    task = HydraConfig.get().overrides.task
    run_table2(cfg, [o for o in task if not o.startswith("table2.")])


if __name__ == "__main__":
    main()
