"""Datasets with stable sample ids and per-sample content hashes.

Every dataset yields ``dict(image=[C,R,R] in [-1,1], label, index)`` and exposes ``ids``,
``content_hashes``, ``labels``, ``splits`` (``"train"``/``"test"``) and optional ``scores``, which is
all that sharding needs. Nothing here downloads anything: path-based loaders read a local copy and
say which layout they expect when it is missing.
"""

from __future__ import annotations

import gzip
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

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
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


def _hash_test_split(ids: Sequence[str], labels: np.ndarray, fraction: float) -> list[str]:
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


def _missing(what: str, path: Path | str | None, layout: str, fix: str = "") -> FileNotFoundError:
    where = "no root given" if path is None else f"not found: {path}"
    msg = f"{what}: {where}. Expected layout:\n{layout.rstrip()}\nNothing is downloaded."
    return FileNotFoundError(msg + (f" {fix}" if fix else ""))


def _require(paths: Sequence[Path], what: str, layout: str, fix: str = "") -> None:
    for p in paths:
        if not p.exists():
            raise _missing(what, p, layout, fix)


def _root(root: str | Path | None, what: str, layout: str, subdir: str | None = None) -> Path:
    """Resolve ``root`` (or ``root/subdir`` when that is where the data lies)."""
    if root is None:
        raise _missing(what, None, layout, "Pass root=<dir> (data.root=<dir>).")
    path = Path(root).expanduser()
    if subdir is not None and (path / subdir).is_dir():
        path = path / subdir
    if not path.is_dir():
        raise _missing(what, path, layout)
    return path


def _read_lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- loaders


