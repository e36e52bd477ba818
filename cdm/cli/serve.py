"""cdm-serve: serve users only the shards their access policy allows (an HTTP service).

cdm-serve add-user alice serve.policy=policy.yaml serve.sources='[shard-00]'   # prints a token once
cdm-serve experiment=digits_4split serve.policy=policy.yaml serve.port=8000     # the service
cdm-serve experiment=digits_4split serve.policy=policy.yaml serve.once=true serve.user=alice
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from cdm.cli.errors import USER_ERROR_EXIT, cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()
ADD_USER = "add-user"


@cdm_main("cdm-serve", "serve")
def main_task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from cdm.lifecycle import serving

    sources = cfg.serve.sources
    if sources is not None:
        sources = OmegaConf.to_container(sources) if OmegaConf.is_list(sources) else [sources]
    if cfg.serve.add_user is not None:
        token = serving.add_user(str(cfg.serve.policy), str(cfg.serve.add_user), sources)
        print(f"[cdm] user {cfg.serve.add_user!r} in {cfg.serve.policy}; their token (shown once):")
        print(token)
        return
    if cfg.serve.once:
        if cfg.serve.user is None:
            raise ValueError("serve.once=true answers one user's request: pass serve.user=NAME")
        # a refusal (AccessDenied, PolicyError) is an answer, not a crash: it is audited, then
        # ends in one line and exit 2 (cdm.cli.errors)
        card = serving.serve(cfg, str(cfg.serve.user), sources)
        print(f"[cdm] samples for {cfg.serve.user!r} (shards {card['shards']}) written to {card['path']}")  # fmt: skip
        return
    if cfg.serve.user is not None or sources is not None:
        raise ValueError(
            "the service knows users by their bearer token and sources by request: drop "
            "serve.user/serve.sources, or pass serve.once=true for one request now"
        )
    from cdm.lifecycle.service import run_service, variant_configs

    configs = variant_configs(cfg, list(HydraConfig.get().overrides.task))
    print(f"[cdm] serving {cfg.experiment_name!r} on http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.api_path}", flush=True)  # fmt: skip
    run_service(cfg, configs)


def main() -> None:
    """``cdm-serve add-user NAME ...`` is ``cdm-serve serve.add_user=NAME ...``."""
    if sys.argv[1:2] == [ADD_USER]:
        if len(sys.argv) < 3 or "=" in sys.argv[2]:
            print(f"cdm-serve: usage: cdm-serve {ADD_USER} NAME serve.policy=PATH serve.sources='[...]'", file=sys.stderr)  # fmt: skip
            sys.exit(USER_ERROR_EXIT)
        sys.argv[1:3] = [f"serve.add_user={sys.argv[2]}"]
    main_task()


if __name__ == "__main__":
    main()
