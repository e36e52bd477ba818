"""Datasets: stable ids, content hashes, transforms and the loaders' file parsers."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cdm.data.datasets import ArrayDataset, build_dataset, dataset_from_config
from cdm.data.loaders import FASHION_DEFAULT_ROOT, load_cifar10
from cdm.jobs.config import config_dir

DATA_CONF = Path(config_dir()) / "data"


def build(option: str, **kwargs):
    """The loader named by ``conf/data/<option>.yaml``'s ``_target_``, called with ``kwargs``."""
    return build_dataset(OmegaConf.load(DATA_CONF / f"{option}.yaml")._target_, **kwargs)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def digits():
    return build("digits")


def test_digits_shape_range_ids(digits):
    assert len(digits) == 1797 and digits.channels == 1 and digits.resolution == 8
    item = digits[5]
    assert item["image"].shape == (1, 8, 8) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.long and int(item["index"]) == 5
    assert -1.0 <= digits.cache.min() < 0 < digits.cache.max() <= 1.0
    assert digits.ids[123] == "digits/000123"
    assert digits.labels.dtype == torch.long and digits.scores is None
    assert digits.id_to_index["digits/000123"] == 123
    # hash-based 20% test split per class
    for c in range(10):
        members = [i for i in range(len(digits)) if digits.labels[i] == c]
        n_test = sum(digits.splits[i] == "test" for i in members)
        assert n_test == round(0.2 * len(members))


def test_digits_stable_and_hash_tracks_pixels(digits):
    again = build("digits")
    assert again.ids == digits.ids and again.content_hashes == digits.content_hashes
    assert again.splits == digits.splits
    assert digits.content_hashes[0] == sha(np.ascontiguousarray(digits.raw[0]).tobytes())
    images = digits.raw.copy()
    images[0, 3, 3] ^= 1
    changed = ArrayDataset(
        images,
        name="digits",
        ids=digits.ids,
        labels=digits.labels.numpy(),
        class_names=digits.class_names,
        splits=digits.splits,
    )
    assert changed.content_hashes[0] != digits.content_hashes[0]
    assert changed.content_hashes[1:] == digits.content_hashes[1:]


def test_digits_resize_and_channels():
    ds = build("digits", resolution=16, channels=3)
    x = ds[0]["image"]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[1])
    assert x.min() >= -1 and x.max() <= 1


def test_unknown_or_wrong_dataset_target():
    with pytest.raises(ImportError, match="mnist"):
        build_dataset("cdm.data.datasets.load_mnist")
    with pytest.raises(TypeError, match="not a dataset: return a cdm.data.datasets.SampleDataset"):
        build_dataset("builtins.dict", resolution=8)
    with pytest.raises(ValueError, match="has no `_target_`"):
        dataset_from_config({"name": "digits", "resolution": 8, "channels": 1, "kwargs": {}})
    shipped = {p.stem for p in DATA_CONF.glob("*.yaml")}
    assert {"digits", "fashion_mnist", "npz", "image_folder", "cifar10", "cub200"} <= shipped


def test_dataset_from_config_passes_resolution_channels_root_and_kwargs(tmp_path):
    images = np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4)
    np.savez(tmp_path / "four.npz", images=images, labels=np.array([0, 1, 0, 1]))
    data = OmegaConf.load(DATA_CONF / "npz.yaml")
    data.root, data.resolution, data.channels = str(tmp_path / "four.npz"), 8, 3
    data.kwargs = {"test_fraction": 0.5}
    ds = dataset_from_config(OmegaConf.to_container(data))
    assert ds.name == "four" and ds[0]["image"].shape == (3, 8, 8) and ds.splits.count("test") == 2


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(
        path,
        images=images,
        labels=np.array([0, 1, 0, 1, 2, 2]),
        ids=np.array([f"toy/{k}" for k in "abcdef"]),
        scores=np.linspace(0, 1, 6),
        split=np.array(["train"] * 4 + ["test"] * 2),
    )
    ds = build("npz", path=str(path), resolution=8)
    assert ds.ids[2] == "toy/c" and ds.splits[-1] == "test" and ds.class_names == ["0", "1", "2"]
    assert ds.channels == 3 and ds[0]["image"].shape == (3, 8, 8)
    assert torch.allclose(ds.scores, torch.linspace(0, 1, 6))
    assert ds.content_hashes[1] == sha(images[1].tobytes())
    # minimal file: default ids from the file stem, grayscale, hash-based test split, root alias
    np.savez(tmp_path / "mini.npz", images=images[..., 0], labels=np.zeros(6, dtype=int))
    mini = build("npz", root=str(tmp_path / "mini.npz"), channels=1, test_fraction=0.5)
    assert mini.ids[0] == "mini/000000" and mini.splits.count("test") == 3
    assert mini[0]["image"].shape == (1, 4, 4) and mini.scores is None
    exact = (images[0, ..., 0].astype(np.float32) / 127.5 - 1)[None]
    assert torch.allclose(mini[0]["image"], torch.from_numpy(exact))


