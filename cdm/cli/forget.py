"""cdm-forget: forget sample ids from a compartmentalized diffusion model exactly (paper App. B).

cdm-forget experiment=digits_4split forget.ids='[digits/000123,digits/000456]'
cdm-forget experiment=digits_4split forget.ids_file=ids.txt
cdm-forget experiment=digits_4split forget.source=2       # a whole source (shard 2): its adapter is deleted
cdm-forget experiment=digits_4split          # finish a request that was interrupted
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from cdm.jobs.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="forget")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.forget import ForgetError, run_forget

    try:
        cert = run_forget(cfg)
    except ForgetError as err:
        print(f"cdm-forget: {err}", file=sys.stderr)
        sys.exit(2)
    retrained = [r["artifact"] for r in cert["retrained"] if r.get("action") == "retrained"]
    retrained += [r["artifact"] for r in cert.get("routers", []) if r.get("action") == "retrained"]
    if "source" in cert["request"]:
        deleted = [d["artifact"] for d in cert.get("deleted", [])]
        print(
            f"[cdm] forgot source {cert['request']['source']!r} ({cert['request']['shard']}, "
            f"{cert['request']['n_ids']} samples); deleted {', '.join(deleted)}"
        )
    else:
        print(f"[cdm] forgot {cert['request']['n_ids']} ids")
    print(f"[cdm] retrained {', '.join(retrained) or 'nothing'}")
    for record in cert.get("stale", []):
        print(f"[cdm] stale until retrained: {record['artifact']}  ({record['rebuild']})")
    print(f"[cdm] certificate: {cert['path']}")


if __name__ == "__main__":
    main()
