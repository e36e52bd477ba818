"""Stable Diffusion from a local folder, the way diffusers tests pipelines: a tiny random SD pipeline
saved to a temp dir and loaded back through the same code a real SD 1.x / 2.x folder goes through
(cdm.models.stable_diffusion); LoRA shards on its UNet composed in latent space."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cdm.core.composition import Average
from cdm.core.identity import job_identity
from cdm.jobs.config import config_dir, register_resolvers
from cdm.models.adapters import prepare_shard_model
from cdm.models.backbone import load_pretrained_unet, null_label
from cdm.models.composed import ComposedDenoiser, draw
from cdm.models.multi_adapter import MultiShardUNet
from cdm.models.stable_diffusion import (
    SDTextEncoder,
    VAECodec,
    check_pretrained_pipeline,
    load_sd_components,
)
from cdm.models.text import LatentCodec, TextEncoder, attach_contexts, caption_table
from tests.conftest import run_inprocess

LENGTH = 16  # tokens per caption (SD: 77)
CAPTIONS = ["a red 7", "two blue bags", "a cat"]  # shorter than LENGTH: padding matters
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer that exists offline: the 256 byte symbols (alone and word-final), no
    merges, CLIP's start/end tokens."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=LENGTH)


def tiny_sd_pipeline() -> StableDiffusionPipeline:
    """diffusers' dummy SD components (tests/pipelines/stable_diffusion), seeded, with SD's noise
    schedule: 16x16 RGB images, 4x8x8 latents, a 32-d CLIP text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), max_position_embeddings=LENGTH, layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        **SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> tuple[Path, StableDiffusionPipeline]:
    """(folder, pipeline): the tiny pipeline saved as a user's local SD folder."""
    pipe = tiny_sd_pipeline()
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(path, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load_sd_components(sd_folder[0])


def lora_config() -> dict:
    """The shard job's adapter config for backbone=sd_local (adapter=lora_sd), as composed."""
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", ["stage=shard", "adapter=lora_sd", "backbone=sd_local",
                      "backbone.pretrained_path=/sd"],
        )  # fmt: skip
    return OmegaConf.to_container(cfg.adapter, resolve=True)


@pytest.fixture(scope="module")
def sd_shards(sd, tmp_path_factory) -> list[Path]:
    """Two LoRA shards on the SD UNet (peft folders, as the shard job stores them), with
    seeded non-zero factors (peft starts B at zero)."""
    root = tmp_path_factory.mktemp("sd-shards")
    spec, dirs = lora_config(), []
    for k in range(2):
        model = prepare_shard_model(copy.deepcopy(sd.unet), spec)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(root / f"shard-{k:02d}", safe_serialization=True)
        dirs.append(root / f"shard-{k:02d}")
    return dirs


def test_components_load_from_the_folder(sd_folder, sd):
    path, pipe = sd_folder
    assert isinstance(sd.unet, UNet2DConditionModel)
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(sd.unet.state_dict()[name], tensor), name
    assert isinstance(sd.text_encoder, TextEncoder) and sd.text_encoder.dim == 32
    assert isinstance(sd.codec, LatentCodec)
    assert {k: sd.scheduler_config[k] for k in SD_SCHEDULE} == SD_SCHEDULE
    assert not any(p.requires_grad for p in sd.text_encoder.parameters())
    assert not any(p.requires_grad for p in sd.codec.parameters())


