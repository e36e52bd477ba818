"""Router networks f(x_t, t) -> logits over the n shards (paper Sec. 3.4, Prop. 3.1).

At convergence ``softmax(f(x_t, t))_i = P(z = i | x_t)``, the weight of shard i's score in the
mixture score ``s(x_t, t) = sum_i w_i(x_t, t) s_i(x_t, t)`` (Prop. 3.1). Two architectures:

- ``SmallRouter``: a small standalone conv net with a sinusoidal timestep embedding.
- ``BackboneHeadRouter``: a head on intermediate features of the frozen safe backbone (as in
  the paper): a UNet's mid block (``router=backbone_head``) or a DiT's middle transformer block
  (``router=dit_head``). The backbone is held outside the module's registered children, so it
  is not in the router's ``state_dict`` / ``parameters()`` and never trains; it follows
  ``.to()`` and dtype casts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_object
from torch import nn

from cdm.models.backbone import null_label, predict_epsilon
from cdm.models.targets import stored_target


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


class _FeaturesReached(Exception):
    """Raised by a feature hook to stop the backbone's forward there (later blocks not needed)."""


def _timesteps_and_labels(
    backbone: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Timesteps [B] on x_t's device; the null label (unconditional branch) when none is given."""
    timesteps = torch.as_tensor(timesteps, device=x_t.device)
    if timesteps.dim() == 0:
        timesteps = timesteps[None]
    timesteps = timesteps.expand(x_t.shape[0])
    null = null_label(backbone)
    if class_labels is None and null is not None:
        class_labels = torch.full_like(timesteps, null, dtype=torch.long)
    return timesteps, class_labels


def _output_of(
    module: nn.Module,
    backbone: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The output of ``module`` (a block of ``backbone``) in the backbone's own forward, which a
    forward hook stops right there (no diffusers internals are re-implemented)."""
    captured: list[torch.Tensor] = []

    def stop_after(hooked: nn.Module, args: Any, output: torch.Tensor) -> None:
        captured.append(output)
        raise _FeaturesReached

    handle = module.register_forward_hook(stop_after)
    try:
        predict_epsilon(backbone, x_t, timesteps, class_labels, encoder_hidden_states)
    except _FeaturesReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(
            f"{type(backbone).__name__}.forward never called {type(module).__name__}"
        )
    return captured[0]


def unet_mid_features(
    unet: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mid-block output [B, C_mid, h, w] of a UNet, caught by a forward hook on ``mid_block``.

    The UNet's own ``forward`` runs (through ``predict_epsilon``) and the hook stops it after
    the mid block, so the up blocks never run. A class-conditional backbone gets its null label
    (the unconditional branch) unless ``class_labels`` is given; a cross-attention one gets one
    all-zero context token.
    """
    unet = _base_model(unet)
    mid_block = getattr(unet, "mid_block", None)
    if not isinstance(mid_block, nn.Module):
        raise TypeError(
            f"unet_mid_features needs a UNet with a mid_block, got {type(unet).__name__}; "
            "use router=small"
        )
    timesteps, class_labels = _timesteps_and_labels(unet, x_t, timesteps, class_labels)
    return _output_of(mid_block, unet, x_t, timesteps, class_labels, encoder_hidden_states)


def dit_blocks(backbone: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks of a DiT-like backbone (None for a UNet)."""
    blocks = getattr(_base_model(backbone), "transformer_blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def middle_block(n_blocks: int) -> int:
    """The default feature block of a transformer: the middle one (U-ViT's mid block)."""
    return n_blocks // 2


def dit_block_features(
    dit: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The tokens [B, N, D] after transformer block ``block`` (default: the middle one) of a
    DiT, caught by a forward hook that stops the DiT's own forward there. The timestep (and the
    class: the null label unless ``class_labels`` is given) enter through the DiT's own adaLN
    embedding, as in its forward. Deep-prompt tokens, if any, are already dropped."""
    blocks = dit_blocks(dit)
    if blocks is None:
        raise TypeError(
            f"dit_block_features needs a transformer backbone, got {type(dit).__name__}; "
            "use router=backbone_head for a UNet"
        )
    index = middle_block(len(blocks)) if block is None else int(block)
    if not 0 <= index < len(blocks):
        raise ValueError(
            f"router.model.block={block} but the backbone has {len(blocks)} transformer blocks: "
            f"pick one in 0..{len(blocks) - 1} (null: the middle one)"
        )
    dit = _base_model(dit)
    timesteps, class_labels = _timesteps_and_labels(dit, x_t, timesteps, class_labels)
    return _output_of(blocks[index], dit, x_t, timesteps, class_labels)


def backbone_tokens(
    backbone: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The frozen backbone's intermediate features as tokens [B, N, C]: a DiT's tokens after
    ``block`` (``dit_block_features``), or a UNet's mid-block map flattened to its h*w positions
    (``unet_mid_features``; ``block`` must be None there)."""
    if dit_blocks(backbone) is not None:
        return dit_block_features(backbone, x_t, timesteps, class_labels, block)
    if block is not None:
        raise ValueError(
            f"router.model.block={block} names a transformer block, but the backbone is a "
            f"{type(_base_model(backbone)).__name__} (its mid block is read): "
            "set router.model.block=null"
        )
    return unet_mid_features(backbone, x_t, timesteps, class_labels).flatten(2).transpose(1, 2)


class BackboneHeadRouter(nn.Module):
    """A classifier head on the frozen backbone's intermediate features (paper Sec. 3.4: "a
    linear layer plus an attention block on intermediate U-ViT features").

    The features (``backbone_tokens``): a UNet's mid-block map as h*w tokens, or a DiT's tokens
    after transformer block ``block`` (null: the middle one; ``router=dit_head``), whose timestep
    and class enter through the DiT's own adaLN embedding. Then: per-token linear (+ learned
    position and time embeddings) -> one pre-norm self-attention block over the tokens -> mean
    pool -> linear to n logits. The backbone runs under ``no_grad`` in eval mode; it is not a
    registered child, so the router's ``state_dict`` holds the head only (the card names the
    backbone hash it depends on).
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
        num_classes: int | None = None,
        block: int | None = None,
    ) -> None:
        super().__init__()
        if backbone is None:
            raise ValueError("a backbone-head router needs the backbone (UNet or DiT)")
        backbone.requires_grad_(False).eval()
        self.__dict__["backbone"] = backbone  # not registered: no state_dict, no parameters
        self.n_shards = int(n_shards)
        self.block = None if block is None else int(block)
        probe = self.features(
            torch.zeros(1, channels, resolution, resolution), torch.zeros(1, dtype=torch.long)
        )
        _, n_tokens, c_features = probe.shape
        self.proj = nn.Linear(c_features, dim)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, dim))
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
        # class-conditional heads (cdm.models.compartmental): a label embedding, null label last
        self.label = None if num_classes is None else nn.Embedding(int(num_classes) + 1, dim)

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

    def features(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The frozen backbone's feature tokens [B, N, C], without gradient (of the label's
        branch when ``class_labels`` is given, else of the unconditional one)."""
        with torch.no_grad():
            return backbone_tokens(
                self.backbone, x_t.to(self._backbone_dtype()), timesteps, class_labels, self.block
            )

    def forward(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        labels = class_labels if self.label is not None else None
        return self.head_logits(self.features(x_t, timesteps, labels), timesteps, labels)

    def head_logits(
        self, feats: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits from feature tokens ``feats`` [B, N, C] (heads sharing one backbone and
        block compute them once)."""
        tokens = self.proj(feats.to(self.proj.weight.dtype)) + self.pos
        tokens = tokens + self.t_proj(self.time(timesteps))[:, None, :]
        if self.label is not None and class_labels is not None:
            tokens = tokens + self.label(class_labels.to(tokens.device).long())[:, None, :]
        q = self.norm1(tokens)
        tokens = tokens + self.attn(q, q, q, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm2(tokens))
        return self.head(self.norm_out(tokens.mean(dim=1)))


# --------------------------------------------------------------------------------------------
# construction


def router_model_config(
    router_cfg: Mapping[str, Any], *, n_shards: int, channels: int, resolution: int
) -> dict[str, Any]:
    """What rebuilds a router: its ``model`` node (``_target_`` + keyword arguments) and the shapes."""
    model = dict(router_cfg.get("model") or {})
    if not model.get("_target_"):
        raise ValueError(
            "router.model has no `_target_`: name the router class, e.g. "
            "cdm.models.router.SmallRouter (see conf/router/small.yaml)"
        )
    model = {
        k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in model.items()
    }
    return {
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
    """A router from ``router_cfg["model"]`` (as in ``conf/router/*.yaml``): its ``_target_`` class
    called as ``cls(n_shards, channels, resolution, **kwargs)``, plus ``backbone`` (frozen there)
    when the class takes one (``BackboneHeadRouter``).
    """
    spec = router_model_config(
        router_cfg, n_shards=n_shards, channels=channels, resolution=resolution
    )
    kwargs = dict(spec["model"])
    target = kwargs.pop("_target_")
    cls = get_object(target) if isinstance(target, str) else target
    if "backbone" in inspect.signature(cls).parameters:
        if backbone is None:
            raise ValueError(f"router {target} needs the backbone: pass backbone=unet")
        kwargs["backbone"] = backbone
    return cls(n_shards, channels, resolution, **kwargs)


def router_from_artifact(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    backbone: nn.Module | None = None,
) -> nn.Module:
    """Rebuild a saved router (``ArtifactStore.load_router``) in eval mode; strict weight loading.

    The stored ``model._target_`` must be a cdm class (``cdm.models.targets.stored_target``).
    """
    model = dict(config.get("model") or {})
    model["_target_"] = stored_target(model.get("_target_"), "the router artifact's model")
    router = build_router(
        {"model": model},
        n_shards=int(config["n_shards"]),
        channels=int(config["channels"]),
        resolution=int(config["resolution"]),
        backbone=backbone,
    )
    router.load_state_dict(dict(state), strict=True)
    return router.eval()
