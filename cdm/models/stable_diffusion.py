"""Stable Diffusion from a local diffusers pipeline folder: backbone, text encoder, latent codec.

Any folder written by ``StableDiffusionPipeline.save_pretrained(dir, safe_serialization=True)``
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) gives
cdm three parts, loaded with ``local_files_only=True`` and safetensors only (never a download):

- the ``UNet2DConditionModel``: the frozen backbone each shard adapts (``adapter=lora_sd`` on its
  attention projections, or ``adapter=full``); the shards are composed by the same sampler as any
  cdm backbone (Prop. 3.1), in latent space;
- ``SDTextEncoder``: the CLIP text model and tokenizer, frozen; a caption's context is the last
  hidden state of its tokens padded to the tokenizer's maximum length, exactly the
  ``prompt_embeds`` of ``StableDiffusionPipeline.encode_prompt`` (no clip skip, no LoRA scale);
- ``VAECodec``: the ``AutoencoderKL`` (Rombach et al., 2022, Sec. 3): z = E(x) * s with the mean of
  the posterior (deterministic encoding), x = D(z / s) clamped to [-1, 1].

The pipeline's scheduler config fixes the noise schedule; it must predict epsilon (SD 1.x,
SD 2.x-base), as cdm's loss and sampler do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel

from cdm.models.backbone import load_pretrained_unet

# the pipeline's parts cdm uses: model_index.json key -> (library, class) it must name
SD_COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", None),  # CLIPTokenizer or its fast twin
    "scheduler": ("diffusers", None),  # any scheduler: only its noise schedule is read
}
WEIGHTED = ("unet", "vae", "text_encoder")
CONVERT = (
    "convert it once: `StableDiffusionPipeline.from_pretrained(dir).save_pretrained(dir, "
    "safe_serialization=True)`"
)


def check_pipeline_folder(path: str | Path) -> dict[str, Any]:
    """The ``model_index.json`` of a local diffusers pipeline folder; refused when absent or when
    a component holds PyTorch .bin weights only (cdm loads safetensors only)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"no pipeline folder at {root}: set backbone.pretrained_path to a local folder "
            "written by `pipe.save_pretrained(dir)`. Nothing is downloaded."
        )
    if not (root / "model_index.json").is_file():
        hint = " (this is a single model: point at the pipeline folder above it)"
        raise FileNotFoundError(
            f"{root} is not a diffusers pipeline folder: no model_index.json"
            f"{hint if (root / 'config.json').is_file() else ''}; save one with "
            "`StableDiffusionPipeline.save_pretrained(dir)`"
        )
    for part in sorted(p for p in root.iterdir() if p.is_dir()):
        suffixes = {f.suffix for f in part.iterdir()}
        if ".bin" in suffixes and ".safetensors" not in suffixes:
            raise FileNotFoundError(
                f"{part} holds only PyTorch .bin weights; cdm loads safetensors only: {CONVERT}"
            )
    return json.loads((root / "model_index.json").read_text())


def check_sd_folder(path: str | Path) -> dict[str, Any]:
    """The ``model_index.json`` of a local SD pipeline folder, or a one-line error saying what is
    wrong (not a pipeline, a part absent, SDXL's second text encoder, .bin-only weights)."""
    root = Path(path).expanduser()
    index = check_pipeline_folder(root)
    if index.get("text_encoder_2") not in (None, [None, None]):
        raise ValueError(
            f"{root} is a {index.get('_class_name')} with two text encoders (SDXL): only "
            "single-encoder Stable Diffusion pipelines (SD 1.x, 2.x) are supported"
        )
    for name, (library, cls) in SD_COMPONENTS.items():
        entry = index.get(name)
        if not entry or entry[0] is None or not (root / name).is_dir():
            raise FileNotFoundError(
                f"{root} has no {name}/ component ({index.get('_class_name')}): a Stable Diffusion "
                f"pipeline folder needs {', '.join(SD_COMPONENTS)}"
            )
        if entry[0] != library or cls not in (None, entry[1]):
            raise ValueError(
                f"{root}/{name} is {entry[0]}.{entry[1]}, expected {library}.{cls or '*'}: "
                "not a Stable Diffusion pipeline"
            )
        if name in WEIGHTED and not any(
            f.suffix == ".safetensors" for f in (root / name).iterdir()
        ):
            raise FileNotFoundError(f"{root / name} holds no safetensors weights: {CONVERT}")
    return index