def test_text_encoder_gives_the_pipelines_prompt_embeds(sd_folder, sd):
    _, pipe = sd_folder
    ours = sd.text_encoder.encode(CAPTIONS)
    assert ours.shape == (3, LENGTH, 32)
    theirs, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # a caption's context does not depend on its batch; different captions differ
    torch.testing.assert_close(sd.text_encoder.encode(CAPTIONS[1:2])[0], ours[1], rtol=0, atol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_vae_codec_is_deterministic_and_matches_the_vae(sd_folder, sd):
    _, pipe = sd_folder
    codec = sd.codec
    assert codec.latent_shape(3, 16) == (4, 8, 8)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(z, codec.encode(images))  # the posterior's mean: no sampling
    with torch.no_grad():
        mean = pipe.vae.encode(images).latent_dist.mean
        pixels = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(z, mean * 0.18215)
    decoded = codec.decode(z)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1
    torch.testing.assert_close(decoded, pixels.clamp(-1, 1))
    with pytest.raises(ValueError, match="data.channels=3"):
        codec.latent_shape(1, 16)
    with pytest.raises(ValueError, match="multiple of 2"):
        codec.latent_shape(3, 15)


def broken_copy(path: Path, tmp_path: Path, how: str) -> Path:
    target = tmp_path / "sd"
    shutil.copytree(path, target)
    if how == "bin":
        for f in (target / "unet").glob("*.safetensors"):
            f.rename(f.with_name("diffusion_pytorch_model.bin"))
    elif how == "v_prediction":
        config = target / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": how}))
    elif how == "sdxl":
        index = target / "model_index.json"
        entry = ["transformers", "CLIPTextModelWithProjection"]
        index.write_text(json.dumps({**json.loads(index.read_text()), "text_encoder_2": entry}))
    elif how == "no_vae":
        shutil.rmtree(target / "vae")
    return target


@pytest.mark.parametrize(
    "how, error",
    [
        ("bin", "only PyTorch .bin weights; cdm loads safetensors only: convert"),
        ("v_prediction", "predicts 'v_prediction'.*use an epsilon-prediction pipeline"),
        ("sdxl", "two text encoders"),
        ("no_vae", "has no vae/ component"),
    ],
)
def test_a_folder_that_is_not_a_usable_sd_pipeline_is_refused(sd_folder, tmp_path, how, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        load_sd_components(broken_copy(sd_folder[0], tmp_path, how))


def test_a_model_folder_or_a_missing_path_is_refused(sd_folder, tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no model_index.json.*point at the pipeline folder"
    ):
        load_sd_components(sd_folder[0] / "unet")
    with pytest.raises(FileNotFoundError, match="set backbone.pretrained_path"):
        SDTextEncoder.from_pipeline(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        VAECodec.from_pipeline(tmp_path)


def test_the_job_checks_the_folder_it_imports(sd_folder, tmp_path):
    """What ``cdm-train stage=backbone backbone=sd_local`` checks before importing the UNet: the
    configured noise schedule is the folder's own, weights are safetensors."""
    path, pipe = sd_folder
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", ["backbone=sd_local", f"backbone.pretrained_path={path}"])
    schedule = cfg.backbone.scheduler
    check_pretrained_pipeline(path, schedule)  # sd_local ships SD's schedule
    assert cfg.backbone.text_encoder.path == cfg.backbone.codec.path == str(path)
    with pytest.raises(ValueError, match="beta_schedule: 'linear' != 'scaled_linear'"):
        check_pretrained_pipeline(path, {**schedule, "beta_schedule": "linear"})
    with pytest.raises(FileNotFoundError, match="only PyTorch .bin weights"):
        check_pretrained_pipeline(broken_copy(path, tmp_path, "bin"), schedule)
    check_pretrained_pipeline(path / "unet", {})  # a bare UNet folder: no schedule to check
    unet = load_pretrained_unet(path, "unet2d_condition")  # the pipeline folder gives its unet/
    assert torch.equal(unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_a_moved_sd_folder_is_the_same_job(sd_folder, tmp_path):
    """The SD folder enters a job's identity by content (also through the text encoder's and the
    codec's paths), so a copy elsewhere names the same backbone; other weights do not."""
    path, _ = sd_folder
    moved = tmp_path / "elsewhere" / path.name
    shutil.copytree(path, moved)

    def identity(folder: Path) -> str:
        register_resolvers()
        overrides = ["stage=shard", "backbone=sd_local", f"backbone.pretrained_path={folder}"]
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("train", overrides)
        return job_identity(OmegaConf.to_container(cfg, resolve=True), "shard").hash

    assert identity(moved) == identity(path)
    vae = moved / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-4] + b"\0\0\0\1")
    assert identity(moved) != identity(path)


def composed_sd(sd, dirs, captions):
    """Two LoRA shards of the SD UNet in one batched forward, captions as context rows."""
    model = MultiShardUNet.from_dirs(copy.deepcopy(sd.unet), dirs)
    attach_contexts(model, caption_table(sd.text_encoder, captions))
    return model


def test_one_composed_shard_equals_diffusers_sd_pipeline_with_its_lora(sd_folder, sd, sd_shards):
    """The strongest check: cdm's sampler over one LoRA shard (latent space, SD's scheduler, the
    CLIP contexts, the VAE decode) gives diffusers' own StableDiffusionPipeline image, without
    and with classifier-free guidance (cdm's null caption row = diffusers' empty negative prompt)."""
    _, pipe = sd_folder
    model = composed_sd(sd, sd_shards[:1], CAPTIONS)
    reference = copy.deepcopy(pipe)
    reference.unet.load_lora_adapter(
        str(sd_shards[0]), weight_name="adapter_model.safetensors", prefix="base_model.model"
    )
    x_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for guidance in (1.0, 3.0):
        denoiser = ComposedDenoiser(
            model, Average(), torch.ones(1), guidance_scale=guidance, null_label=len(CAPTIONS)
        )
        latents, _ = draw(
            denoiser, DDIMScheduler.from_config(pipe.scheduler.config), shape=(3, 4, 8, 8),
            steps=3, labels=torch.arange(3), generator=torch.Generator().manual_seed(0),
            clamp=False,
        )  # fmt: skip
        ours = (sd.codec.decode(latents) + 1) / 2
        kwargs = dict(height=16, width=16, num_inference_steps=3, latents=x_T, output_type="pt")
        theirs = reference(CAPTIONS, guidance_scale=guidance, **kwargs).images  # in [0, 1]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        # the adapter matters: the bare pipeline gives another image
        bare = pipe(CAPTIONS, guidance_scale=guidance, **kwargs).images
        assert (ours - bare).abs().max() > 1e-3
    assert null_label(model.unet) == len(CAPTIONS)  # the null caption is the table's last row


def test_composed_shards_batched_equal_a_loop_over_shards(sd, sd_shards):
    """Two SD LoRA shards averaged (Prop. 3.1, w = lambda) in one batched forward per step equal
    the mixture of each shard's own epsilon; decoded through the VAE to images."""
    model = composed_sd(sd, sd_shards, CAPTIONS)
    singles = [composed_sd(sd, [d], CAPTIONS) for d in sd_shards]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 20])
    rows = torch.tensor([2, 0, 1])
    denoiser = ComposedDenoiser(model, Average(), torch.tensor([1.0, 3.0]))
    mixed = denoiser(x, t, rows)
    with torch.no_grad():
        each = [m(x, t, rows, torch.zeros(3, dtype=torch.long)) for m in singles]
    torch.testing.assert_close(mixed, 0.25 * each[0] + 0.75 * each[1], rtol=1e-5, atol=1e-5)
    assert (each[0] - each[1]).abs().max() > 1e-3  # the shards differ
    latents, trace = draw(
        denoiser, DDIMScheduler(**SD_SCHEDULE, clip_sample=False), shape=(3, 4, 8, 8), steps=2,
        labels=rows, generator=torch.Generator().manual_seed(0), clamp=False,
    )  # fmt: skip
    images = sd.codec.decode(latents)
    assert images.shape == (3, 3, 16, 16) and trace.shape == (3, 2, 2)
    torch.testing.assert_close(trace[0, 0], torch.tensor([0.25, 0.75]))


