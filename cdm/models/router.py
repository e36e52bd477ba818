"""Router networks f(x_t, t) -> logits over the n shards (paper Sec. 3.4, Prop. 3.1).

At convergence ``softmax(f(x_t, t))_i = P(z = i | x_t)``, the weight of shard i's score in the
mixture score ``s(x_t, t) = sum_i w_i(x_t, t) s_i(x_t, t)`` (Prop. 3.1). Two architectures:

- ``SmallRouter``: a small standalone conv net with a sinusoidal timestep embedding.
- ``BackboneHeadRouter``: a head on the mid-block features of the frozen safe backbone (as in
  the paper). The backbone is held outside the module's registered children, so it is not in the
  router's ``state_dict`` / ``parameters()`` and never trains; it follows ``.to()`` and dtype casts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

ROUTER_ARCHS = ("small", "backbone_head")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim] (Vaswani et al.; DDPM)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / max(half, 1)
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


def _groups(channels: int, wanted: int) -> int:
    """The largest group count <= ``wanted`` that divides ``channels``."""
    return math.gcd(channels, max(1, wanted))


class _TimeMLP(nn.Module):
    """Sinusoidal embedding of t followed by a two-layer MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.dim)  # float32, cast like diffusers does
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, the time embedding added per channel, twice; residual."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, norm_groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, norm_groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.t_proj(self.act(t_emb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return h + self.skip(x)


