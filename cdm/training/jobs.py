"""The training jobs: safe backbone pretraining, one shard's adapter, and the paragon."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cdm.models.adapters import prepare_shard_model
from cdm.training.denoising import DenoisingModule


class BackbonePretraining(DenoisingModule):
    """Pretrains every weight of the backbone on the safe split (data never to be forgotten)."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, **kwargs: Any) -> None:
        unet.requires_grad_(True)
        super().__init__(unet, alphas_cumprod, **kwargs)


class ShardTraining(DenoisingModule):
    """Trains one shard's own parameters (LoRA or a full copy) on that shard's data only.

    The paragon is the same job fed the union of all private shards.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        adapter_cfg: Mapping[str, Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(prepare_shard_model(unet, dict(adapter_cfg)), alphas_cumprod, **kwargs)
        self.adapter_kind = adapter_cfg["kind"]
