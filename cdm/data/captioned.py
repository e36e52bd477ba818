"""Captioned datasets whose captions can be checked (issue 14, section 2).

``load_captioned``: RGB canvases composed from the embedded 8x8 digits and, when asked for, local
Fashion-MNIST items. Each canvas holds one or two groups of objects (1-3 objects in all); a group
has a class, a colour from a small palette, a position (left, right, top, bottom, center) and a
count, and the caption is written from them by a template ("two red 7s on the left, a blue
sneaker on the right"). Every canvas keeps these ground-truth ``attributes``, so a VQA model's
answers about a generated image can be checked (``cdm.eval.tifa``). A known share of canvases is
degraded (Gaussian blur plus noise at ``levels`` strengths), and ``scores`` holds each canvas's
known quality, so ``sharding=by_score`` bands it like the paper's aesthetic shards.

``load_captioned_folder``: the paper's setting, images from a local folder with a COCO-style
captions JSON (``images`` + ``annotations``), optional per-image ``score``.

Canvas ``i`` of a split depends only on ``(seed, split, i)``: a larger ``n_train`` keeps the
smaller one's canvases as its prefix. Test canvases are drawn from the sources' test images only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from cdm.data.datasets import ArrayDataset, FileDataset, SampleDataset, hash_test_split
from cdm.data.loaders import FASHION_DEFAULT_ROOT, load_digits_dataset, load_fashion_mnist

CANVAS = 32
OBJECT_SIZE = 10
MAX_COUNT = 3
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 90, 255),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
PAIRS = (("left", "right"), ("top", "bottom"))  # two groups sit on opposite sides
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# (x0, y0, x1, y1) of each position on the canvas; objects are laid along the longer side
REGIONS = {
    "left": (0, 0, CANVAS // 2, CANVAS),
    "right": (CANVAS // 2, 0, CANVAS, CANVAS),
    "top": (0, 0, CANVAS, CANVAS // 2),
    "bottom": (0, CANVAS // 2, CANVAS, CANVAS),
    "center": (CANVAS // 4, CANVAS // 4, 3 * CANVAS // 4, 3 * CANVAS // 4),
}
# Fashion-MNIST classes (loaders.FASHION_CLASSES order) as caption nouns: (singular, plural)
FASHION_NOUNS = [("t-shirt", "t-shirts"), ("trouser", "trousers"), ("pullover", "pullovers"), ("dress", "dresses"), ("coat", "coats"), ("sandal", "sandals"), ("shirt", "shirts"), ("sneaker", "sneakers"), ("bag", "bags"), ("boot", "boots")]  # fmt: skip
KINDS = ("digits", "fashion")
_SPLIT_TAG = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Noun:
    """A class as the captions name it."""

    singular: str
    plural: str


def class_nouns(kinds: Sequence[str]) -> list[Noun]:
    """The caption nouns of the classes, in label order: digits ``"0".."9"``, then Fashion items."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"captioned: kinds must be a non-empty subset of {KINDS}, got {kinds}")
    nouns: list[Noun] = []
    if "digits" in kinds:
        nouns += [Noun(str(d), f"{d}s") for d in range(10)]
    if "fashion" in kinds:
        nouns += [Noun(s, p) for s, p in FASHION_NOUNS]
    return nouns


def caption_of(objects: Sequence[Mapping[str, Any]]) -> str:
    """The template caption of a canvas's object groups, e.g. "two red 7s on the left, a blue
    sneaker on the right"."""
    parts = []
    for g in objects:
        noun = g["noun"] if g["count"] == 1 else g["plural"]
        parts.append(
            f"{COUNT_WORDS[g['count']]} {g['color']} {noun} {POSITION_PHRASE[g['position']]}"
        )
    return ", ".join(parts)


def check_captions(name: str, n: int, captions: Sequence[str], attributes: Sequence[dict]) -> None:
    """Raise unless there is one caption and one attribute dict per sample."""
    if len(captions) != n or len(attributes) != n:
        raise ValueError(
            f"{name}: {n} samples but {len(captions)} captions and {len(attributes)} attribute "
            "dicts; give one of each per sample"
        )