def test_cdm_train_and_sample_with_sd_local_equal_the_diffusers_pipeline(sd_folder, tmp_path):
    """End to end on data=captioned (16x16 RGB -> 4x8x8 latents): import the SD UNet as the
    backbone, train one LoRA shard (adapter=lora_sd) on VAE latents with CLIP captions, sample it
    with cdm-sample; the stored shard loads into diffusers' own pipeline, which draws the same
    images from the same x_T, prompts and scheduler."""
    path, _ = sd_folder
    common = [
        "experiment=captioned_3band", "debug=tiny", "backbone=sd_local",
        f"backbone.pretrained_path={path}", "pretrain.epochs=0", "data.resolution=16",
        "data.kwargs.n_train=60", "data.kwargs.n_test=12",
    ]  # fmt: skip
    run_inprocess(*common, "stage=backbone", artifacts=tmp_path)
    run_inprocess(*common, "stage=shard", "shard.index=0", "adapter=lora_sd", artifacts=tmp_path)
    card = run_inprocess(
        *common, "composition=average", "shards=[0]", "num_samples=3", "steps=2",
        "progress=false", artifacts=tmp_path, config="sample",
    )  # fmt: skip
    samples = Path(card["path"])
    ours = torch.from_numpy(np.load(samples / "samples.npz")["images"]).int()
    assert ours.shape == (3, 3, 16, 16)  # decoded from 4x8x8 latents
    prompts = [p["caption"] for p in json.loads((samples / "prompts.json").read_text())]

    shard = tmp_path / "experiments" / "captioned_3band" / "shards" / "shard-00"
    adapter = json.loads((shard / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    reference = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    reference.unet.load_lora_adapter(
        str(shard), weight_name="adapter_model.safetensors", prefix="base_model.model"
    )
    schedule = card["config"]["backbone"]["scheduler"]
    reference.scheduler = DDIMScheduler(**schedule)  # cdm-sample's sampler=ddim on that schedule
    x_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # seed 0, batch 0
    theirs = reference(
        prompts[:3], height=16, width=16, num_inference_steps=2, guidance_scale=1.0,
        latents=x_T, output_type="pt",
    ).images  # fmt: skip
    assert (ours - (theirs * 255).round().int()).abs().max() <= 1  # uint8 rounding
    bare = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    bare.set_progress_bar_config(disable=True)
    bare.scheduler = DDIMScheduler(**schedule)
    untrained = bare(
        prompts[:3], height=16, width=16, num_inference_steps=2, guidance_scale=1.0,
        latents=x_T, output_type="pt",
    ).images  # fmt: skip
    assert (theirs - untrained).abs().max() > 1e-4  # the trained shard changed the model
