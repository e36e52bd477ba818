"""Errors the store raises; each message names the artifact and the command that (re)makes it."""

from __future__ import annotations


class StoreError(ValueError):
    """Base class of every error the store raises about artifacts or names."""


class InvalidNameError(StoreError):
    """A name that could escape its directory or is otherwise not allowed."""


class MissingArtifactError(StoreError):
    """The artifact (or its card) does not exist; the message says which command makes it."""


class CorruptArtifactError(StoreError):
    """The artifact's bytes do not match its card, or cannot be parsed."""


class BackboneMismatchError(StoreError):
    """An adapter was trained on a different backbone than the one it is being loaded onto."""


class StaleArtifactError(StoreError):
    """The artifact was trained on data the experiment no longer holds (e.g. after cdm-forget)."""
