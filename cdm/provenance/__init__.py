"""Provenance: what depends on a sample or a source, read from what the store records."""

from cdm.provenance.ledger import (
    ProvenanceError,
    dependents,
    format_report,
    locate,
    what_depends_on,
)

__all__ = ["ProvenanceError", "dependents", "format_report", "locate", "what_depends_on"]