def _png(path: Path, size=(6, 6), color=(10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder(tmp_path):
    for cls in ("cat", "ant"):
        for k in range(3):
            _png(tmp_path / cls / f"{k}.png", size=(8, 12), color=(k * 50, 100, 200))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = build("image_folder", root=str(tmp_path), resolution=4, cache=True)
    assert ds.class_names == ["ant", "cat"] and len(ds) == 6
    assert ds.ids[0] == "image_folder/ant/0.png" and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.content_hashes[0] == sha((tmp_path / "ant" / "0.png").read_bytes())
    assert ds.channels == 3 and set(ds.splits) == {"train"}
    x = ds[1]["image"]
    assert x.shape == (3, 4, 4) and torch.allclose(x[2], torch.full((4, 4), 200 / 127.5 - 1))
    assert ds[1]["image"] is x  # cached
    gray = build("image_folder", root=str(tmp_path), resolution=4, channels=1, test_fraction=0.34)
    assert gray[0]["image"].shape == (1, 4, 4) and gray.splits.count("test") == 2


def test_image_folder_train_test_layout(tmp_path):
    _png(tmp_path / "train" / "a" / "x.png")
    _png(tmp_path / "train" / "b" / "y.png")
    _png(tmp_path / "test" / "b" / "z.png")
    ds = build("image_folder", root=str(tmp_path), resolution=4)
    assert ds.ids == [
        "image_folder/train/a/x.png",
        "image_folder/train/b/y.png",
        "image_folder/test/b/z.png",
    ]
    assert ds.splits == ["train", "train", "test"] and ds.labels.tolist() == [0, 1, 1]


def test_cifar10_binary_parser(tmp_path):
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    (base / "batches.meta.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n\n")
    rng = np.random.default_rng(0)
    records = {}
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, size=(2, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=2)
        (base / name).write_bytes(rec.tobytes())
        records[name] = rec
    ds = load_cifar10(root=str(tmp_path))
    assert len(ds) == 12 and ds.class_names[3] == "c3"
    assert ds.ids[9] == "cifar10/train/000009" and ds.ids[10] == "cifar10/test/000000"
    assert ds.splits.count("test") == 2
    first = records["data_batch_1.bin"][0]
    assert int(ds.labels[0]) == first[0] and ds.content_hashes[0] == sha(first[1:].tobytes())
    red = torch.from_numpy(first[1:1025].reshape(32, 32).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(ds[0]["image"][0], red)
    (base / "test_batch.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="3073"):
        load_cifar10(root=str(base))


def test_cub200_and_pets_layouts(tmp_path):
    cub = tmp_path / "CUB_200_2011"
    for rel in ["001.Albatross/a_1.jpg", "002.Wren/w_2.jpg"]:
        _png(cub / "images" / rel)
    (cub / "images.txt").write_text("1 001.Albatross/a_1.jpg\n2 002.Wren/w_2.jpg\n")
    (cub / "image_class_labels.txt").write_text("1 1\n2 2\n")
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n")
    (cub / "classes.txt").write_text("1 001.Albatross\n2 002.Wren\n")
    ds = build("cub200", root=str(tmp_path), resolution=4)
    assert ds.ids == ["cub200/001.Albatross/a_1.jpg", "cub200/002.Wren/w_2.jpg"]
    assert ds.class_names == ["Albatross", "Wren"] and ds.splits == ["train", "test"]
    assert ds[1]["image"].shape == (3, 4, 4)

    pets = tmp_path / "oxford-iiit-pet"
    _png(pets / "images" / "Abyssinian_1.jpg")
    _png(pets / "images" / "great_pyrenees_2.jpg")
    (pets / "annotations").mkdir()
    (pets / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\n")
    (pets / "annotations" / "test.txt").write_text("great_pyrenees_2 2 2 1\n")
    ds = build("oxford_pets", root=str(tmp_path), resolution=4)
    assert ds.ids == ["oxford_pets/Abyssinian_1.jpg", "oxford_pets/great_pyrenees_2.jpg"]
    assert ds.class_names == ["Abyssinian", "Great Pyrenees"] and ds.splits == ["train", "test"]


def test_stanford_cars_layout(tmp_path):
    sio = pytest.importorskip("scipy.io")
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    _png(base / "cars_train" / "00001.jpg")
    _png(base / "cars_test" / "00001.jpg")
    annos = np.array([("00001.jpg", 2)], dtype=[("fname", "O"), ("class", "O")])
    sio.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos})
    sio.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos})
    names = np.array(["AM General Hummer", "Acura RL"], dtype=object)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    ds = build("stanford_cars", root=str(tmp_path), resolution=4)
    assert ds.ids == ["stanford_cars/cars_train/00001.jpg", "stanford_cars/cars_test/00001.jpg"]
    assert ds.labels.tolist() == [1, 1] and ds.class_names[1] == "Acura RL"


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cifar10", {}),
        ("cub200", {}),
        ("stanford_cars", {}),
        ("oxford_pets", {}),
        ("image_folder", {}),
        ("npz", {"path": "nope.npz"}),
    ],
)
def test_missing_paths_explain_layout(tmp_path, name, kwargs):
    kwargs = {"root": str(tmp_path / "nope"), **kwargs}
    if name == "npz":
        kwargs = {"path": str(tmp_path / "nope.npz")}
    with pytest.raises(FileNotFoundError) as err:
        build(name, **kwargs)
    msg = str(err.value)
    assert "nope" in msg and "Expected layout" in msg and "Nothing is downloaded" in msg


