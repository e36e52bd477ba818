"""cdm-attribute: shard values by composition and the credit of paper eq. 6 (issue 13).

cdm-attribute experiment=digits_4split                                  # Shapley/Banzhaf/LOO + router weight + eq. 6
cdm-attribute experiment=cross_domain_2split attribution/method=credit  # eq. 6 credit and the Fig. 3 plot
"""

from __future__ import annotations

from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-attribute", "attribute")
def main(cfg: DictConfig) -> None:
    from cdm.attribution.composition import TABLE_FILE, run_attribution
    from cdm.cli.checks import check_store

    check_store(cfg)  # shards=... exist, before any model is loaded
    card = run_attribution(cfg)
    print(open(f"{card['path']}/{TABLE_FILE}").read())
    print(f"[cdm] attribution written to {card['path']} ({card['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