def load_digits_dataset(
    resolution: int = 8, channels: int | None = None, test_fraction: float = 0.2
) -> ArrayDataset:
    """scikit-learn's 1,797 8x8 digits; a hash-based 20% per class is "test"."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
    labels = d.target.astype(np.int64)
    ids = [f"digits/{i:06d}" for i in range(len(images))]
    return ArrayDataset(
        images,
        name="digits",
        ids=ids,
        labels=labels,
        class_names=[str(c) for c in range(10)],
        splits=_hash_test_split(ids, labels, test_fraction),
        resolution=resolution,
        channels=channels,
    )


FASHION_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
_FASHION_LAYOUT = """<root>/
  train-images-idx3-ubyte[.gz]
  train-labels-idx1-ubyte[.gz]
  t10k-images-idx3-ubyte[.gz]
  t10k-labels-idx1-ubyte[.gz]"""


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, dims) holding uint8 data."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    root: str | None = None,
    resolution: int = 28,
    channels: int | None = None,
    limit_per_split: int | None = None,
) -> ArrayDataset:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files (60k train + 10k test)."""
    path = Path(root or FASHION_DEFAULT_ROOT).expanduser()
    fix = (
        f"Fashion-MNIST not found at {path}: run 'make data-fashion' (installs Debian's "
        "dataset-fashion-mnist) or set data.root=<dir with train-images-idx3-ubyte...>"
    )

    def find(stem: str) -> Path:
        for cand in (path / stem, path / f"{stem}.gz"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(
            f"{fix}\nMissing: {path / stem}[.gz]. Expected layout:\n{_FASHION_LAYOUT}\nNothing is downloaded."
        )

    images, labels, splits, ids = [], [], [], []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(find(f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(find(f"{prefix}-labels-idx1-ubyte"))
        if limit_per_split is not None:
            x, y = x[:limit_per_split], y[:limit_per_split]
        images.append(x)
        labels.append(y.astype(np.int64))
        splits += [split] * len(x)
        ids += [f"fashion_mnist/{split}/{i:06d}" for i in range(len(x))]
    return ArrayDataset(
        np.concatenate(images),
        name="fashion_mnist",
        ids=ids,
        labels=np.concatenate(labels),
        class_names=FASHION_CLASSES,
        splits=splits,
        resolution=resolution,
        channels=channels,
    )


_NPZ_LAYOUT = """<path>.npz with arrays:
  images  uint8 [N,H,W] or [N,H,W,C]
  labels  int [N]
  ids     str [N]      (optional)
  scores  float [N]    (optional)
  split   str [N]      (optional: "train"/"test")"""


def load_npz(
    path: str | None = None,
    resolution: int | None = None,
    channels: int | None = None,
    name: str | None = None,
    test_fraction: float = 0.0,
    root: str | None = None,
) -> ArrayDataset:
    """A ``.npz`` file (``path``, or ``root`` as an alias); ids default to ``{name}/{index:06d}``
    (name defaults to the file stem); without a ``split`` array, a hash-based ``test_fraction``."""
    if (path or root) is None:
        raise _missing("npz", None, _NPZ_LAYOUT, "Pass path=<file.npz> (data.root=<file.npz>).")
    p = Path(path or root).expanduser()
    if not p.is_file():
        raise _missing("npz", p, _NPZ_LAYOUT)
    name = name or p.stem
    with np.load(p, allow_pickle=False) as f:
        missing = [k for k in ("images", "labels") if k not in f.files]
        if missing:
            raise ValueError(f"{p}: missing arrays {missing}. Expected:\n{_NPZ_LAYOUT}")
        images = f["images"]
        labels = f["labels"].astype(np.int64)
        ids = (
            [str(s) for s in f["ids"]]
            if "ids" in f.files
            else [f"{name}/{i:06d}" for i in range(len(images))]
        )
        scores = f["scores"].astype(np.float32) if "scores" in f.files else None
        splits = [str(s) for s in f["split"]] if "split" in f.files else None
    if splits is None:
        splits = _hash_test_split(ids, labels, test_fraction)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return ArrayDataset(
        images,
        name=name,
        ids=ids,
        labels=labels,
        class_names=[str(c) for c in range(n_classes)],
        splits=splits,
        resolution=resolution,
        channels=channels,
        scores=scores,
    )


_CIFAR_LAYOUT = """<root>/cifar-10-batches-bin/     (or <root> itself)
  batches.meta.txt                 (10 class names, one per line)
  data_batch_1.bin ... data_batch_5.bin
  test_batch.bin                   (records: 1 label byte + 3072 pixel bytes, CHW)"""


def load_cifar10(
    root: str | None = None, resolution: int = 32, channels: int | None = None
) -> ArrayDataset:
    """CIFAR-10, binary version (no pickle). ids ``cifar10/{split}/{index:06d}``."""
    base = _root(root, "cifar10", _CIFAR_LAYOUT, subdir="cifar-10-batches-bin")
    files = [("train", base / f"data_batch_{k}.bin") for k in range(1, 6)] + [
        ("test", base / "test_batch.bin")
    ]
    _require([base / "batches.meta.txt"] + [f for _, f in files], "cifar10", _CIFAR_LAYOUT)
    class_names = [
        s.strip() for s in (base / "batches.meta.txt").read_text().splitlines() if s.strip()
    ]
    pixels, labels, splits, ids, hashes = [], [], [], [], []
    counts = {"train": 0, "test": 0}
    for split, f in files:
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        if raw.size % 3073:
            raise ValueError(
                f"{f}: size {raw.size} is not a multiple of 3073 (1 label + 3072 pixels)"
            )
        rec = raw.reshape(-1, 3073)
        labels.append(rec[:, 0].astype(np.int64))
        pixels.append(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        hashes += [sha256_bytes(r[1:].tobytes()) for r in rec]  # stored CHW bytes
        ids += [f"cifar10/{split}/{counts[split] + i:06d}" for i in range(len(rec))]
        splits += [split] * len(rec)
        counts[split] += len(rec)
    return ArrayDataset(
        np.concatenate(pixels),
        name="cifar10",
        ids=ids,
        labels=np.concatenate(labels),
        class_names=class_names,
        splits=splits,
        resolution=resolution,
        channels=channels,
        content_hashes=hashes,
    )


_FOLDER_LAYOUT = """<root>/
  <class_a>/img0.png, img1.jpg, ...
  <class_b>/...
or <root>/train/<class>/... and <root>/test/<class>/..."""


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_image_folder(
    root: str | None = None,
    resolution: int = 64,
    channels: int | None = None,
    test_fraction: float = 0.0,
    name: str = "image_folder",
    cache: bool = False,
) -> FileDataset:
    """``root/<class>/<files>`` (classes sorted by name), or ``root/train`` + ``root/test``."""
    base = _root(root, name, _FOLDER_LAYOUT)
    has_splits = (base / "train").is_dir() and (base / "test").is_dir()
    parts = [("train", base / "train"), ("test", base / "test")] if has_splits else [(None, base)]
    class_names = sorted({d.name for _, top in parts for d in top.iterdir() if d.is_dir()})
    if not class_names:
        raise _missing(name, base / "<class_name>", _FOLDER_LAYOUT)
    paths, labels, splits, ids = [], [], [], []
    for split, top in parts:
        for c, cls in enumerate(class_names):
            if not (top / cls).is_dir():
                continue
            for p in _list_images(top / cls):
                paths.append(p)
                labels.append(c)
                splits.append(split)
                ids.append(f"{name}/{p.relative_to(base).as_posix()}")
    if not paths:
        raise _missing(name, base / "<class_name>/<image files>", _FOLDER_LAYOUT)
    if not has_splits:
        splits = _hash_test_split(ids, np.asarray(labels), test_fraction)
    return FileDataset(
        paths,
        name=name,
        ids=ids,
        labels=labels,
        class_names=class_names,
        splits=splits,
        resolution=resolution,
        channels=channels,
        cache=cache,
    )


_CUB_LAYOUT = """<root>/                     (CUB_200_2011, or its parent)
  images.txt                  (<image_id> <class_dir>/<file>.jpg)
  image_class_labels.txt      (<image_id> <class_id 1..200>)
  train_test_split.txt        (<image_id> <1=train, 0=test>)
  classes.txt                 (<class_id> <NNN.Class_name>)
  images/<class_dir>/<file>.jpg"""


def load_cub200(
    root: str | None = None, resolution: int = 64, channels: int | None = 3, cache: bool = False
) -> FileDataset:
    """Caltech-UCSD Birds 200-2011. ids ``cub200/<class_dir>/<file>``."""
    base = _root(root, "cub200", _CUB_LAYOUT, subdir="CUB_200_2011")
    names = [
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "classes.txt",
        "images",
    ]
    _require([base / n for n in names], "cub200", _CUB_LAYOUT)
    images = {r[0]: r[1] for r in _read_lines(base / "images.txt")}
    labels = {r[0]: int(r[1]) - 1 for r in _read_lines(base / "image_class_labels.txt")}
    is_train = {r[0]: r[1] == "1" for r in _read_lines(base / "train_test_split.txt")}
    classes = sorted(_read_lines(base / "classes.txt"), key=lambda r: int(r[0]))
    order = sorted(images, key=int)
    return FileDataset(
        [base / "images" / images[k] for k in order],
        name="cub200",
        ids=[f"cub200/{images[k]}" for k in order],
        labels=[labels[k] for k in order],
        class_names=[r[1].split(".", 1)[-1] for r in classes],
        splits=["train" if is_train[k] else "test" for k in order],
        resolution=resolution,
        channels=channels,
        cache=cache,
    )


_CARS_LAYOUT = """<root>/stanford_cars/        (torchvision StanfordCars layout; or that folder itself)
  devkit/cars_meta.mat
  devkit/cars_train_annos.mat
  cars_test_annos_withlabels.mat
  cars_train/<file>.jpg
  cars_test/<file>.jpg"""


def load_stanford_cars(
    root: str | None = None, resolution: int = 64, channels: int | None = 3, cache: bool = False
) -> FileDataset:
    """Stanford Cars (196 classes). ids ``stanford_cars/cars_{split}/<file>``."""
    import scipy.io as sio

    base = _root(root, "stanford_cars", _CARS_LAYOUT, subdir="stanford_cars")
    sources = [
        ("train", base / "devkit" / "cars_train_annos.mat", base / "cars_train"),
        ("test", base / "cars_test_annos_withlabels.mat", base / "cars_test"),
    ]
    meta = base / "devkit" / "cars_meta.mat"
    _require([meta] + [p for _, a, d in sources for p in (a, d)], "stanford_cars", _CARS_LAYOUT)
    class_names = [str(c) for c in np.atleast_1d(sio.loadmat(meta, squeeze_me=True)["class_names"])]
    paths, labels, splits = [], [], []
    for split, annos, folder in sources:
        for a in np.atleast_1d(sio.loadmat(annos, squeeze_me=True)["annotations"]):
            paths.append(folder / str(a["fname"]))
            labels.append(int(a["class"]) - 1)
            splits.append(split)
    return FileDataset(
        paths,
        name="stanford_cars",
        ids=[f"stanford_cars/{p.relative_to(base).as_posix()}" for p in paths],
        labels=labels,
        class_names=class_names,
        splits=splits,
        resolution=resolution,
        channels=channels,
        cache=cache,
    )


_PETS_LAYOUT = """<root>/oxford-iiit-pet/      (torchvision OxfordIIITPet layout; or that folder itself)
  annotations/trainval.txt    (<image_id> <class_id 1..37> <species> <breed_id>)
  annotations/test.txt
  images/<image_id>.jpg"""


def load_oxford_pets(
    root: str | None = None, resolution: int = 64, channels: int | None = 3, cache: bool = False
) -> FileDataset:
    """Oxford-IIIT Pet (37 breeds); "trainval" is our "train". ids ``oxford_pets/<image_id>.jpg``."""
    base = _root(root, "oxford_pets", _PETS_LAYOUT, subdir="oxford-iiit-pet")
    anns = {
        "train": base / "annotations" / "trainval.txt",
        "test": base / "annotations" / "test.txt",
    }
    _require([*anns.values(), base / "images"], "oxford_pets", _PETS_LAYOUT)
    paths, labels, splits, raw_names = [], [], [], {}
    for split, f in anns.items():
        for row in _read_lines(f):
            if row[0].startswith("#"):
                continue
            image_id, label = row[0], int(row[1]) - 1
            paths.append(base / "images" / f"{image_id}.jpg")
            labels.append(label)
            splits.append(split)
            raw_names.setdefault(label, image_id.rsplit("_", 1)[0])
    n_classes = max(raw_names) + 1 if raw_names else 0
    class_names = [
        " ".join(part.title() for part in raw_names.get(c, str(c)).split("_"))
        for c in range(n_classes)
    ]
    return FileDataset(
        paths,
        name="oxford_pets",
        ids=[f"oxford_pets/{p.name}" for p in paths],
        labels=labels,
        class_names=class_names,
        splits=splits,
        resolution=resolution,
        channels=channels,
        cache=cache,
    )


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
    """``parts=[{"_target_": "cdm.data.datasets.load_digits_dataset"}, {"_target_":
    "cdm.data.datasets.load_fashion_mnist", "limit_per_split": 1500}]``, each built at
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
