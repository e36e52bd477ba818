"""``_target_`` paths read back from stored artifacts: only cdm's own classes are rebuilt."""

from __future__ import annotations

from typing import Any

from hydra.utils import get_object


def stored_target(target: object, what: str) -> Any:
    """The object at dotted path ``target``, refused unless it lies under ``cdm.``: a card or a
    config read from the store is data and must never choose other code to import and run."""
    if not isinstance(target, str) or not target.startswith("cdm."):
        raise ValueError(
            f"{what} names _target_ {target!r}, which is not a cdm class: only cdm.* targets are "
            "rebuilt from stored artifacts; retrain the artifact with the shipped configs"
        )
    return get_object(target)
