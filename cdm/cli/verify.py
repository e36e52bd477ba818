"""cdm-verify: check a forget certificate by training its models from scratch (anyone can).

cdm-verify verify.certificate=artifacts/experiments/digits_4split/certificates/<tag>.json \
    paths.artifacts=/tmp/fresh-store
Exit 0: every weight hash matches the certificate; 1: one differs (one line on stderr);
2: a user error (no such certificate, a store that is not empty, ...).
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from cdm.cli.errors import cdm_main
from cdm.jobs.config import register_resolvers

register_resolvers()

MISMATCH_EXIT = 1


@cdm_main("cdm-verify", "verify")
def main(cfg: DictConfig) -> None:
    from cdm.lifecycle.verify import run_verify

    report = run_verify(cfg)  # a VerifyError ends in one line and exit 2 (cdm.cli.errors)
    for r in report["results"]:
        state = "matches" if r["match"] else "DIFFERS"
        print(f"[cdm] {r['artifact']}: {state} (certificate {r['expected'][:12]}, "
              f"from scratch {r['actual'][:12]})")  # fmt: skip
    for artifact in report["not_verified"]:
        print(f"[cdm] not verified: {artifact} (trained on every shard)")
    print(f"[cdm] report: {report['path']}")
    if not report["all_match"]:
        bad = [r["artifact"] for r in report["results"] if not r["match"]]
        print(
            f"cdm-verify: {', '.join(bad) or 'a model'} trained from scratch on the certified ids "
            f"differs from the certificate {report['certificate']}",
            file=sys.stderr,
        )
        sys.exit(MISMATCH_EXIT)


if __name__ == "__main__":
    main()