class CaptionedDataset(ArrayDataset):
    """An ``ArrayDataset`` with a caption and a dict of ground-truth attributes per sample, plus
    the vocabulary the captions use: ``nouns`` (per class, in label order) and ``colors``."""

    def __init__(
        self,
        images: np.ndarray,
        *,
        captions: Sequence[str],
        attributes: Sequence[dict],
        nouns: Sequence[Noun],
        colors: Sequence[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(images, **kwargs)
        check_captions(self.name, len(self), captions, attributes)
        if len(nouns) != len(self.class_names):
            raise ValueError(f"{self.name}: {len(nouns)} nouns for {len(self.class_names)} classes")
        self.captions = list(captions)
        self.attributes = list(attributes)
        self.nouns = list(nouns)
        self.colors = list(colors)


class CaptionedFileDataset(FileDataset):
    """A ``FileDataset`` with a caption and a dict of attributes (all its captions) per image."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        captions: Sequence[str],
        attributes: Sequence[dict],
        **kwargs: Any,
    ) -> None:
        super().__init__(paths, **kwargs)
        check_captions(self.name, len(self), captions, attributes)
        self.captions = list(captions)
        self.attributes = list(attributes)


# ----------------------------------------------------------------------------- composition


def _glyph_pools(
    kinds: Sequence[str], fashion_root: str | None, fashion_limit: int
) -> dict[str, list[np.ndarray]]:
    """Per split, per class (label order of ``class_nouns``): float masks ``[n, o, o]`` in [0, 1]."""
    sources: list[SampleDataset] = []
    if "digits" in kinds:
        sources.append(load_digits_dataset(resolution=8, channels=1))
    if "fashion" in kinds:
        root = fashion_root or FASHION_DEFAULT_ROOT
        if not Path(root).expanduser().is_dir():
            raise FileNotFoundError(
                f"captioned: Fashion-MNIST not found at {root}: run 'make data-fashion' or set "
                "data.kwargs.kinds=[digits]"
            )
        sources.append(
            load_fashion_mnist(root, resolution=28, channels=1, limit_per_split=fashion_limit)
        )
    pools: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for src in sources:
        x = torch.from_numpy(np.ascontiguousarray(src.raw)).float().unsqueeze(1) / 255.0
        x = F.interpolate(x, size=(OBJECT_SIZE, OBJECT_SIZE), mode="bilinear", antialias=True)
        x = x.squeeze(1).clamp(0, 1).numpy()
        x = x / np.maximum(x.reshape(len(x), -1).max(1), 1e-6)[:, None, None]  # full-strength ink
        labels = src.labels.numpy()
        splits = np.asarray(src.splits)
        for split in pools:
            for c in range(len(src.class_names)):
                members = x[(labels == c) & (splits == split)]
                if not len(members):
                    raise ValueError(f"captioned: {src.name} has no {split} images of class {c}")
                pools[split].append(members)
    return pools


def _layout(rng: np.random.Generator, n_classes: int, colors: Sequence[str]) -> list[dict]:
    """One or two object groups (distinct classes, 1-3 objects in all) with colour and position."""
    if rng.random() < 0.5:
        position = POSITIONS[int(rng.integers(len(POSITIONS)))]
        counts = [1] if position == "center" else [int(rng.integers(1, MAX_COUNT + 1))]
        positions = [position]
    else:
        pair = PAIRS[int(rng.integers(len(PAIRS)))]
        positions = list(pair) if rng.random() < 0.5 else list(pair[::-1])
        counts = [[1, 1], [1, 2], [2, 1]][int(rng.integers(3))]
    classes = rng.choice(n_classes, size=len(positions), replace=False)
    return [
        {
            "label": int(c),
            "color": colors[int(rng.integers(len(colors)))],
            "position": p,
            "count": k,
        }
        for c, p, k in zip(classes, positions, counts, strict=True)
    ]


def _boxes(rng: np.random.Generator, position: str, count: int) -> list[list[int]]:
    """``count`` object boxes (x0, y0, x1, y1) along the longer side of ``position``'s region."""
    x0, y0, x1, y1 = REGIONS[position]
    w, h = x1 - x0, y1 - y0
    boxes = []
    for k in range(count):
        along, across = (h, w) if h >= w else (w, h)
        slot = along / count
        a = int(round(k * slot + (slot - OBJECT_SIZE) / 2)) + int(rng.integers(-1, 2))
        b = (across - OBJECT_SIZE) // 2 + int(rng.integers(-1, 2))
        a = min(max(a, 0), along - OBJECT_SIZE)
        b = min(max(b, 0), across - OBJECT_SIZE)
        bx, by = (x0 + b, y0 + a) if h >= w else (x0 + a, y0 + b)
        boxes.append([bx, by, bx + OBJECT_SIZE, by + OBJECT_SIZE])
    return boxes


def _degrade(rng: np.random.Generator, canvas: np.ndarray, severity: float) -> np.ndarray:
    """Gaussian blur (sigma 1.5 s) then Gaussian noise (std 0.15 s) at severity s in (0, 1]."""
    x = gaussian_filter(canvas.astype(np.float32), sigma=(1.5 * severity, 1.5 * severity, 0))
    x = x + rng.normal(0.0, 0.15 * 255.0 * severity, size=x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def compose_canvas(
    seed: int,
    split: str,
    index: int,
    pools: Sequence[np.ndarray],
    nouns: Sequence[Noun],
    colors: Sequence[str],
    degraded_fraction: float,
    levels: int,
) -> tuple[np.ndarray, dict]:
    """Canvas ``index`` of ``split``: uint8 ``[32, 32, 3]`` and its attributes, a function of
    ``(seed, split, index)`` and the glyph pools alone."""
    rng = np.random.default_rng([int(seed), _SPLIT_TAG[split], int(index)])
    canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.float32)
    groups = _layout(rng, len(nouns), colors)
    for g in groups:
        g["boxes"] = _boxes(rng, g["position"], g["count"])
        rgb = np.asarray(PALETTE[g["color"]], dtype=np.float32)
        pool = pools[g["label"]]
        for x0, y0, x1, y1 in g["boxes"]:
            mask = pool[int(rng.integers(len(pool)))]
            patch = canvas[y0:y1, x0:x1]
            canvas[y0:y1, x0:x1] = np.maximum(patch, mask[..., None] * rgb)
        noun = nouns[g["label"]]
        g.update(noun=noun.singular, plural=noun.plural)
    canvas = np.round(canvas).astype(np.uint8)
    u = rng.random()  # one coin per canvas: degraded with probability degraded_fraction
    level = 0
    if u < degraded_fraction:
        level = 1 + min(int(u / degraded_fraction * levels), levels - 1)
        canvas = _degrade(rng, canvas, level / levels)
    ordered = [
        {k: g[k] for k in ("label", "noun", "plural", "color", "position", "count", "boxes")}
        for g in groups
    ]
    attributes = {
        "objects": ordered,
        "n_objects": sum(g["count"] for g in groups),
        "degradation": level,
        "quality": 1.0 - level / levels,
    }
    return canvas, attributes


def load_captioned(
    resolution: int = CANVAS,
    channels: int | None = 3,
    n_train: int = 2000,
    n_test: int = 400,
    seed: int = 0,
    kinds: Sequence[str] = ("digits",),
    colors: Sequence[str] = tuple(PALETTE),
    degraded_fraction: float = 0.0,
    levels: int = 2,
    fashion_root: str | None = None,
    fashion_limit: int = 2000,
    root: str | None = None,
) -> CaptionedDataset:
    """The captioned canvases (module docstring). ids ``captioned/{split}/{index:06d}``; labels are
    the first group's class; ``scores`` = known quality ``1 - level / levels`` (1 = clean)."""
    if root is not None:
        raise ValueError(
            "captioned canvases are built from embedded data and take no data.root; for a local "
            "captions file use data=captioned_folder"
        )
    unknown = [c for c in colors if c not in PALETTE]
    if unknown or not colors:
        raise ValueError(f"captioned: colors must be a non-empty subset of {list(PALETTE)}")
    if not 0.0 <= degraded_fraction <= 1.0 or levels < 1:
        raise ValueError(
            f"captioned: need 0 <= degraded_fraction <= 1 and levels >= 1, got "
            f"{degraded_fraction}, {levels}"
        )
    kinds = list(kinds)
    nouns = class_nouns(kinds)
    pools = _glyph_pools(kinds, fashion_root, fashion_limit)
    images, captions, attributes, ids, splits = [], [], [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(int(n)):
            canvas, attrs = compose_canvas(
                seed, split, i, pools[split], nouns, list(colors), degraded_fraction, levels
            )
            images.append(canvas)
            attributes.append(attrs)
            captions.append(caption_of(attrs["objects"]))
            ids.append(f"captioned/{split}/{i:06d}")
            splits.append(split)
    return CaptionedDataset(
        np.stack(images) if images else np.zeros((0, CANVAS, CANVAS, 3), np.uint8),
        captions=captions,
        attributes=attributes,
        nouns=nouns,
        colors=list(colors),
        name="captioned",
        ids=ids,
        labels=[a["objects"][0]["label"] for a in attributes],
        class_names=[n.singular for n in nouns],
        splits=splits,
        resolution=resolution,
        channels=channels,
        scores=[a["quality"] for a in attributes],
    )


# ----------------------------------------------------------------------------- local captions


_COCO_LAYOUT = """<root>/
  captions.json   {"images": [{"id": 1, "file_name": "a.jpg", "score": 6.2 (optional),
                                 "split": "train"|"test" (optional)}, ...],
                   "annotations": [{"image_id": 1, "caption": "a cat on a mat"}, ...]}
  a.jpg, ...      (file_name is relative to root)"""


def load_captioned_folder(
    root: str | None = None,
    captions_file: str = "captions.json",
    resolution: int = 64,
    channels: int | None = 3,
    test_fraction: float = 0.0,
    name: str = "captioned_folder",
    cache: bool = False,
) -> CaptionedFileDataset:
    """Images under ``root`` with a COCO-style captions JSON (``_COCO_LAYOUT``). ids
    ``{name}/{file_name}``; the caption is the image's first annotation (by position in the file),
    all of them are in ``attributes[i]["captions"]``; an image's optional ``score`` (e.g. an
    aesthetic score) becomes the ``scores`` column, for ``sharding=by_score``."""
    if root is None:
        raise FileNotFoundError(
            f"captioned folder: no root given. Expected layout:\n{_COCO_LAYOUT}\nPass "
            "data.root=<dir>. Nothing is downloaded."
        )
    base = Path(root).expanduser()
    path = Path(captions_file) if Path(captions_file).is_absolute() else base / captions_file
    if not path.is_file():
        raise FileNotFoundError(
            f"captioned folder: {path} not found. Expected layout:\n{_COCO_LAYOUT}\n"
            "Nothing is downloaded."
        )
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict) or not {"images", "annotations"} <= spec.keys():
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'annotations' lists")
    by_image: dict[Any, list[str]] = {}
    for ann in spec["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
    images = sorted(spec["images"], key=lambda im: str(im["file_name"]))
    missing = [im["file_name"] for im in images if not by_image.get(im["id"])]
    if missing:
        raise ValueError(f"{path}: images without a caption: {missing[:3]}; caption every image")
    paths = [base / im["file_name"] for im in images]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{path}: listed images not found: {absent[:3]}")
    ids = [f"{name}/{im['file_name']}" for im in images]
    given = [im.get("split") for im in images]
    if all(s is not None for s in given):
        splits = [str(s) for s in given]
    else:
        splits = hash_test_split(ids, np.zeros(len(ids), dtype=np.int64), test_fraction)
    has_score = [im.get("score") is not None for im in images]
    if any(has_score) and not all(has_score):
        raise ValueError(f"{path}: some images have a 'score' and some not; give all or none")
    return CaptionedFileDataset(
        paths,
        captions=[by_image[im["id"]][0] for im in images],
        attributes=[{"image_id": im["id"], "captions": by_image[im["id"]]} for im in images],
        name=name,
        ids=ids,
        labels=[0] * len(images),
        class_names=["image"],
        splits=splits,
        resolution=resolution,
        channels=channels,
        scores=[float(im["score"]) for im in images] if all(has_score) and images else None,
        cache=cache,
    )
