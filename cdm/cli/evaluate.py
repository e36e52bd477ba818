"""cdm-eval: Frechet distance, KID, label accuracy and memorization of stored samples.

cdm-eval experiment=digits_4split evaluate.samples='[classifier,average]'
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    from cdm.jobs.evaluate import run_evaluation

    for card in run_evaluation(cfg):
        print(f"[cdm] evaluation written to {card['path']}")


if __name__ == "__main__":
    main()
