"""The captioned dataset (issue 14, section 2): deterministic canvases whose captions match their
pixels and attributes; a quality score that sharding=by_score bands; a local COCO-style folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from cdm.data.captioned import (
    MAX_COUNT,
    PALETTE,
    POSITIONS,
    REGIONS,
    caption_of,
    load_captioned,
    load_captioned_folder,
)
from cdm.data.datasets import dataset_from_config
from cdm.data.loaders import FASHION_DEFAULT_ROOT
from cdm.data.sharding import make_split

CONF = Path(__file__).resolve().parents[1] / "cdm" / "conf" / "data" / "captioned.yaml"
SMALL = {"n_train": 300, "n_test": 60, "kinds": ["digits"]}


@pytest.fixture(scope="module")
def clean():
    return load_captioned(**SMALL)


@pytest.fixture(scope="module")
def degraded():
    return load_captioned(**SMALL, degraded_fraction=2 / 3, levels=2)


def test_deterministic_in_the_seed_and_prefix_stable(clean):
    again = load_captioned(**SMALL)
    assert np.array_equal(again.raw, clean.raw)
    assert again.captions == clean.captions and again.attributes == clean.attributes
    assert again.content_hashes == clean.content_hashes
    other = load_captioned(**{**SMALL, "seed": 1})
    assert other.captions != clean.captions
    # canvas i of a split depends on (seed, split, i) only: a smaller dataset is a prefix
    small = load_captioned(n_train=40, n_test=10, kinds=["digits"])
    n = len(small)
    big_rows = [clean.id_to_index[i] for i in small.ids]
    assert np.array_equal(small.raw, clean.raw[big_rows]) and n == 50
    assert small.captions == [clean.captions[i] for i in big_rows]


def test_ids_are_stable_and_splits_held_out(clean):
    assert clean.ids[:2] == ["captioned/train/000000", "captioned/train/000001"]
    assert clean.ids[300] == "captioned/test/000000" and clean.splits.count("test") == 60
    assert clean.name == "captioned" and clean.channels == 3 and clean.resolution == 32
    assert clean.captions[0] == "a white 9 at the top, a yellow 0 at the bottom"  # pinned: seed 0
    assert clean.image(0).shape == (3, 32, 32)


def test_attributes_match_captions_and_pixels(clean):
    seen_positions, seen_counts = set(), set()
    for i, (caption, attrs) in enumerate(zip(clean.captions, clean.attributes, strict=True)):
        groups = attrs["objects"]
        assert caption == caption_of(groups)
        assert 1 <= attrs["n_objects"] == sum(g["count"] for g in groups) <= MAX_COUNT
        assert len({g["label"] for g in groups}) == len(groups)  # classes differ in a canvas
        assert int(clean.labels[i]) == groups[0]["label"]
        assert clean.class_names[groups[0]["label"]] == groups[0]["noun"]
        canvas = clean.raw[i].astype(int)
        ink = np.zeros(canvas.shape[:2], dtype=bool)
        for g in groups:
            assert g["position"] in POSITIONS and len(g["boxes"]) == g["count"]
            seen_positions.add(g["position"])
            seen_counts.add(g["count"])
            word = g["noun"] if g["count"] == 1 else g["plural"]
            assert f"{g['color']} {word}" in caption
            rx0, ry0, rx1, ry1 = REGIONS[g["position"]]
            rgb = np.asarray(PALETTE[g["color"]])
            for x0, y0, x1, y1 in g["boxes"]:
                assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1  # inside its position
                patch = canvas[y0:y1, x0:x1].reshape(-1, 3)
                bright = patch[patch.max(1) > 100]
                assert len(bright) >= 5  # the object is drawn ...
                ratio = bright / rgb  # ... in its colour: every pixel a scaled palette colour
                assert np.allclose(ratio, ratio.mean(1, keepdims=True), atol=0.1)
                ink[y0:y1, x0:x1] = True
        assert canvas[~ink].max() == 0  # nothing outside the objects on a clean canvas
    assert seen_positions == set(POSITIONS) and seen_counts == {1, 2, 3}


def test_degradations_give_known_quality_scores(clean, degraded):
    assert degraded.captions == clean.captions  # the same layout; only quality changes
    q = degraded.scores.numpy()
    assert set(np.unique(q)) == {0.0, 0.5, 1.0}
    assert q.tolist() == [a["quality"] for a in degraded.attributes]
    share = float((q < 1).mean())
    assert abs(share - 2 / 3) < 4 * np.sqrt(2 / 9 / len(q))  # binomial share of degraded canvases
    same = np.array([np.array_equal(a, b) for a, b in zip(clean.raw, degraded.raw, strict=True)])
    assert np.array_equal(same, q == 1.0)
    assert clean.scores.tolist() == [1.0] * len(clean)


def test_by_score_sharding_bands_the_quality(degraded):
    split = make_split(degraded, strategy="by_score", n_shards=3, seed=0)
    quality = degraded.scores.numpy()
    bands = []
    for shard in split.shards:
        q = quality[[degraded.id_to_index[i] for i in shard.ids]]
        values, counts = np.unique(q, return_counts=True)
        assert counts.max() / counts.sum() > 0.8  # one quality level dominates each band
        bands.append(float(values[counts.argmax()]))
    assert bands == [0.0, 0.5, 1.0]  # worst to best, like AE5- / AE6- / AE6+


def test_shipped_config_builds_it():
    data = OmegaConf.to_container(OmegaConf.load(CONF))
    data["kwargs"].update(n_train=20, n_test=5, fashion_limit=300)
    if not Path(FASHION_DEFAULT_ROOT).is_dir():
        data["kwargs"]["kinds"] = ["digits"]
        data["num_classes"] = 10
    ds = dataset_from_config(data)
    assert len(ds.class_names) == data["num_classes"] and len(ds) == 25
    assert ds.resolution == data["resolution"] and ds.scores is not None


@pytest.mark.skipif(
    not Path(FASHION_DEFAULT_ROOT).is_dir(),
    reason="Fashion-MNIST not installed (make data-fashion)",
)
def test_fashion_items_join_the_digits():
    ds = load_captioned(n_train=60, n_test=10, kinds=["digits", "fashion"], fashion_limit=300)
    assert len(ds.class_names) == 20 and ds.class_names[17] == "sneaker"
    assert any(g["label"] >= 10 for a in ds.attributes for g in a["objects"])


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="kinds must be"):
        load_captioned(n_train=2, n_test=1, kinds=["cats"])
    with pytest.raises(ValueError, match="colors must be"):
        load_captioned(n_train=2, n_test=1, colors=["mauve"])
    with pytest.raises(ValueError, match="data=captioned_folder"):
        load_captioned(root="/tmp")


def write_coco(root: Path) -> Path:
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k in range(3):
        name = f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / name)
        images.append({"id": 10 + k, "file_name": name, "score": 5.0 + k})
        annotations.append({"id": 100 + k, "image_id": 10 + k, "caption": f"a photo number {k} "})
    annotations.append({"id": 200, "image_id": 11, "caption": "another caption"})
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_style_captions_folder(tmp_path):
    write_coco(tmp_path)
    data = OmegaConf.to_container(OmegaConf.load(CONF.with_name("captioned_folder.yaml")))
    ds = dataset_from_config({**data, "root": str(tmp_path), "resolution": 8})
    assert ds.ids == [f"captioned_folder/img{k}.png" for k in range(3)]
    assert ds.captions == ["a photo number 0", "a photo number 1", "a photo number 2"]
    assert ds.attributes[1] == {"image_id": 11, "captions": ["a photo number 1", "another caption"]}
    assert ds.scores.tolist() == [5.0, 6.0, 7.0] and ds.splits == ["train"] * 3
    assert ds.image(0).shape == (3, 8, 8)
    make_split(ds, strategy="by_score", n_shards=3, seed=0)  # user scores band like ours
    spec = json.loads((tmp_path / "captions.json").read_text())
    spec["annotations"] = spec["annotations"][1:]
    (tmp_path / "captions.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="without a caption.*img0.png"):
        load_captioned_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_captioned_folder(str(tmp_path / "nowhere"))