def test_missing_root_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no root given"):
        build("cifar10")
    (tmp_path / "batches.meta.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
        build("cifar10", root=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class_name"):
        build("image_folder", root=str(tmp_path / "empty"))


def test_fashion_mnist_missing_root_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build("fashion_mnist", root=str(tmp_path / "absent"))
    msg = str(err.value)
    assert "make data-fashion" in msg and "data.root=" in msg and "train-images-idx3-ubyte" in msg


def _idx(data: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    return header + data.astype(np.uint8).tobytes()


def test_fashion_mnist_idx_parser(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 5, True), ("t10k", 3, False)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            path = tmp_path / f"{prefix}-{kind}-ubyte"
            if gz:
                path.with_suffix(".gz").write_bytes(gzip.compress(_idx(arr)))
            else:
                path.write_bytes(_idx(arr))
    ds = build("fashion_mnist", root=str(tmp_path), limit_per_split=4)
    assert len(ds) == 7 and ds.splits.count("test") == 3
    assert ds.ids[4] == "fashion_mnist/test/000000" and ds[0]["image"].shape == (1, 28, 28)


def test_fashion_mnist_real_files():
    if (
        not (Path(FASHION_DEFAULT_ROOT) / "train-images-idx3-ubyte.gz").exists()
        and not (Path(FASHION_DEFAULT_ROOT) / "train-images-idx3-ubyte").exists()
    ):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make data-fashion)")
    ds = build("fashion_mnist", limit_per_split=50, resolution=16)
    assert len(ds) == 100 and ds.class_names[9] == "Ankle boot"
    assert (
        ds[0]["image"].shape == (1, 16, 16) and ds.labels[0] == 9
    )  # first train image: ankle boot