def sd_noise_schedule(path: str | Path) -> dict[str, Any]:
    """The pipeline's scheduler config (``scheduler/scheduler_config.json``), refused unless it
    predicts epsilon (the parameterisation of cdm's loss and sampler)."""
    config = json.loads(
        (Path(path).expanduser() / "scheduler" / "scheduler_config.json").read_text()
    )
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{path} predicts {prediction!r} (e.g. SD 2.x 768-v); cdm trains and samples epsilon: "
            "use an epsilon-prediction pipeline (SD 1.x, SD 2.x-base)"
        )
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_pretrained_pipeline(path: str | Path, configured: Mapping[str, Any]) -> None:
    """A pipeline folder (``model_index.json``) as ``backbone.pretrained_path``: safetensors only,
    and ``backbone.scheduler`` (``configured``) must be the forward process of its own scheduler
    config. A bare UNet folder carries no schedule: nothing to check."""
    if not (Path(path).expanduser() / "model_index.json").is_file():
        return
    check_pipeline_folder(path)
    own = sd_noise_schedule(path)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    differ = [k for k in keys if configured.get(k) != own.get(k)]
    if differ:
        pairs = ", ".join(f"{k}: {configured.get(k)!r} != {own.get(k)!r}" for k in differ)
        raise ValueError(
            f"backbone.scheduler differs from the noise schedule of {path} ({pairs}): set "
            "backbone.scheduler to the values of its scheduler/scheduler_config.json"
        )


class SDTextEncoder(nn.Module):
    """Frozen CLIP text encoder of an SD pipeline: ``encode(captions) -> [N, L, D]`` contexts,
    L = the tokenizer's ``model_max_length`` (77 for SD), D = ``dim`` (cross-attention width).

    Every caption is padded to L on its own, so its context never depends on its batch.
    """

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.dim = int(text_encoder.config.hidden_size)
        self.length = int(tokenizer.model_max_length)

    @classmethod
    def from_pipeline(cls, path: str | Path) -> SDTextEncoder:
        """From a local SD pipeline folder's ``tokenizer/`` and ``text_encoder/``."""
        root = Path(path).expanduser()
        check_sd_folder(root)
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        model = CLIPTextModel.from_pretrained(
            root / "text_encoder", local_files_only=True, use_safetensors=True
        )
        return cls(tokenizer, model)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """[N, L, D] float32 last hidden states on the CPU: ``StableDiffusionPipeline.encode_prompt``'s
        ``prompt_embeds``."""
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float().cpu()

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        return self.encode(captions)


class VAECodec(nn.Module):
    """An SD pipeline's ``AutoencoderKL`` as cdm's ``LatentCodec`` (Rombach et al., 2022, Sec. 3):
    ``encode``: images in [-1, 1] -> z = (mean of q(z | x) - shift) * scaling_factor,
    deterministic; ``decode``: x = D(z / scaling_factor + shift) clamped to [-1, 1]. Batching is
    the caller's (``cdm.models.text.encode_images``)."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # as diffusers' pipelines

    @classmethod
    def from_pipeline(cls, path: str | Path) -> VAECodec:
        """From a local SD pipeline folder's ``vae/``."""
        root = Path(path).expanduser()
        check_sd_folder(root)
        return cls(
            AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, use_safetensors=True)
        )

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int, int]:
        """(c, h, w) of the latents of images [channels, resolution, resolution]."""
        if channels != self.vae.config.in_channels:
            raise ValueError(
                f"the VAE encodes {self.vae.config.in_channels}-channel images, the data has "
                f"{channels}: set data.channels={self.vae.config.in_channels} (RGB) for this backbone"
            )
        if resolution % self.factor:
            raise ValueError(
                f"data.resolution={resolution} is not a multiple of the VAE's downsampling factor "
                f"{self.factor}: set data.resolution to a multiple of {self.factor}"
            )
        size = resolution // self.factor
        return int(self.vae.config.latent_channels), size, size

    def device_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the VAE's device and dtype."""
        p = next(self.vae.parameters())
        return x.to(p.device, p.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> latents [B, c, h, w] (on the images' device)."""
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"square images only, got {tuple(images.shape[-2:])}")
        self.latent_shape(images.shape[1], images.shape[-1])
        z = retrieve_latents(self.vae.encode(self.device_dtype(images)), sample_mode="argmax")
        return ((z - self.shift) * self.scale).to(images.device, images.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, c, h, w] -> images [B, C, H, W] in [-1, 1] (on the latents' device)."""
        z = self.device_dtype(latents) / self.scale + self.shift
        x = self.vae.decode(z, return_dict=False)[0]
        return x.clamp(-1, 1).to(latents.device, latents.dtype)


@dataclass
class SDComponents:
    """What cdm uses of a Stable Diffusion pipeline folder."""

    unet: UNet2DConditionModel
    text_encoder: SDTextEncoder
    codec: VAECodec
    scheduler_config: dict[str, Any]


def load_sd_components(path: str | Path) -> SDComponents:
    """The UNet, frozen text encoder, VAE codec and scheduler config of a local SD pipeline."""
    check_sd_folder(path)
    return SDComponents(
        unet=load_pretrained_unet(path, "unet2d_condition"),
        text_encoder=SDTextEncoder.from_pipeline(path),
        codec=VAECodec.from_pipeline(path),
        scheduler_config=sd_noise_schedule(path),
    )
