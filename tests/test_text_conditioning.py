"""Text conditioning (issue 14, section 1): caption contexts as table rows, CFG with the null
caption, batched LoRA, prompts, and the latent-space codec hook (docs/text.md)."""

from __future__ import annotations

import copy
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cdm.core.composition import Average
from cdm.data.captioned import load_captioned
from cdm.data.datamodule import JobDataset
from cdm.jobs.pipeline import prompt_list
from cdm.models.backbone import backbone_hash, build_unet, null_label, predict_epsilon
from cdm.models.composed import ComposedDenoiser
from cdm.models.multi_adapter import MultiShardUNet
from cdm.models.text import (
    CONTEXT_BUFFER,
    LatentCodec,
    MiniLMTextEncoder,
    TextEncoder,
    attach_contexts,
    caption_table,
    encode_images,
    model_shape,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_text_unet(dim: int = 8, seed: int = 0) -> torch.nn.Module:
    """A UNet2DConditionModel of a few thousand weights on 8x8 one-channel images."""
    torch.manual_seed(seed)
    spec = {
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": dim,
    }
    return build_unet("unet2d_condition", spec, sample_size=8, channels=1, num_classes=None)


class PoolCodec:
    """A fixed trivial codec: 2x average pooling down, nearest upsampling back."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latents, scale_factor=2, mode="nearest")

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int, int]:
        return channels, resolution // 2, resolution // 2


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=16)


def test_minilm_context_is_batch_independent_with_the_null_caption_last(minilm):
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384
    alone = minilm.encode(["a red 7 on the left"])
    batch = minilm.encode(
        ["two blue 3s at the top, a white 9 at the bottom", "a red 7 on the left"]
    )
    assert alone.shape == (1, 16, 384) and batch.shape == (2, 16, 384)
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-5)
    table = caption_table(minilm, ["a red 7 on the left", "a blue 7 on the left"])
    assert table.shape == (3, 16, 384)
    torch.testing.assert_close(table[-1], minilm.encode([""])[0], rtol=0, atol=1e-5)
    assert (table[0] - table[1]).abs().max() > 1e-2  # the colour word changes the context


def test_text_unet_reads_labels_as_caption_rows_and_keeps_its_weights():
    unet = tiny_text_unet().eval()
    before = backbone_hash(unet)
    table = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))
    attach_contexts(unet, table)
    assert null_label(unet) == 3
    assert CONTEXT_BUFFER not in unet.state_dict() and backbone_hash(unet) == before
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        eps = predict_epsilon(unet, x, t, torch.tensor([2, 0]))
        direct = unet(x, t, encoder_hidden_states=table[[2, 0]]).sample
        uncond = predict_epsilon(unet, x, t, None)
        null = predict_epsilon(unet, x, t, torch.tensor([3, 3]))
        other = predict_epsilon(unet, x, t, torch.tensor([1, 1]))
    torch.testing.assert_close(eps, direct)
    torch.testing.assert_close(uncond, null)
    assert (eps - other).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cross_attention_dim"):
        attach_contexts(tiny_text_unet(), torch.zeros(2, 3, 5))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast on a shared machine
    yield
    torch.set_num_threads(threads)


def test_training_on_captions_makes_the_matching_caption_denoise_better(minilm, one_thread):
    """Two images told apart only by their captions (one word): after 100 steps at high noise,
    where x_t says little, each image's epsilon loss is lower under its own caption than under
    the other one (with the context ignored, both would be equal)."""
    captions = ["a white square on the left", "a white square on the right"]
    table = caption_table(minilm, captions)
    unet = tiny_text_unet(dim=384, seed=3)
    attach_contexts(unet, table)
    images = -torch.ones(2, 1, 8, 8)
    images[0, :, 2:6, 0:4] = 1.0
    images[1, :, 2:6, 4:8] = 1.0
    alphas = torch.cos(torch.linspace(0, 1, 1000) * torch.pi / 2).clamp_min(1e-3) ** 2
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1] * 8)
    x0 = images[labels]
    for _ in range(100):
        t = torch.randint(850, 1000, (16,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(
            predict_epsilon(unet, a.sqrt() * x0 + (1 - a).sqrt() * noise, t, labels), noise
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.arange(850, 1000, 5).repeat_interleave(2)
    noise = torch.randn(len(t), 1, 8, 8, generator=g)
    which = torch.tensor([0, 1]).repeat(len(t) // 2)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * images[which] + (1 - a).sqrt() * noise
    with torch.no_grad():
        matched = F.mse_loss(predict_epsilon(unet, x_t, t, which), noise)
        swapped = F.mse_loss(predict_epsilon(unet, x_t, t, 1 - which), noise)
    assert matched < 0.7 * swapped, (matched, swapped)


@pytest.fixture(scope="module")
def text_lora(tmp_path_factory):
    """A tiny text UNet with a 5-row context table and 2 random peft LoRA folders."""
    from peft import LoraConfig, get_peft_model

    base = tiny_text_unet().eval()
    attach_contexts(base, torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(5)))
    dirs = []
    for k in range(2):
        model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "conv1"]),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(k * 1000 + len(name)))
        directory = tmp_path_factory.mktemp(f"text-shard{k}")
        model.save_pretrained(directory)
        dirs.append(directory)
    return base, dirs


def test_batched_text_lora_equals_each_shard_alone(text_lora, one_thread):
    from peft import PeftModel

    base, dirs = text_lora
    multi = MultiShardUNet.from_dirs(copy.deepcopy(base), dirs)
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)
    rows, shard = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 1, 1, 0, 0, 1])
    with torch.no_grad():
        batched = multi(x, t, rows, shard)
        for k, d in enumerate(dirs):
            alone = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
            sel = shard == k
            expected = predict_epsilon(alone, x[sel], t[sel], rows[sel])
            torch.testing.assert_close(batched[sel], expected, rtol=1e-5, atol=1e-5)
        shuffled = multi(x, t, rows.flip(0), shard)
    assert (batched - shuffled).abs().max() > 1e-4  # each sample's own caption row is used


def test_guidance_uses_the_null_caption(text_lora, one_thread):
    base, dirs = text_lora
    multi = MultiShardUNet.from_dirs(copy.deepcopy(base), dirs)
    null = null_label(base)
    assert null == 4

    def denoise(scale: float, labels: torch.Tensor) -> torch.Tensor:
        den = ComposedDenoiser(
            multi, Average(), torch.ones(2), guidance_scale=scale, null_label=null
        )
        return den(x, t, labels)

    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor(400)
    rows = torch.tensor([0, 1, 2])
    plain = denoise(1.0, rows)
    with torch.no_grad():
        mixture = sum(multi(x, t.expand(3), rows, torch.full((3,), k)) for k in range(2)) / 2
    torch.testing.assert_close(plain, mixture, rtol=1e-5, atol=1e-5)  # 1.0 = the unguided path
    torch.testing.assert_close(denoise(0.0, rows), denoise(1.0, torch.full((3,), null)))
    guided = denoise(3.0, rows)
    with torch.no_grad():
        uncond = denoise(1.0, torch.full((3,), null))
    torch.testing.assert_close(guided, uncond + 3.0 * (plain - uncond), rtol=1e-4, atol=1e-4)
    assert (guided - plain).abs().max() > 1e-4


def test_prompts_default_to_the_test_captions_and_name_their_rows(tmp_path):
    data = load_captioned(n_train=3, n_test=4, kinds=["digits"])
    test = [c for c, s in zip(data.captions, data.splits, strict=True) if s == "test"]
    default = prompt_list(OmegaConf.create({"prompts": None}), data)
    assert [p["caption"] for p in default] == test
    assert [p["test_row"] for p in default] == [0, 1, 2, 3]
    assert default[2]["id"] == "captioned/test/000002"
    given = prompt_list(OmegaConf.create({"prompts": [test[3], "a purple unicorn"]}), data)
    assert given == [
        {"caption": test[3], "test_row": 3, "id": "captioned/test/000003"},
        {"caption": "a purple unicorn", "test_row": None, "id": None},
    ]
    path = tmp_path / "prompts.txt"
    path.write_text(f"\n{test[1]}\n\nthree red 1s at the top\n")
    from_file = prompt_list(OmegaConf.create({"prompts": str(path)}), data)
    assert [p["test_row"] for p in from_file] == [1, None]
    with pytest.raises(FileNotFoundError, match="prompts="):
        prompt_list(OmegaConf.create({"prompts": str(tmp_path / "none.txt")}), data)


def test_job_dataset_feeds_caption_rows_and_latents():
    data = load_captioned(n_train=4, n_test=0, kinds=["digits"])
    codec = PoolCodec()
    assert isinstance(codec, LatentCodec) and model_shape(codec, 3, 32) == (3, 16, 16)
    assert model_shape(None, 3, 32) == (3, 32, 32)
    images = torch.stack([data.image(i) for i in range(len(data))])
    fed = JobDataset(data, rows={0: 1, 1: 0, 2: 1, 3: 2}, latents=encode_images(codec, images))
    item = fed[2]
    assert int(item["label"]) == 1 and int(item["index"]) == 2
    torch.testing.assert_close(item["image"], F.avg_pool2d(images[2:3], 2)[0])
    assert fed.ids == data.ids and len(fed) == 4
    again = pickle.loads(pickle.dumps(fed))  # ddp_spawn sends it to its processes
    assert int(again[0]["label"]) == 1 and again.ids == data.ids


# ----------------------------------------------------------------------------- end to end

TINY_TEXT = [
    "experiment=captioned_3band", "debug=tiny", "backbone=text_conditional",
    "data.kwargs.n_train=120", "data.kwargs.n_test=24", "backbone.unet.block_out_channels=[16,32]",
]  # fmt: skip


def run_sample_cli(*args: str, artifacts: Path):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cdm.cli.sample", *args, f"paths.artifacts={artifacts}",
           f"hydra.run.dir={artifacts}/hydra-sample"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_cli_text_backbone_shard_and_sample(cli, train, tmp_path):
    """cdm-train backbone + one shard + cdm-sample on data=captioned: prompts.json names each
    sample's prompt and test row; guidance changes the samples."""
    cli(*TINY_TEXT, "stage=backbone", artifacts=tmp_path)
    cli(*TINY_TEXT, "stage=shard", "shard.index=0", artifacts=tmp_path)
    data = load_captioned(n_train=120, n_test=24, kinds=["digits"])
    first = data.captions[data.splits.index("test")]
    run_sample_cli(
        *TINY_TEXT, "composition=average", "shards=[0]", "num_samples=3", "batch_size=3",
        "steps=4", "guidance_scale=3.0", f"prompts=['{first}','a purple unicorn']", "name=cfg3",
        artifacts=tmp_path,
    )  # fmt: skip
    directory = tmp_path / "experiments" / "captioned_3band" / "samples" / "cfg3"
    prompts = json.loads((directory / "prompts.json").read_text())
    assert [p["caption"] for p in prompts] == [first, "a purple unicorn", first]
    assert [p["test_row"] for p in prompts] == [0, None, 0]
    guided = np.load(directory / "samples.npz")["images"]
    assert guided.shape == (3, 3, 32, 32)
    card = train(
        *TINY_TEXT, "composition=average", "shards=[0]", "num_samples=3", "batch_size=3",
        "steps=4", "guidance_scale=1.0", f"prompts=['{first}','a purple unicorn']", "name=cfg1",
        "progress=false", artifacts=tmp_path, config="sample",
    )  # fmt: skip
    plain = np.load(Path(card["path"]) / "samples.npz")["images"]
    assert np.abs(plain.astype(int) - guided.astype(int)).max() > 0
    from cdm.jobs.pipeline import CDMPipeline

    pipe = CDMPipeline.from_store(
        tmp_path, "captioned_3band", composition="average", shards=[0], overrides=TINY_TEXT[1:]
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.prompts[0]["caption"] == first  # default: the test captions in order

    def draw(**kwargs):
        gen = torch.Generator().manual_seed(0)
        return pipe(batch_size=1, num_inference_steps=3, generator=gen, output_type="pt", **kwargs)

    default = draw().images
    by_prompt = draw(prompt=first).images  # diffusers style: the caption itself
    other = draw(prompt="three white 8s at the top").images
    torch.testing.assert_close(by_prompt, default)
    assert (other - default).abs().max() > 0 and pipe.prompts[0]["test_row"] is None


def test_codec_hook_trains_and_samples_in_latent_space(train, tmp_path):
    """backbone.codec: the backbone denoises 16x16 latents of the 32x32 canvases and the samples
    are decoded back to 32x32."""
    codec = ["backbone.codec={_target_: test_text_conditioning.PoolCodec}"]
    train(*TINY_TEXT, *codec, "stage=backbone", artifacts=tmp_path)
    train(*TINY_TEXT, *codec, "stage=shard", "shard.index=0", artifacts=tmp_path)
    card = train(
        *TINY_TEXT, *codec, "composition=average", "shards=[0]", "num_samples=2", "batch_size=2",
        "steps=3", "progress=false", artifacts=tmp_path, config="sample",
    )  # fmt: skip
    backbone = next((tmp_path / "backbones").iterdir())
    config = json.loads(next(backbone.rglob("config.json")).read_text())
    assert config["sample_size"] == 16
    images = np.load(Path(card["path"]) / "samples.npz")["images"]
    assert images.shape == (2, 3, 32, 32)
    assert (images[:, :, ::2] == images[:, :, 1::2]).all()  # nearest upsampling of the latents


def test_knn_router_on_clip_embeddings_of_x0_hat_with_text(train, tmp_path):
    """Section 4: per-shard centroids of a local (tiny random) CLIP's image embeddings, and the
    k-NN composition routing text-conditioned samples by CLIP embeddings of Tweedie's x0-hat."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    clip = ["knn=clip", f"knn.embedder.path={tmp_path / 'clip'}"]
    train(*TINY_TEXT, "stage=backbone", artifacts=tmp_path)
    for k in (0, 1):
        train(*TINY_TEXT, "stage=shard", f"shard.index={k}", artifacts=tmp_path)
    train(*TINY_TEXT, "stage=knn", *clip, artifacts=tmp_path)
    centroids = list((tmp_path / "experiments" / "captioned_3band").rglob("*clip*"))
    assert centroids, "no CLIP centroids stored"
    card = train(
        *TINY_TEXT, "composition=knn", *clip, "shards=[0,1]", "num_samples=4", "batch_size=4",
        "steps=3", "progress=false", artifacts=tmp_path, config="sample",
    )  # fmt: skip
    weights = np.load(Path(card["path"]) / "trace.npz")["weights"]  # [N, steps, shards]
    assert weights.shape == (4, 3, 2) and np.allclose(weights.sum(-1), 1.0)
    assert np.abs(weights - 0.5).max() > 1e-3  # routed by the centroids, not averaged
    assert "clip" in json.dumps(card["parents"]).lower()  # the centroids are a parent


def test_text_samples_get_no_label_accuracy():
    """A text sample's label is a caption row, not a class: cdm-eval must not score it as one."""
    from cdm.jobs.evaluate import text_samples

    assert text_samples({"config": {"data": {"conditioning": "text"}}})
    assert not text_samples({"config": {"data": {"conditional": True}}})
    assert not text_samples({})
