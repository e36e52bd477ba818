"""The transformer family, part 2: LoRA on the DiT (``adapter=lora_dit``: isolation, grouped
batched forward == a loop over peft adapters) and the Fig. 2 sweep with deep prompts (slow).

(k-NN composition and cdm-attribute with deep prompts reuse the trained store of
``tests/test_prompts_downstream.py``.)"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest
import torch
from peft import PeftModel

from cdm.models.adapters import lora_adapter, prepare_shard_model
from cdm.models.backbone import build_scheduler, build_unet, predict_epsilon
from cdm.models.multi_adapter import MultiShardUNet, read_peft_adapter

TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "patch_size": 2}
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
# every Linear of a DiT block that adapter=lora_dit adapts (the adaLN modulation stays frozen)
LORA_LAYERS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
               "ff.net.2"]  # fmt: skip


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    dit = build_unet("dit", TINY_DIT, sample_size=8, channels=1, num_classes=10).eval()
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: make them matter
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


def inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, torch.randint(0, 11, (batch,), generator=g)  # 10 = the null label


def lora_dit_config() -> dict:
    """``adapter=lora_dit`` as the shard job sees it (composed from the shipped configs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    overrides = ["experiment=digits_4split", "debug=tiny", "backbone=dit_tiny", "stage=shard",
                 "adapter=lora_dit"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.adapter, resolve=True)


# ---- LoRA on the DiT ----------------------------------------------------------------------------


def test_lora_dit_adapts_every_blocks_attention_and_feed_forward_linears():
    adapter = lora_dit_config()
    assert adapter["kind"] == "lora" and adapter["rank"] == 8  # adapter=lora's layout and rank
    model = prepare_shard_model(tiny_dit(), adapter)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = [f"base_model.model.transformer_blocks.{i}.{layer}.lora_{ab}.default.weight"
                for i in range(2) for layer in LORA_LAYERS for ab in "AB"]  # fmt: skip
    assert sorted(trainable) == sorted(expected)
    # rank 8 on (32 -> 32) x 4 attention and (32 -> 128, 128 -> 32) feed-forward, per block
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 8 * (
        4 * 64 + 2 * 160
    )


def test_the_unets_lora_targets_on_a_dit_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"\['conv1', 'conv2'\].*use adapter=lora_dit"):
        lora_adapter(tiny_dit(), rank=4, alpha=4, target_modules=["to_q", "conv1", "conv2"])


def test_a_lora_training_step_on_a_dit_changes_only_the_shards_lora_factors():
    from cdm.training.jobs import ShardTraining

    dit = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    module = ShardTraining(
        dit, build_scheduler(SCHEDULE).alphas_cumprod, lora_dit_config(), dataset_size=16,
        lr=0.01, cond_drop_prob=0.5,
    )  # fmt: skip
    lora = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer = module.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in lora.values()
    }
    x, _, y = inputs(16)
    module.denoising_loss({"image": x, "label": y % 10}, step=0).backward()
    optimizer.step()
    after = {k.replace(".base_layer", ""): v
             for k, v in module.model.get_base_model().state_dict().items() if "lora_" not in k}  # fmt: skip
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the DiT is bit-identical
    changed = [n for n, p in lora.items() if not torch.equal(p.detach(), lora_before[n])]
    assert changed and all(".lora_B." in n or ".lora_A." in n for n in changed)


@pytest.fixture(scope="module")
def dit_lora_shards(tmp_path_factory):
    """A tiny DiT and 3 peft LoRA folders of adapter=lora_dit (ranks 4, 2, 8; random factors)."""
    base = tiny_dit()
    dirs = []
    for k, rank in enumerate([4, 2, 8]):
        torch.manual_seed(k)
        model = lora_adapter(copy.deepcopy(base), rank=rank, alpha=2 * rank,
                             target_modules=LORA_LAYERS[: 6 - k])  # fmt: skip
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    seed = zlib.crc32(f"{k}{name}".encode())
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
        d = tmp_path_factory.mktemp(f"dit-lora{k}")
        model.save_pretrained(d)
        dirs.append(d)
    return base, dirs


def test_grouped_lora_on_a_dit_batched_equals_a_loop_over_shards(dit_lora_shards):
    base, dirs = dit_lora_shards
    state, _ = read_peft_adapter(dirs[0])
    assert any(".ff.net.2.lora_A." in k for k in state)  # the DiT's Linear layers, grouped
    multi = MultiShardUNet.from_dirs(copy.deepcopy(base), dirs)
    x, t, y = inputs(9)
    index = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1])
    with torch.no_grad():
        batched = multi(x, t, y, index)  # the general path (interleaved shards)
        blocks = multi(x, t, y, torch.arange(3).repeat_interleave(3))  # contiguous blocks
        dense = multi.dense(x, t, y)
        single = [multi(x, t, y, torch.full((9,), k)) for k in range(3)]
        bare = predict_epsilon(base, x, t, y)
    for k, d in enumerate(dirs):  # each shard's own peft adapter on the DiT, alone
        peft = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        with torch.no_grad():
            alone = predict_epsilon(peft, x, t, y)
        rows, block = index == k, slice(3 * k, 3 * k + 3)
        torch.testing.assert_close(batched[rows], alone[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(blocks[block], alone[block], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense[k], alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(single[k], alone)  # a batch of one shard is exactly peft's forward
    assert (batched - bare).abs().max() > 1e-3  # the adapters act
    assert (dense[0] - dense[1]).abs().max() > 1e-3  # and differ from one another


# ---- Fig. 2 with deep prompts -------------------------------------------------------------------


@pytest.mark.slow  # about 50 s: a backbone, two shards, a router and a feature net, then 3 draws
def test_fig2_sweep_on_a_dit_with_deep_prompts(tmp_path):
    """cdm-fig2 trains and composes prompted shards: the table is its evaluation cards' FD."""
    from cdm.store import ArtifactStore, read_card
    from tests.test_fig2 import fig2

    card = fig2(tmp_path, "fig2.experiment=digits_2split", "fig2.n_jobs=1", "backbone=dit_tiny",
                "adapter=deep_prompt")  # fmt: skip
    store = ArtifactStore(tmp_path)
    for k in (0, 1):
        shard = read_card(store.adapter_dir("digits_2split", f"shard-0{k}"))
        assert shard["adapter_kind"] == "deep_prompt"
    assert ["dit_tiny" in p.name for p in (tmp_path / "backbones").iterdir()] == [True]
    fd = {}
    for p in card["points"]:
        samples = read_card(store.samples_dir("digits_2split", p["samples"]))
        assert {q["name"] for q in samples["parents"] if q["kind"] == "adapter"} == {
            f"shard-0{k}" for k in range(p["k"])
        }
        fd[(p["k"], p["method"])] = read_card(store.evals_dir("digits_2split", p["samples"]))[
            "metrics"
        ]["FD_digits"]
        assert p["value"] == fd[(p["k"], p["method"])] and np.isfinite(p["value"])
    assert sorted(fd) == [(1, "average"), (1, "classifier"), (2, "average"), (2, "classifier")]
    assert fd[(1, "classifier")] == fd[(1, "average")]  # k = 1: one prompted shard alone
