"""cdm-provenance: which artifacts derive from a sample or a source, and which are still served.

cdm-provenance provenance.sample=digits/001290
cdm-provenance provenance.source=shard-03 experiment_name=digits_4split
cdm-provenance provenance.sample=digits/001290 provenance.json=ledger.json
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

# conf/provenance.yaml needs no resolver, so cdm.training (slow to import) is never loaded
from cdm.cli.errors import cdm_main


@cdm_main("cdm-provenance", "provenance")
def main(cfg: DictConfig) -> None:
    from cdm.provenance import format_report, what_depends_on
    from cdm.store import ArtifactStore

    p = cfg.provenance
    sample = None if p.sample is None else str(p.sample)
    source = None if p.source is None else str(p.source)
    experiment = cfg.get("experiment_name")
    # a ProvenanceError or StoreError ends in one line and exit 2 (cdm.cli.errors)
    result = what_depends_on(
        ArtifactStore(cfg.paths.artifacts),
        sample_id=sample,
        source=source,
        experiment=None if experiment is None else str(experiment),
    )
    print(format_report(result))
    if p.json:
        path = Path(str(p.json)).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"[cdm] written to {path}")


if __name__ == "__main__":
    main()
