"""k-NN router: per-shard centroids, local CLIP loading, routing of clean images to their shard."""

from __future__ import annotations

import pytest
import torch

from cdm.models.knn_router import (
    CLIPEmbedder,
    KNNRouter,
    PixelEmbedder,
    build_embedder,
    embedder_needs_feature_net,
    kmeans,
)
from cdm.store import ArtifactStore, CorruptArtifactError
from cdm.store.knn import load_centroids, save_centroids


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centers])
    a, b = kmeans(points, 3, seed=1), kmeans(points, 3, seed=1)
    assert torch.equal(a, b)
    assert torch.cdist(centers, a).min(dim=1).values.max() < 0.1


def test_router_sends_a_clean_image_to_the_shard_it_resembles():
    # two shards: dark images and bright images; at t=0 x0_hat = x_t, so routing follows the pixels
    g = torch.Generator().manual_seed(0)
    dark, bright = (
        -0.8 + 0.05 * torch.randn(20, 1, 8, 8, generator=g),
        0.8 + 0.05 * torch.randn(20, 1, 8, 8, generator=g),
    )
    embedder = PixelEmbedder(4)
    centroids = [kmeans(embedder(dark), 2), kmeans(embedder(bright), 2)]
    alphas = torch.ones(1000)
    router = KNNRouter(
        embedder, centroids, lambda x, t: torch.zeros_like(x), alphas, temperature=1.0
    )
    logits = router(torch.cat([dark[:3], bright[:3]]), torch.zeros(6, dtype=torch.long))
    assert logits.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    # removing a shard removes exactly its centroids: the other shard's logits are unchanged
    only_bright = KNNRouter(embedder, centroids[1:], lambda x, t: torch.zeros_like(x), alphas)
    torch.testing.assert_close(
        only_bright(bright[:3], torch.zeros(3, dtype=torch.long))[:, 0], logits[3:, 1]
    )


def test_clip_embedder_loads_a_local_model(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    embedder = build_embedder(
        {"_target_": "cdm.models.knn_router.CLIPEmbedder", "path": str(tmp_path / "clip")}
    )
    assert isinstance(embedder, CLIPEmbedder)
    z = embedder(torch.rand(3, 1, 8, 8) * 2 - 1)
    assert z.shape == (3, 8) and torch.isfinite(z).all()
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        CLIPEmbedder(tmp_path / "missing")


def test_centroids_round_trip_and_corruption(tmp_path):
    store = ArtifactStore(tmp_path)
    c = torch.randn(4, 16)
    save_centroids(store, "exp", "pixels", "shard-01", c, {"manifest_hash": "abc"})
    loaded, card = load_centroids(store, "exp", "pixels", "shard-01")
    assert torch.equal(loaded, c) and card["manifest_hash"] == "abc"
    path = store.centroids_dir("exp", "pixels", "shard-01") / "centroids.safetensors"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        load_centroids(store, "exp", "pixels", "shard-01")


def test_knn_stage_writes_one_centroid_file_per_shard(tmp_path, train):
    cards = train("experiment=digits_4split", "debug=tiny", "stage=knn", artifacts=tmp_path)
    store = ArtifactStore(tmp_path)
    assert [c["name"] for c in cards] == [f"shard-{k:02d}" for k in range(4)]
    for k, card in enumerate(cards):
        assert (
            card["manifest_hash"] == store.load_manifest("digits_4split", f"shard-{k:02d}")["hash"]
        )
    # a second run computes nothing: each shard's centroids are its own, made once
    assert train("experiment=digits_4split", "debug=tiny", "stage=knn", artifacts=tmp_path) == []


def test_build_embedder_from_shipped_targets_only():
    pixels = build_embedder({"_target_": "cdm.models.knn_router.PixelEmbedder", "size": 2})
    assert isinstance(pixels, PixelEmbedder) and pixels(torch.zeros(3, 1, 8, 8)).shape == (3, 4)
    spec = {"_target_": "cdm.models.knn_router.FeatureNetEmbedder"}
    assert embedder_needs_feature_net(spec) and not embedder_needs_feature_net(
        {"_target_": "cdm.models.knn_router.PixelEmbedder"}
    )
    with pytest.raises(ValueError, match="cdm-train stage=feature_net"):
        build_embedder(spec)
    with pytest.raises(ValueError, match="not a cdm class"):  # centroid cards store this node
        build_embedder({"_target_": "torch.nn.Identity"})
