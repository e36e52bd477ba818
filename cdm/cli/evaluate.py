"""cdm-eval: Frechet distance, KID, label accuracy and memorization of stored samples.

cdm-eval experiment=digits_4split evaluate.samples='[classifier,average]'
"""

from __future__ import annotations

from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-eval", "eval")
def main(cfg: DictConfig) -> None:
    from cdm.jobs.evaluate import run_evaluation
    from cdm.store import ArtifactStore
    from cdm.store.samples import read_samples_file

    store = ArtifactStore(cfg.paths.artifacts)
    for (
        name
    ) in cfg.evaluate.samples:  # every samples artifact exists, before any statistic is cached
        read_samples_file(store, str(cfg.experiment_name), str(name))
    for card in run_evaluation(cfg):
        print(f"[cdm] evaluation written to {card['path']}")


if __name__ == "__main__":
    main()