class SmallRouter(nn.Module):
    """A small conv classifier f(x_t, t) -> [B, n_shards] logits (paper Sec. 3.4).

    ``widths`` gives one residual block each; between blocks the resolution halves (stride-2
    conv) while it is above 2. Global mean pooling, then a linear layer to the shard logits.
    """

    def __init__(
        self,
        n_shards: int,
        channels: int,
        resolution: int,
        *,
        widths: Sequence[int] = (32, 64, 64),
        time_embed_dim: int = 64,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        if n_shards < 1 or not widths:
            raise ValueError(f"need n_shards >= 1 and some widths, got {n_shards}, {widths}")
        widths = [int(w) for w in widths]
        self.n_shards = int(n_shards)
        self.time = _TimeMLP(int(time_embed_dim))
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        size, c_prev = int(resolution), widths[0]
        for i, width in enumerate(widths):
            self.blocks.append(_ResBlock(c_prev, width, int(time_embed_dim), norm_groups))
            last = i == len(widths) - 1
            if not last and size > 2:
                self.downs.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                size = (size + 1) // 2
            else:
                self.downs.append(nn.Identity())
            c_prev = width
        self.norm_out = nn.GroupNorm(_groups(c_prev, norm_groups), c_prev)
        self.act = nn.SiLU()
        self.head = nn.Linear(c_prev, self.n_shards)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t_emb = self.time(timesteps)
        h = self.conv_in(x_t)
        for block, down in zip(self.blocks, self.downs, strict=True):
            h = down(block(h, t_emb))
        h = self.act(self.norm_out(h)).mean(dim=(2, 3))  # mean, not adaptive pool: deterministic
        return self.head(h)


# --------------------------------------------------------------------------------------------
# the backbone-head router


def _base_model(unet: nn.Module) -> nn.Module:
    return unet.get_base_model() if hasattr(unet, "get_base_model") else unet


def unet_mid_features(
    unet: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mid-block output [B, C_mid, h, w] of a diffusers UNet: steps 0-4 of its ``forward``.

    Walks time_proj, time_embedding (+ class embedding), conv_in, down_blocks and mid_block of a
    ``UNet2DModel`` or ``UNet2DConditionModel`` (diffusers 0.42). A class-conditional backbone
    gets its null label (the unconditional branch) unless ``class_labels`` is given; a
    cross-attention one gets one all-zero context token, as ``predict_epsilon`` does.
    """
    from diffusers import UNet2DConditionModel, UNet2DModel

    unet = _base_model(unet)
    if not isinstance(unet, UNet2DModel | UNet2DConditionModel):
        raise TypeError(f"unet_mid_features needs a diffusers UNet, got {type(unet).__name__}")
    cfg = unet.config
    sample = 2 * x_t - 1.0 if cfg.center_input_sample else x_t
    timesteps = torch.as_tensor(timesteps, device=sample.device)
    if timesteps.dim() == 0:
        timesteps = timesteps[None]
    timesteps = timesteps.expand(sample.shape[0])
    dtype = next(unet.parameters()).dtype
    if unet.class_embedding is not None and class_labels is None:
        n = cfg.get("num_class_embeds")
        if n is None:
            raise ValueError("this backbone's class embedding needs class_labels")
        class_labels = torch.full_like(timesteps, int(n) - 1, dtype=torch.long)

    if isinstance(unet, UNet2DModel):
        if cfg.time_embedding_type == "fourier":
            raise NotImplementedError("fourier time embeddings are not supported by the router")
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype))
        if unet.class_embedding is not None:
            labels = class_labels
            if cfg.class_embed_type == "timestep":
                labels = unet.time_proj(labels)
            emb = emb + unet.class_embedding(labels).to(dtype)
        skip = sample
        h = unet.conv_in(sample)
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        return unet.mid_block(h, emb) if unet.mid_block is not None else h

    if cfg.addition_embed_type is not None or unet.encoder_hid_proj is not None:
        raise NotImplementedError(
            "backbone_head routers support UNet2DConditionModel without addition embeddings or "
            "encoder_hid_proj; use router=small"
        )
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], -1) if cfg.class_embeddings_concat else emb + class_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    if encoder_hidden_states is None:
        encoder_hidden_states = sample.new_zeros(sample.shape[0], 1, cfg.cross_attention_dim)
    h = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if unet.mid_block is None:
        return h
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    return unet.mid_block(h, emb)


class BackboneHeadRouter(nn.Module):
    """A classifier head on the frozen backbone's mid-block features (paper Sec. 3.4).

    features -> per-token linear (+ learned position and time embeddings) -> one pre-norm
    self-attention block over the h*w spatial tokens -> mean pool -> linear to n logits. The
    backbone runs under ``no_grad`` in eval mode; it is not a registered child, so the router's
    ``state_dict`` holds the head only (the card names the backbone hash it depends on).
    """

    def __init__(
        self,
        n_shards: int,
        channels: int,
        resolution: int,
        *,
        backbone: nn.Module,
        dim: int = 64,
        heads: int = 4,
        mlp_ratio: int = 2,
        time_embed_dim: int = 64,
    ) -> None:
        super().__init__()
        if backbone is None:
            raise ValueError("a backbone_head router needs the backbone UNet")
        backbone.requires_grad_(False).eval()
        self.__dict__["backbone"] = backbone  # not registered: no state_dict, no parameters
        self.n_shards = int(n_shards)
        with torch.no_grad():
            probe = unet_mid_features(
                backbone,
                torch.zeros(1, channels, resolution, resolution, dtype=self._backbone_dtype()),
                torch.zeros(1, dtype=torch.long),
            )
        _, c_mid, h, w = probe.shape
        self.proj = nn.Linear(c_mid, dim)
        self.pos = nn.Parameter(torch.zeros(1, h * w, dim))
        self.time = _TimeMLP(int(time_embed_dim))
        self.t_proj = nn.Linear(int(time_embed_dim), dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.SiLU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.n_shards)

    backbone: nn.Module

    def _backbone_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def _apply(self, fn: Callable, recurse: bool = True):
        """Move/cast the (unregistered) backbone along with the head."""
        self.backbone._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> BackboneHeadRouter:
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's mid-block features, without gradient."""
        with torch.no_grad():
            return unet_mid_features(self.backbone, x_t.to(self._backbone_dtype()), timesteps)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        feats = self.features(x_t, timesteps).to(self.proj.weight.dtype)
        tokens = self.proj(feats.flatten(2).transpose(1, 2)) + self.pos
        tokens = tokens + self.t_proj(self.time(timesteps))[:, None, :]
        q = self.norm1(tokens)
        tokens = tokens + self.attn(q, q, q, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(self.norm_out(tokens.mean(dim=1)))


# --------------------------------------------------------------------------------------------
# construction


def router_model_config(
    router_cfg: Mapping[str, Any], *, n_shards: int, channels: int, resolution: int
) -> dict[str, Any]:
    """What rebuilds a router's architecture: arch, its keyword arguments and the shapes."""
    arch = router_cfg.get("arch")
    if arch not in ROUTER_ARCHS:
        raise ValueError(f"unknown router arch {arch!r}: choose one of {ROUTER_ARCHS}")
    model = {
        k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in dict(router_cfg.get("model") or {}).items()
    }
    return {
        "arch": arch,
        "model": model,
        "n_shards": int(n_shards),
        "channels": int(channels),
        "resolution": int(resolution),
    }


def build_router(
    router_cfg: Mapping[str, Any],
    *,
    n_shards: int,
    channels: int,
    resolution: int,
    backbone: nn.Module | None = None,
) -> nn.Module:
    """A router from ``router_cfg`` (``arch`` + ``model`` kwargs, as in ``conf/router/*.yaml``).

    ``arch: backbone_head`` needs ``backbone`` (frozen here); ``arch: small`` ignores it.
    """
    spec = router_model_config(
        router_cfg, n_shards=n_shards, channels=channels, resolution=resolution
    )
    kwargs = dict(spec["model"])
    if spec["arch"] == "small":
        return SmallRouter(n_shards, channels, resolution, **kwargs)
    if backbone is None:
        raise ValueError("router arch 'backbone_head' needs the backbone: pass backbone=unet")
    return BackboneHeadRouter(n_shards, channels, resolution, backbone=backbone, **kwargs)


def router_from_artifact(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    backbone: nn.Module | None = None,
) -> nn.Module:
    """Rebuild a saved router (``ArtifactStore.load_router``) in eval mode; strict weight loading."""
    router = build_router(
        config,
        n_shards=int(config["n_shards"]),
        channels=int(config["channels"]),
        resolution=int(config["resolution"]),
        backbone=backbone,
    )
    router.load_state_dict(dict(state), strict=True)
    return router.eval()
