"""cdm-train: train one job of a compartmentalized diffusion model.

cdm-train experiment=digits_4split stage=backbone
cdm-train -m experiment=digits_4split stage=shard shard.index=0,1,2,3 [hydra/launcher=joblib]
cdm-train experiment=digits_4split stage=router router=backbone_head

``stage=`` chooses ``conf/stage/<stage>.yaml``, whose ``job`` (a ``_target_``) is what runs.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    from cdm.jobs.run import run_job
    from cdm.store import format_table

    result = run_job(cfg)
    cards = result if isinstance(result, list) else [result]
    if cards:
        print(format_table(cards))


if __name__ == "__main__":
    main()
