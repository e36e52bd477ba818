"""cdm-list: list the artifacts in the store with their cards.

cdm-list [experiment=digits_4split] [list.cards=true | list.json=true] [paths.artifacts=artifacts]
"""

from __future__ import annotations

import json

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# conf/list.yaml needs no resolver: the training stack is never imported
from cdm.cli.errors import cdm_main


@cdm_main("cdm-list", "list")
def main(cfg: DictConfig) -> None:
    from cdm.store import ArtifactStore, format_table

    # no experiment=... on the command line: the whole store
    experiment = (
        cfg.experiment_name if HydraConfig.get().runtime.choices.get("experiment") else None
    )
    root = str(cfg.paths.artifacts)
    cards = ArtifactStore(root).list_artifacts(None if experiment is None else str(experiment))
    if cfg.list.json:
        print(json.dumps(cards, indent=2, sort_keys=True))
    elif not cards:
        print(f"no artifacts under {root}")
    else:
        print(format_table(cards))
        if cfg.list.cards:
            for card in cards:
                if card.get("artifact") == "manifest":
                    continue
                brief = {k: v for k, v in card.items() if k != "config"}
                print(f"\n== {card.get('artifact')} {card.get('name')} ==")
                print(json.dumps(brief, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
