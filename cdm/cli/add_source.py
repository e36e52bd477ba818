"""cdm-add-source: add a new data source to a compartmentalized diffusion model (paper Sec. 5).

cdm-add-source experiment=digits_4split source.name=batch5 source.path=new_batch.npz
cdm-add-source experiment=digits_4split source.name=batch5 source.path=new_batch.npz   # again: finish an interrupted run
"""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-add-source", "add_source")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.add_source import run_add_source

    # an AddSourceError or ForgetError ends in one line and exit 2 (cdm.cli.errors)
    record = run_add_source(cfg, list(HydraConfig.get().overrides.task))
    for r in record["routers"]:
        print(f"[cdm] router: {r['artifact']} {r['action']}")
    for r in record["stale"]:
        print(f"[cdm] stale until retrained: {r['artifact']}  ({r['rebuild']})")
    if "samples" in record:
        print(f"[cdm] composed {record['samples']['shards']}: {record['samples']['path']}/grid.png")


if __name__ == "__main__":
    main()
