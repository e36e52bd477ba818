"""Names of jobs in the store (torch-free, so config resolvers can import it cheaply)."""

from __future__ import annotations

import re
from dataclasses import dataclass

STAGES = ("backbone", "shard", "paragon", "router", "knn", "feature_net", "head")
_SHARD_NAME = re.compile(r"shard-(\d+)")


@dataclass(frozen=True, order=True)
class ShardId:
    """One shard of an experiment: ``ShardId(3).name == "shard-03"``, the name it has on disk."""

    index: int

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"a shard index must be a non-negative int, got {self.index!r}")

    @property
    def name(self) -> str:
        """``shard-<kk>``: the shard's job, manifest and adapter folder name."""
        return f"shard-{self.index:02d}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> ShardId:
        """``ShardId.parse("shard-03") == ShardId(3)``; ``ValueError`` for any other name."""
        match = _SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(f"{name!r} is not a shard name: use 'shard-<index>', e.g. 'shard-03'")
        return cls(int(match.group(1)))

    @staticmethod
    def is_shard(name: str | None) -> bool:
        """True for a shard name (``shard-03``), False for ``safe``, ``paragon``, ``router``..."""
        return isinstance(name, str) and _SHARD_NAME.fullmatch(name) is not None


def job_name(stage: str, index: int | None = None) -> str:
    """Store name of a job: ``backbone``, ``paragon``, ``shard-03`` or ``head-shard-03`` (the
    compartmental router's head of shard 3)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {STAGES}")
    if stage == "head":
        return f"head-{ShardId(int(index)).name}"
    return ShardId(int(index)).name if stage == "shard" else stage
