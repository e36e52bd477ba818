"""Artifact store: the only code that knows paths; atomic writes, cards and checked loads."""

from cdm.store.cards import CARD_FILENAME, code_version, make_card, utc_now
from cdm.store.store import (
    ArtifactStore,
    BackboneMismatchError,
    CorruptArtifactError,
    InvalidNameError,
    MissingArtifactError,
    StaleArtifactError,
    StoreError,
    atomic_write_bytes,
    atomic_write_json,
    format_table,
    load_checkpoint,
    read_card,
    sha256_file,
    shard_job,
    validate_name,
)

__all__ = [
    "CARD_FILENAME",
    "ArtifactStore",
    "BackboneMismatchError",
    "CorruptArtifactError",
    "InvalidNameError",
    "MissingArtifactError",
    "StaleArtifactError",
    "StoreError",
    "atomic_write_bytes",
    "atomic_write_json",
    "code_version",
    "format_table",
    "load_checkpoint",
    "make_card",
    "read_card",
    "sha256_file",
    "shard_job",
    "utc_now",
    "validate_name",
]
