"""Content hashes that tie every artifact to the exact data and weights it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of raw bytes."""
    return hashlib.sha256(data).hexdigest()


def hash_ids(ids: Iterable[str], content_hashes: Iterable[str]) -> str:
    """One hash over a set of samples: sha256 of the sorted lines ``"{id} {content_hash}\\n"``.

    Order-independent, so the hash of the ids a model was fed equals the manifest's hash
    whatever order the sampler used.
    """
    lines = sorted(f"{i} {h}\n" for i, h in zip(ids, content_hashes, strict=True))
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
    return digest.hexdigest()


def hash_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
