"""cdm-sample: sample from a compartmentalized diffusion model.

cdm-sample experiment=digits_4split composition=classifier
cdm-sample experiment=digits_4split composition=average shards='[0,1]'
"""

from __future__ import annotations

from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-sample", "sample")
def main(cfg: DictConfig) -> None:
    from cdm.cli.checks import check_store
    from cdm.jobs.sample import run_sampling

    check_store(cfg)  # shards=... exist, before any model is loaded
    card = run_sampling(cfg)
    print(f"[cdm] samples written to {card['path']}")


if __name__ == "__main__":
    main()
