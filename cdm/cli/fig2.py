"""cdm-fig2: the paper's Fig. 2 (relative FD/FID change as shards are added one by one; read right
to left, as they are forgotten) for the classifier router vs naive averaging.

cdm-fig2                                             # digits_8split, 500 samples per model
cdm-fig2 fig2.experiment=digits_4split num_samples=200 paths.artifacts=/data/cdm
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-fig2", "fig2")
def main(cfg: DictConfig) -> None:
    from cdm.paper.fig2 import run_fig2

    # the user's overrides apply to every job of the sweep (paths, steps, debug, ...)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("fig2.")]
    run_fig2(cfg, overrides)


if __name__ == "__main__":
    main()
