"""Artifact store: the only code that knows paths; atomic writes, cards and checked loads.

``layout`` (every path), ``io`` (atomic files and directories, sha256), ``artifact`` (the one
generic save / verify / load), ``records`` (JSON records: manifests, sources, forgotten ids,
forget journal, certificates), ``staleness`` (is an artifact trained on data still held),
``store`` (``ArtifactStore``: backbones, adapters, routers, checkpoints), ``listing`` (cdm-list) and one module
per store-wide kind (``feature_nets``, ``knn``, ``samples``, ``stats``).
"""

from cdm.store.cards import CARD_FILENAME, code_version, make_card, utc_now
from cdm.store.errors import (
    BackboneMismatchError,
    CorruptArtifactError,
    InvalidNameError,
    MissingArtifactError,
    StaleArtifactError,
    StoreError,
)
from cdm.store.io import (
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_card,
    sha256_file,
)
from cdm.store.layout import StatsKey, StoreLayout, validate_name
from cdm.store.listing import format_table
from cdm.store.staleness import stale_reason
from cdm.store.store import ArtifactStore

__all__ = [
    "CARD_FILENAME",
    "ArtifactStore",
    "BackboneMismatchError",
    "CorruptArtifactError",
    "InvalidNameError",
    "MissingArtifactError",
    "StaleArtifactError",
    "StatsKey",
    "StoreError",
    "StoreLayout",
    "atomic_write_bytes",
    "atomic_write_json",
    "code_version",
    "format_table",
    "load_checkpoint",
    "make_card",
    "read_card",
    "sha256_file",
    "stale_reason",
    "utc_now",
    "validate_name",
]
