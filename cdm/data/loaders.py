"""Loaders of the datasets cdm ships configs for (``cdm/conf/data``): each reads a local copy
and, when it is missing, names the layout it expects. Nothing here downloads anything."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cdm.core.hashing import sha256_bytes
from cdm.data.datasets import (
    ArrayDataset,
    FileDataset,
    hash_test_split,
)

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
FASHION_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
_FASHION_LAYOUT = """<root>/
  train-images-idx3-ubyte[.gz]
  train-labels-idx1-ubyte[.gz]
  t10k-images-idx3-ubyte[.gz]
  t10k-labels-idx1-ubyte[.gz]"""
_NPZ_LAYOUT = """<path>.npz with arrays:
  images  uint8 [N,H,W] or [N,H,W,C]
  labels  int [N]
  ids     str [N]      (optional)
  scores  float [N]    (optional)
  split   str [N]      (optional: "train"/"test")"""
_CIFAR_LAYOUT = """<root>/cifar-10-batches-bin/     (or <root> itself)
  batches.meta.txt                 (10 class names, one per line)
  data_batch_1.bin ... data_batch_5.bin
  test_batch.bin                   (records: 1 label byte + 3072 pixel bytes, CHW)"""
_FOLDER_LAYOUT = """<root>/
  <class_a>/img0.png, img1.jpg, ...
  <class_b>/...
or <root>/train/<class>/... and <root>/test/<class>/..."""
_CUB_LAYOUT = """<root>/                     (CUB_200_2011, or its parent)
  images.txt                  (<image_id> <class_dir>/<file>.jpg)
  image_class_labels.txt      (<image_id> <class_id 1..200>)
  train_test_split.txt        (<image_id> <1=train, 0=test>)
  classes.txt                 (<class_id> <NNN.Class_name>)
  images/<class_dir>/<file>.jpg"""
_CARS_LAYOUT = """<root>/stanford_cars/        (torchvision StanfordCars layout; or that folder itself)
  devkit/cars_meta.mat
  devkit/cars_train_annos.mat
  cars_test_annos_withlabels.mat
  cars_train/<file>.jpg
  cars_test/<file>.jpg"""
_PETS_LAYOUT = """<root>/oxford-iiit-pet/      (torchvision OxfordIIITPet layout; or that folder itself)
  annotations/trainval.txt    (<image_id> <class_id 1..37> <species> <breed_id>)
  annotations/test.txt
  images/<image_id>.jpg"""


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
        splits=hash_test_split(ids, labels, test_fraction),
        resolution=resolution,
        channels=channels,
    )


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
        splits = hash_test_split(ids, labels, test_fraction)
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
        splits = hash_test_split(ids, np.asarray(labels), test_fraction)
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
