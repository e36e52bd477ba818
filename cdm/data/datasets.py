"""Datasets with stable sample ids and per-sample content hashes.

Every dataset yields ``dict(image=[C,R,R] in [-1,1], label, index)`` and exposes ``ids``,
``content_hashes``, ``labels``, ``splits`` (``"train"``/``"test"``) and optional ``scores``, which is
all that sharding needs. Nothing here downloads anything: path-based loaders read a local copy and
say which layout they expect when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import get_object
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from cdm.core.hashing import sha256_bytes

_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL's "L" conversion


class SampleDataset(Dataset):
    """Base class: metadata columns plus ``image(i)``, implemented by subclasses."""

    def __init__(
        self,
        *,
        name: str,
        ids: Sequence[str],
        content_hashes: Sequence[str],
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        class_names: Sequence[str],
        splits: Sequence[str],
        channels: int,
        resolution: int,
        scores: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        n = len(ids)
        self.name = name
        self.ids = list(ids)
        self.content_hashes = list(content_hashes)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
        self.class_names = list(class_names)
        self.splits = list(splits)
        self.scores = (
            None
            if scores is None
            else torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1)
        )
        self.channels = int(channels)
        self.resolution = int(resolution)
        lengths = {
            "content_hashes": len(self.content_hashes),
            "labels": len(self.labels),
            "splits": len(self.splits),
        }
        if self.scores is not None:
            lengths["scores"] = len(self.scores)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"{name}: {n} ids but column lengths {bad}")
        if len(set(self.ids)) != n:
            raise ValueError(f"{name}: sample ids are not unique")
        if not set(self.splits) <= {"train", "test"}:
            raise ValueError(
                f"{name}: splits must be 'train' or 'test', got {sorted(set(self.splits))}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"{name}: channels must be 1 or 3, got {channels}")
        if self.resolution < 1:
            raise ValueError(f"{name}: resolution must be >= 1, got {resolution}")

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, i: int) -> torch.Tensor:
        """The transformed image ``[C, R, R]`` in ``[-1, 1]``."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        return {
            "image": self.image(i),
            "label": self.labels[i],
            "index": torch.tensor(i, dtype=torch.long),
        }

    @cached_property
    def id_to_index(self) -> dict[str, int]:
        """Map from sample id to dataset index."""
        return {sid: i for i, sid in enumerate(self.ids)}

    def __repr__(self) -> str:
        n_train = sum(s == "train" for s in self.splits)
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, train={n_train}, "
            f"test={len(self) - n_train}, classes={len(self.class_names)}, "
            f"channels={self.channels}, resolution={self.resolution})"
        )


# ----------------------------------------------------------------------------- transforms


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x``: float ``[N, C, H, W]`` with C in {1, 3, 4}; returns ``[N, channels, H, W]``."""
    if x.shape[1] == 4:  # drop alpha
        x = x[:, :3]
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    return (x * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _resize_square(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Center-crop ``[N, C, H, W]`` to a square, then resize (bilinear, antialias)."""
    h, w = x.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top : top + s, left : left + s]
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    return x


def _native_channels(images: np.ndarray) -> int:
    return 1 if images.ndim == 3 or images.shape[-1] == 1 else 3


