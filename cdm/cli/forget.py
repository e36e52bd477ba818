"""cdm-forget: forget sample ids from a compartmentalized diffusion model exactly (paper App. B).

cdm-forget experiment=digits_4split forget.ids='[digits/000123,digits/000456]'
cdm-forget experiment=digits_4split forget.ids_file=ids.txt
cdm-forget experiment=digits_4split forget.source=2       # a whole source (shard 2): its adapter is deleted
cdm-forget experiment=digits_4split          # finish a request that was interrupted
"""

from __future__ import annotations

from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()


@cdm_main("cdm-forget", "forget")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.forget import run_forget

    cert = run_forget(cfg)  # a ForgetError ends in one line and exit 2 (cdm.cli.errors)
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
