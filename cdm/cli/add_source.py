"""cdm-add-source: add a new data source to a compartmentalized diffusion model (paper Sec. 5).

cdm-add-source experiment=digits_4split source.name=batch5 source.path=new_batch.npz
cdm-add-source experiment=digits_4split source.name=batch5 source.path=new_batch.npz   # again: finish an interrupted run
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="add_source")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.add_source import AddSourceError, run_add_source
    from cdm.lifecycle.journal import ForgetError

    try:
        record = run_add_source(cfg, list(HydraConfig.get().overrides.task))
    except (AddSourceError, ForgetError) as err:
        print(f"cdm-add-source: {err}", file=sys.stderr)
        sys.exit(2)
    for r in record["routers"]:
        print(f"[cdm] router: {r['artifact']} {r['action']}")
    for r in record["stale"]:
        print(f"[cdm] stale until retrained: {r['artifact']}  ({r['rebuild']})")
    if "samples" in record:
        print(f"[cdm] composed {record['samples']['shards']}: {record['samples']['path']}/grid.png")


if __name__ == "__main__":
    main()
