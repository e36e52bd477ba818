"""cdm-train: train one job of a compartmentalized diffusion model.

cdm-train experiment=digits_4split stage=backbone
cdm-train -m experiment=digits_4split stage=shard shard.index=0,1,2,3 [hydra/launcher=joblib]
cdm-train experiment=digits_4split stage=router router=backbone_head

``stage=`` chooses ``conf/stage/<stage>.yaml``, whose ``job`` (a ``_target_``) is what runs.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-train", "train")
def main(cfg: DictConfig) -> None:
    from cdm.jobs.run import run_job
    from cdm.store.listing import summary_line

    result = run_job(cfg)
    for card in result if isinstance(result, list) else [result]:
        print(f"[cdm] {summary_line(card)}")  # every artifact in full: cdm-list


if __name__ == "__main__":
    main()
