"""Names of jobs in the store (torch-free, so config resolvers can import it cheaply)."""

from __future__ import annotations

STAGES = ("backbone", "shard", "paragon", "router", "knn", "feature_net")


def job_name(stage: str, index: int | None = None) -> str:
    """Store name of a job: ``backbone``, ``paragon`` or ``shard-03``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {STAGES}")
    return f"shard-{int(index):02d}" if stage == "shard" else stage
