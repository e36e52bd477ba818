"""cdm-list: list the artifacts in the store with their cards.

cdm-list [--root artifacts] [--experiment digits_4split] [--cards | --json]
"""

from __future__ import annotations

import argparse
import json
import os

from cdm.store import ArtifactStore, format_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdm-list", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("CDM_ARTIFACTS", "artifacts"))
    parser.add_argument("--experiment", default=None)
    parser.add_argument("--json", action="store_true", help="print the full cards as JSON")
    parser.add_argument(
        "--cards",
        action="store_true",
        help="after the table, each model's card (without its config)",
    )
    args = parser.parse_args(argv)
    cards = ArtifactStore(args.root).list_artifacts(args.experiment)
    if args.json:
        print(json.dumps(cards, indent=2, sort_keys=True))
    elif not cards:
        print(f"no artifacts under {args.root}")
    else:
        print(format_table(cards))
        if args.cards:
            for card in cards:
                if card.get("artifact") == "manifest":
                    continue
                brief = {k: v for k, v in card.items() if k != "config"}
                print(f"\n== {card.get('artifact')} {card.get('name')} ==")
                print(json.dumps(brief, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
