"""cdm-serve: sample for a user from only the shards their access policy allows.

cdm-serve experiment=digits_4split serve.user=alice serve.policy=policy.yaml
cdm-serve experiment=digits_4split serve.user=alice serve.policy=policy.yaml serve.sources='[shard-00]'
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="serve")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.serving import AccessDenied, PolicyError, serve

    sources = cfg.serve.sources
    if sources is not None:
        sources = OmegaConf.to_container(sources) if OmegaConf.is_list(sources) else [sources]
    try:
        card = serve(cfg, str(cfg.serve.user), sources)
    except (
        AccessDenied,
        PolicyError,
    ) as exc:  # a refusal is an answer, not a crash (it is audited)
        sys.exit(f"[cdm] {exc}")
    print(
        f"[cdm] samples for {cfg.serve.user!r} (shards {card['shards']}) written to {card['path']}"
    )


if __name__ == "__main__":
    main()
