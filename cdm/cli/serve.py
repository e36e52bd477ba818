"""cdm-serve: sample for a user from only the shards their access policy allows.

cdm-serve experiment=digits_4split serve.user=alice serve.policy=policy.yaml
cdm-serve experiment=digits_4split serve.user=alice serve.policy=policy.yaml serve.sources='[shard-00]'
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-serve", "serve")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.serving import serve

    sources = cfg.serve.sources
    if sources is not None:
        sources = OmegaConf.to_container(sources) if OmegaConf.is_list(sources) else [sources]
    # a refusal (AccessDenied, PolicyError) is an answer, not a crash: it is audited, then ends
    # in one line and exit 2 (cdm.cli.errors)
    card = serve(cfg, str(cfg.serve.user), sources)
    print(
        f"[cdm] samples for {cfg.serve.user!r} (shards {card['shards']}) written to {card['path']}"
    )


if __name__ == "__main__":
    main()