def hash_test_split(ids: Sequence[str], labels: np.ndarray, fraction: float) -> list[str]:
    """Deterministic held-out split: per class, the ``round(fraction * n_c)`` ids with the
    smallest sha256(id) are "test". No RNG involved."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {fraction}")
    splits = ["train"] * len(ids)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c).tolist()
        members.sort(key=lambda i: sha256_bytes(ids[i].encode()))
        for i in members[: int(round(fraction * len(members)))]:
            splits[i] = "test"
    return splits


# ----------------------------------------------------------------------------- array datasets


class ArrayDataset(SampleDataset):
    """In-memory uint8 images (``N,H,W`` or ``N,H,W,C``), transformed once into a float cache."""

    def __init__(
        self,
        images: np.ndarray,
        *,
        name: str,
        ids: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        splits: Sequence[str],
        resolution: int | None = None,
        channels: int | None = None,
        scores: Sequence[float] | np.ndarray | None = None,
        content_hashes: Sequence[str] | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"{name}: images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} {images.shape}"
            )
        if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"{name}: images must have 1, 3 or 4 channels (last axis), got {images.shape}"
            )
        if resolution is None:
            if images.shape[1] != images.shape[2]:
                raise ValueError(
                    f"{name}: images are {images.shape[1:3]}, not square: pass resolution="
                )
            resolution = images.shape[1]
        channels = _native_channels(images) if channels is None else channels
        if content_hashes is None:
            content_hashes = [sha256_bytes(np.ascontiguousarray(im).tobytes()) for im in images]
        super().__init__(
            name=name,
            ids=ids,
            content_hashes=content_hashes,
            labels=labels,
            class_names=class_names,
            splits=splits,
            channels=channels,
            resolution=resolution,
            scores=scores,
        )
        self.raw = images
        self.cache = self._transform_all(images)

    def _transform_all(self, images: np.ndarray, chunk: int = 4096) -> torch.Tensor:
        out = torch.empty(len(images), self.channels, self.resolution, self.resolution)
        for start in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk])).float()
            x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
            x = _resize_square(_convert_channels(x, self.channels), self.resolution)
            out[start : start + chunk] = (x / 127.5 - 1.0).clamp(-1.0, 1.0)
        return out

    def image(self, i: int) -> torch.Tensor:
        return self.cache[i]


# ----------------------------------------------------------------------------- file datasets


class FileDataset(SampleDataset):
    """Images read lazily from disk with PIL (optionally kept in memory after the first read)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        name: str,
        ids: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        splits: Sequence[str],
        resolution: int = 64,
        channels: int | None = None,
        scores: Sequence[float] | np.ndarray | None = None,
        cache: bool = False,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if channels is None:
            channels = 3
            if self.paths:
                with Image.open(self.paths[0]) as im:
                    channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
        super().__init__(
            name=name,
            ids=ids,
            content_hashes=[sha256_bytes(p.read_bytes()) for p in self.paths],
            labels=labels,
            class_names=class_names,
            splits=splits,
            channels=channels,
            resolution=resolution,
            scores=scores,
        )
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def load(self, i: int) -> torch.Tensor:
        """Read and transform file ``i``."""
        with Image.open(self.paths[i]) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            im = ImageOps.fit(im, (self.resolution, self.resolution), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
        x = torch.from_numpy(arr.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return x / 127.5 - 1.0

    def image(self, i: int) -> torch.Tensor:
        if self._cache is None:
            return self.load(i)
        if i not in self._cache:
            self._cache[i] = self.load(i)
        return self._cache[i]


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- loaders


class UnionDataset(SampleDataset):
    """Several datasets at one resolution/channel count, side by side (e.g. a cross-domain pair).

    Labels are the part's index (``label_by="domain"``), the part's classes offset so they stay
    distinct (``label_by="class"``), or kept as they are in the first part's class space
    (``label_by="keep"``: sources added to an experiment, whose labels mean the same classes).
    Ids keep their dataset prefix, so they stay unique. ``base`` is the first part.
    """

    def __init__(self, parts: Sequence[SampleDataset], label_by: str = "domain") -> None:
        if not parts:
            raise ValueError("union: give at least one dataset in data.kwargs.parts")
        if len({(p.resolution, p.channels) for p in parts}) != 1:
            raise ValueError("union: every part needs the same resolution and channels")
        if label_by not in ("domain", "class", "keep"):
            raise ValueError(
                f"union: label_by must be 'domain', 'class' or 'keep', got {label_by!r}"
            )
        labels, names, offset = [], [], 0
        for k, part in enumerate(parts):
            if label_by == "keep":
                n_classes = len(parts[0].class_names)
                if (
                    len(part)
                    and not 0 <= int(part.labels.min()) <= int(part.labels.max()) < n_classes
                ):
                    raise ValueError(
                        f"union: {part.name} has labels outside the {n_classes} classes of "
                        f"{parts[0].name} (0..{n_classes - 1})"
                    )
                labels.append(part.labels)
                names = list(parts[0].class_names)
            elif label_by == "domain":
                labels.append(torch.full((len(part),), k, dtype=torch.long))
                names.append(part.name)
            else:
                labels.append(part.labels + offset)
                names += [f"{part.name}/{c}" for c in part.class_names]
                offset += len(part.class_names)
        super().__init__(
            name=parts[0].name if label_by == "keep" else "+".join(p.name for p in parts),
            ids=[i for p in parts for i in p.ids],
            content_hashes=[h for p in parts for h in p.content_hashes],
            labels=torch.cat(labels),
            class_names=names,
            splits=[s for p in parts for s in p.splits],
            channels=parts[0].channels,
            resolution=parts[0].resolution,
        )
        self.parts = list(parts)
        self.base = parts[0] if label_by == "keep" else self
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def image(self, i: int) -> torch.Tensor:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k].image(i - int(self.starts[k]))


def load_union(
    parts: Sequence[Mapping[str, Any]],
    resolution: int = 8,
    channels: int | None = 1,
    label_by: str = "domain",
) -> UnionDataset:
    """``parts=[{"_target_": "cdm.data.loaders.load_digits_dataset"}, {"_target_":
    "cdm.data.loaders.load_fashion_mnist", "limit_per_split": 1500}]``, each built at
    ``resolution`` and ``channels``."""
    built = []
    for spec in parts:
        kwargs = dict(spec)
        target = kwargs.pop("_target_", None)
        if target is None:
            raise ValueError(f"union: every part needs a `_target_` (a dataset loader), got {spec}")
        built.append(build_dataset(target, resolution=resolution, channels=channels, **kwargs))
    return UnionDataset(built, label_by=label_by)


def build_dataset(target: str | Callable[..., SampleDataset], /, **kwargs: Any) -> SampleDataset:
    """Call a dataset loader or class (a dotted ``_target_`` path, or the callable) with ``kwargs``;
    the result must be a ``SampleDataset``."""
    loader = get_object(target) if isinstance(target, str) else target
    dataset = loader(**kwargs)
    if not isinstance(dataset, SampleDataset):
        raise TypeError(
            f"data._target_ {target!r} made a {type(dataset).__name__}, not a dataset: return a "
            "cdm.data.datasets.SampleDataset (e.g. subclass ArrayDataset)"
        )
    return dataset


def dataset_from_config(data: Mapping[str, Any]) -> SampleDataset:
    """The dataset of a ``data`` config node (``conf/data/*.yaml``): its ``_target_`` called with
    ``resolution``, ``channels``, ``root`` (when set) and ``kwargs``."""
    if not data.get("_target_"):
        raise ValueError(
            f"data {data.get('name')!r} has no `_target_`: name the loader or SampleDataset class "
            "that builds it (see conf/data/digits.yaml)"
        )
    kwargs = dict(data.get("kwargs") or {})
    if data.get("root") is not None:
        kwargs["root"] = data["root"]
    return build_dataset(
        data["_target_"], resolution=data["resolution"], channels=data["channels"], **kwargs
    )
