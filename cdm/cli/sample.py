"""cdm-sample: sample from a compartmentalized diffusion model.

cdm-sample experiment=digits_4split composition=classifier
cdm-sample experiment=digits_4split composition=average shards='[0,1]'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sample")
def main(cfg: DictConfig) -> None:
    from cdm.jobs.sample import run_sampling

    card = run_sampling(cfg)
    print(f"[cdm] samples written to {card['path']}")


if __name__ == "__main__":
    main()
