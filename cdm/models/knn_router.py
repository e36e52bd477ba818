"""k-NN router: shard weights from distances of the predicted x_0 to per-shard k-means centroids.

At step t the router embeds Tweedie's estimate x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
and scores shard i by -min_j ||e(x0_hat) - c_ij||^2 / temperature; a softmax over shards gives
its weights (Sec. 3.4's classifier replaced by nearest centroids). Each shard's centroids come
from that shard's data alone: forgetting a shard drops exactly its centroids, and adding one
computes only its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cdm.core.sampling import tweedie_x0
from cdm.models.targets import stored_target


class PixelEmbedder(nn.Module):
    """Baseline embedding: the image average-pooled to ``size`` x ``size``, flattened."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1)


class CLIPEmbedder(nn.Module):
    """CLIP image embeddings from a local ``CLIPVisionModelWithProjection`` directory (never downloads)."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no CLIP vision model at {path}: expected a directory made by "
                "CLIPVisionModelWithProjection.save_pretrained (config.json + model.safetensors). "
                "Nothing is downloaded."
            )
        self.model = CLIPVisionModelWithProjection.from_pretrained(
            path, local_files_only=True
        ).eval()
        self.image_size = int(self.model.config.image_size)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in [-1, 1], any channels/size: CLIP's own resize and normalisation."""
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = F.interpolate((x + 1) / 2, size=self.image_size, mode="bicubic", align_corners=False)
        return self.model(pixel_values=(x - self.mean) / self.std).image_embeds


class FeatureNetEmbedder(nn.Module):
    """A feature network trained on the domain (``stage=feature_net``): its penultimate features
    of the image clamped to the data range [-1, 1]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.clamp(-1, 1))


def embedder_needs_feature_net(spec: Mapping) -> bool:
    """Whether the embedder class of ``spec["_target_"]`` is built on the domain feature net
    (it takes ``net``, as ``FeatureNetEmbedder``): then the caller loads that artifact."""
    cls = stored_target(spec.get("_target_"), "knn.embedder")
    return "net" in inspect.signature(cls).parameters


def build_embedder(spec: Mapping, feature_net: nn.Module | None = None) -> nn.Module:
    """The embedder of a ``knn.embedder`` node: its ``_target_`` class with the other keys as
    keyword arguments (``{"_target_": "cdm.models.knn_router.PixelEmbedder", "size": 8}``), plus
    ``net=feature_net`` for one on the domain feature net. Centroid cards store this node, so
    only cdm classes are accepted (``cdm.models.targets.stored_target``)."""
    kwargs = dict(spec)
    cls = stored_target(kwargs.pop("_target_", None), "knn.embedder")
    if embedder_needs_feature_net(spec):
        if feature_net is None:
            raise ValueError(
                "knn=feature_net needs the dataset's trained feature net: cdm-train stage=feature_net"
            )
        kwargs["net"] = feature_net
    return cls(**kwargs)


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding from a seeded generator; returns [k, d] centroids."""
    if len(points) == 0:
        raise ValueError("k-means needs at least one point")
    k = min(k, len(points))
    generator = torch.Generator().manual_seed(seed)
    points = points.double()
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    while len(centroids) < k:  # k-means++
        d2 = torch.cdist(points, centroids).min(dim=1).values ** 2
        if float(d2.sum()) == 0:
            break
        centroids = torch.cat(
            [centroids, points[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]]
        )
    for _ in range(iters):
        assign = torch.cdist(points, centroids).argmin(dim=1)
        moved = torch.stack(
            [
                points[assign == j].mean(0) if (assign == j).any() else centroids[j]
                for j in range(len(centroids))
            ]
        )
        if torch.allclose(moved, centroids):
            break
        centroids = moved
    return centroids.float()


class KNNRouter(nn.Module):
    """``forward(x_t, t) -> logits [B, n]`` from per-shard centroids of x0_hat embeddings.

    ``eps_fn(x_t, t)`` gives the epsilon used for Tweedie's estimate (the bare backbone by default
    in cdm-sample); ``alphas_cumprod`` is the backbone's noise schedule. ``decode`` (a latent
    model's codec decoder, e.g. SD's VAE) maps the latent x0_hat to the pixels the embedder and
    the centroids live in (``cdm-train stage=knn`` embeds the clean images).
    """

    def __init__(
        self,
        embedder: nn.Module,
        centroids: list[torch.Tensor],
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        alphas_cumprod: torch.Tensor,
        temperature: float = 1.0,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not centroids:
            raise ValueError("the k-NN router needs the centroids of at least one shard")
        self.embedder = embedder
        self.centroids = [c.float() for c in centroids]
        self.eps_fn = eps_fn
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.temperature = temperature
        self.decode = decode

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[timesteps.long()]
        x0 = tweedie_x0(x_t, self.eps_fn(x_t, timesteps), abar)
        x0 = (x0 if self.decode is None else self.decode(x0)).clamp(-1, 1)
        z = self.embedder(x0).float()
        d2 = torch.stack(
            [torch.cdist(z, c.to(z.device)).min(dim=1).values ** 2 for c in self.centroids], dim=1
        )
        return -d2 / self.temperature
