"""The shared backbone: a diffusers UNet or DiT built from a size preset or loaded from a local path."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

from cdm.core.hashing import hash_state_dict
from cdm.models.text import contexts_of


class DiT(DiTTransformer2DModel):
    """diffusers' ``DiTTransformer2DModel`` (Peebles & Xie, 2023) without its own label dropout.

    diffusers drops 10% of the class labels in training mode with the *global* RNG, which
    would make training depend on RNG history (no bit-identical resume) and double cdm's own
    seeded ``optim.cond_drop_prob``; here that dropout is off, the weights and the config are
    diffusers' own (a saved DiT loads into ``DiTTransformer2DModel`` too).
    """

    @functools.wraps(DiTTransformer2DModel.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for block in self.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0


UNET_CLASSES: dict[str, type] = {
    "unet2d": UNet2DModel,
    "unet2d_condition": UNet2DConditionModel,
    "dit": DiT,
}
# the config key of each class's number of class-embedding rows (the null label is the last one)
CLASS_EMBEDS_KEY = {DiT: "num_embeds_ada_norm"}


def build_unet(
    kind: str,
    unet_kwargs: Mapping[str, Any],
    *,
    sample_size: int,
    channels: int,
    num_classes: int | None,
) -> torch.nn.Module:
    """A freshly initialised UNet (or DiT, ``kind="dit"``). Class-conditional when ``num_classes``
    is given; the output has the input's channels (epsilon only).

    The class embedding has ``num_classes + 1`` rows: the last one is the null label used for
    classifier-free guidance (Ho & Salimans, 2022). A DiT (adaLN-Zero) is always conditional.
    """
    if kind not in UNET_CLASSES:
        raise ValueError(f"unknown backbone kind {kind!r}: choose one of {sorted(UNET_CLASSES)}")
    cls = UNET_CLASSES[kind]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(unet_kwargs).items()}
    kwargs.update(sample_size=sample_size, in_channels=channels, out_channels=channels)
    if num_classes is None and cls in CLASS_EMBEDS_KEY:
        raise ValueError(
            f"backbone.kind={kind} is class-conditional only (adaLN-Zero): set data.conditional=true "
            "or use a UNet backbone (backbone=tiny|small|base)"
        )
    if num_classes is not None:
        kwargs[CLASS_EMBEDS_KEY.get(cls, "num_class_embeds")] = num_classes + 1
    return cls(**kwargs)


def load_pretrained_unet(path: str | Path, kind: str = "unet2d") -> torch.nn.Module:
    """Load any diffusers UNet from a local ``save_pretrained`` directory, or the ``unet/`` of a
    pipeline folder (``model_index.json``: e.g. Stable Diffusion, backbone=sd_local); never downloads."""
    path = Path(path).expanduser()
    if (path / "model_index.json").is_file():
        path = path / "unet"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers UNet at {path}: expected a directory made by `unet.save_pretrained(dir)` "
            "holding config.json and diffusion_pytorch_model.safetensors, or a pipeline folder "
            "(model_index.json) with a unet/ subfolder. Nothing is downloaded."
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


def class_embeds(unet: torch.nn.Module) -> int | None:
    """Rows of the backbone's class embedding (classes + the null label), None if unconditional."""
    if not hasattr(unet, "config"):
        return None
    n = unet.config.get("num_class_embeds")
    return unet.config.get("num_embeds_ada_norm") if n is None else n


def null_label(unet: torch.nn.Module) -> int | None:
    """Index of the null class (classifier-free guidance), or None for an unconditional UNet; a
    text UNet's null caption: the last row of its context table (``cdm.models.text``)."""
    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    table = contexts_of(base)
    if table is not None:
        return int(table.shape[0]) - 1
    n = class_embeds(unet)
    return None if n is None else int(n) - 1


def predict_epsilon(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """epsilon_theta(x_t, t, c) for either UNet class or a DiT (wrapped in peft or deep prompts
    or not): each is called as ``model(x_t, t, class_labels=c, return_dict=False)[0]``.

    A text UNet2DConditionModel (a context table attached, ``cdm.models.text``) reads its labels
    as caption rows: the context is ``table[labels]`` (labels None: the null caption) and no class
    label is passed. Without a table it gets a single all-zero token as its context.
    """
    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    kwargs: dict[str, Any] = {"class_labels": labels}
    table = contexts_of(base)
    if table is not None and encoder_hidden_states is None:
        rows = labels if labels is not None else torch.full((x_t.shape[0],), len(table) - 1)
        encoder_hidden_states = table[rows.to(table.device)].to(x_t.dtype)
        kwargs["class_labels"] = None
    if isinstance(base, UNet2DConditionModel):
        if encoder_hidden_states is None:
            dim = base.config.cross_attention_dim
            encoder_hidden_states = x_t.new_zeros(x_t.shape[0], 1, dim)
        kwargs["encoder_hidden_states"] = encoder_hidden_states
    return unet(x_t, timesteps, return_dict=False, **kwargs)[0]
