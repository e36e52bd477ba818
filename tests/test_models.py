"""Backbone presets, local from_pretrained loading, text-conditional wiring, LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cdm.jobs.config import config_dir, register_resolvers
from cdm.models.adapters import attach_lora, prepare_shard_model, trainable_parameters
from cdm.models.backbone import backbone_hash, build_unet, load_pretrained_unet, predict_epsilon

register_resolvers()


def preset(name: str) -> dict:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"backbone={name}"])
    return OmegaConf.to_container(cfg.backbone, resolve=True)


@pytest.mark.parametrize(
    ("name", "size", "channels"), [("tiny", 8, 1), ("small", 8, 1), ("base", 32, 3)]
)
def test_presets_build_and_predict_epsilon(name, size, channels):
    b = preset(name)
    unet = build_unet(b["kind"], b["unet"], sample_size=size, channels=channels, num_classes=10)
    x = torch.randn(2, channels, size, size)
    eps = predict_epsilon(unet, x, torch.tensor([1, 500]), torch.tensor([3, 10]))  # 10 = null label
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_text_conditional_unet_trains_with_lora():
    b = preset("text_conditional")
    unet = build_unet(b["kind"], b["unet"], sample_size=8, channels=1, num_classes=10)
    model = prepare_shard_model(
        unet,
        {
            "_target_": "cdm.models.adapters.lora_adapter",
            "kind": "lora",
            "rank": 2,
            "alpha": 2,
            "target_modules": ["to_q", "to_k", "to_v"],
        },
    )
    params = [p for _, p in trainable_parameters(model)]
    assert params and all("lora" in n for n, _ in trainable_parameters(model))
    x = torch.randn(3, 1, 8, 8)
    context = torch.randn(3, 4, b["unet"]["cross_attention_dim"])  # e.g. text-encoder tokens
    loss = (
        predict_epsilon(model, x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), context)
        .pow(2)
        .mean()
    )
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_pretrained_unet_round_trip_from_a_local_dir(tmp_path: Path):
    b = preset("tiny")
    unet = build_unet(b["kind"], b["unet"], sample_size=8, channels=1, num_classes=None)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    loaded = load_pretrained_unet(tmp_path / "unet")
    assert backbone_hash(loaded) == backbone_hash(unet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(
        predict_epsilon(loaded, x, t), predict_epsilon(unet, x, t), rtol=0, atol=0
    )


def test_missing_pretrained_path_says_what_is_expected(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_pretrained_unet(tmp_path / "nowhere")


def test_pretrained_backbone_imports_and_trains_shards(tmp_path: Path, train):
    b = preset("tiny")
    unet = build_unet(b["kind"], b["unet"], sample_size=8, channels=1, num_classes=10)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    art = tmp_path / "art"
    args = [
        "experiment=digits_2split",
        "debug=tiny",
        "backbone=pretrained",
        f"backbone.pretrained_path={tmp_path / 'unet'}",
        "pretrain.epochs=0",  # part of the backbone's identity: every stage names the same backbone
    ]
    card = train(*args, "stage=backbone", artifacts=art)
    assert card["backbone_hash"] == backbone_hash(unet)
    assert card["parents"][0]["path"] == str(tmp_path / "unet")
    shard = train(*args, "stage=shard", "shard.index=0", artifacts=art)
    assert shard["backbone_hash"] == card["backbone_hash"]


def test_lora_target_that_matches_nothing_is_named():
    b = preset("tiny")
    unet = build_unet(b["kind"], b["unet"], sample_size=8, channels=1, num_classes=None)
    with pytest.raises(ValueError, match="to_qq"):
        attach_lora(unet, rank=2, alpha=2, target_modules=["to_qq"])


def test_lora_on_conv_layers_trains_only_adapter_weights():
    b = preset("tiny")
    unet = build_unet(b["kind"], b["unet"], sample_size=8, channels=1, num_classes=None)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    model = prepare_shard_model(
        unet,
        {
            "_target_": "cdm.models.adapters.lora_adapter",
            "kind": "lora",
            "rank": 2,
            "alpha": 2,
            "target_modules": ["conv1", "conv2"],
        },
    )
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all("lora_" in n for n in names) and any("conv1" in n for n in names)
    opt = torch.optim.SGD([p for _, p in trainable_parameters(model)], lr=0.1)
    predict_epsilon(model, torch.randn(2, 1, 8, 8), torch.tensor([5, 6])).pow(2).mean().backward()
    opt.step()
    base = model.get_base_model()
    after = {
        k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k
    }
    assert all(torch.equal(before[k], after[k]) for k in before)
