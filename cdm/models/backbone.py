"""The shared backbone: a diffusers UNet built from a size preset or loaded from a local path."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from cdm.core.hashing import hash_state_dict

UNET_CLASSES: dict[str, type] = {"unet2d": UNet2DModel, "unet2d_condition": UNet2DConditionModel}


def build_unet(
    kind: str,
    unet_kwargs: Mapping[str, Any],
    *,
    sample_size: int,
    channels: int,
    num_classes: int | None,
) -> torch.nn.Module:
    """A freshly initialised UNet. Class-conditional when ``num_classes`` is given.

    The class embedding has ``num_classes + 1`` rows: the last one is the null label used for
    classifier-free guidance (Ho & Salimans, 2022).
    """
    if kind not in UNET_CLASSES:
        raise ValueError(f"unknown backbone kind {kind!r}: choose one of {sorted(UNET_CLASSES)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(unet_kwargs).items()}
    kwargs.update(sample_size=sample_size, in_channels=channels, out_channels=channels)
    if num_classes is not None:
        kwargs["num_class_embeds"] = num_classes + 1
    return UNET_CLASSES[kind](**kwargs)


def load_pretrained_unet(path: str | Path, kind: str = "unet2d") -> torch.nn.Module:
    """Load any diffusers UNet from a local ``save_pretrained`` directory; never downloads."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers UNet at {path}: expected a directory made by `unet.save_pretrained(dir)` "
            "holding config.json and diffusion_pytorch_model.safetensors (for a full pipeline, "
            "point backbone.pretrained_path at its unet/ subfolder). Nothing is downloaded."
        )
    if kind not in UNET_CLASSES:
        raise ValueError(f"unknown backbone kind {kind!r}: choose one of {sorted(UNET_CLASSES)}")
    return UNET_CLASSES[kind].from_pretrained(path, local_files_only=True, use_safetensors=True)


def backbone_hash(unet: torch.nn.Module) -> str:
    """Content hash of the backbone's weights; every adapter card records the one it was trained on."""
    return hash_state_dict(unet.state_dict())


def build_scheduler(scheduler_kwargs: Mapping[str, Any]) -> DDPMScheduler:
    """The training noise schedule (the forward process q(x_t | x_0))."""
    return DDPMScheduler(**dict(scheduler_kwargs))


def null_label(unet: torch.nn.Module) -> int | None:
    """Index of the null class (classifier-free guidance), or None for an unconditional UNet."""
    n = unet.config.get("num_class_embeds") if hasattr(unet, "config") else None
    return None if n is None else int(n) - 1


def predict_epsilon(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """epsilon_theta(x_t, t, c) for either UNet class (wrapped in peft or not).

    A UNet2DConditionModel without text gets a single all-zero token as its context, so the
    class-conditional path runs today and text conditioning can be plugged in later.
    """
    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    kwargs: dict[str, Any] = {"class_labels": labels}
    if isinstance(base, UNet2DConditionModel):
        if encoder_hidden_states is None:
            dim = base.config.cross_attention_dim
            encoder_hidden_states = x_t.new_zeros(x_t.shape[0], 1, dim)
        kwargs["encoder_hidden_states"] = encoder_hidden_states
    return unet(x_t, timesteps, return_dict=False, **kwargs)[0]
