"""The grouped multi-shard forward equals each shard's own peft adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from cdm.models.backbone import build_unet, predict_epsilon
from cdm.models.multi_adapter import MultiShardUNet
from tests.conftest import TINY_ATTN_UNET


def peft_eps(base, directory, x, t, y):
    model = PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    with torch.no_grad():
        return predict_epsilon(model, x, t, y)


def test_mixed_batch_equals_each_shards_peft_adapter(lora_shards):
    base, dirs = lora_shards
    multi = MultiShardUNet.from_dirs(copy.deepcopy(base), dirs)
    g = torch.Generator().manual_seed(1)
    x, t, y = (
        torch.randn(9, 1, 8, 8, generator=g),
        torch.randint(0, 1000, (9,), generator=g),
        torch.randint(0, 11, (9,), generator=g),
    )
    shard = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1])
    with torch.no_grad():
        batched = multi(x, t, y, shard)
    for k, d in enumerate(dirs):
        rows = shard == k
        expected = peft_eps(base, d, x[rows], t[rows], y[rows])
        torch.testing.assert_close(batched[rows], expected, rtol=1e-5, atol=1e-5)
    # and the shards really differ from one another and from the backbone
    with torch.no_grad():
        bare = predict_epsilon(base, x, t, y)
        other = multi(x, t, y, (shard + 1) % 3)
    assert (batched - bare).abs().max() > 1e-3 and (batched - other).abs().max() > 1e-3


def test_single_shard_batch_is_bit_identical_to_peft(lora_shards):
    base, dirs = lora_shards
    multi = MultiShardUNet.from_dirs(copy.deepcopy(base), dirs)
    g = torch.Generator().manual_seed(2)
    x, t, y = (
        torch.randn(5, 1, 8, 8, generator=g),
        torch.randint(0, 1000, (5,), generator=g),
        torch.randint(0, 11, (5,), generator=g),
    )
    for k, d in enumerate(dirs):
        with torch.no_grad():
            ours = multi(x, t, y, torch.full((5,), k))
        assert torch.equal(ours, peft_eps(base, d, x, t, y))


def test_adapter_of_another_backbone_is_refused(lora_shards):
    base, dirs = lora_shards
    other = build_unet("unet2d", {**TINY_ATTN_UNET, "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]},
                       sample_size=8, channels=1, num_classes=10)  # fmt: skip
    with pytest.raises(ValueError, match="does not exist in this backbone"):
        MultiShardUNet.from_dirs(other, dirs[:1])


def test_weight_merge_is_the_weighted_sum_of_lora_deltas(lora_shards):
    from cdm.models.multi_adapter import (
        GroupedLoRA,
        ShardSelection,
        merge_adapters,
        read_peft_adapter,
    )

    base, dirs = lora_shards
    adapters = [read_peft_adapter(d) for d in dirs]
    merged, config = merge_adapters(adapters, [0.2, 0.3, 0.5])
    # layer level: exactly base(x) + sum_i w_i s_i B_i A_i x
    layer = "base_model.model.mid_block.attentions.0.to_q"
    linear = torch.nn.Linear(32, 32)
    selection = ShardSelection()
    grouped = GroupedLoRA(
        linear,
        [merged[f"{layer}.lora_A.weight"]],
        [merged[f"{layer}.lora_B.weight"]],
        [1.0],
        selection,
    )
    selection.single = 0
    x = torch.randn(4, 5, 32)
    expected = linear(x)
    for (state, cfg), w in zip(adapters, [0.2, 0.3, 0.5], strict=True):
        if f"{layer}.lora_A.weight" in state:
            a, b = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
            expected = expected + w * (cfg["lora_alpha"] / cfg["r"]) * (x @ a.T @ b.T)
    torch.testing.assert_close(grouped(x), expected, rtol=1e-5, atol=1e-5)
    # network level: merging one adapter with weight 1 is that adapter
    one = MultiShardUNet(copy.deepcopy(base), [merge_adapters(adapters[:1], [1.0])])
    g = torch.Generator().manual_seed(5)
    x, t, y = (
        torch.randn(3, 1, 8, 8, generator=g),
        torch.tensor([5, 500, 900]),
        torch.tensor([1, 2, 10]),
    )
    with torch.no_grad():
        torch.testing.assert_close(
            one(x, t, y, torch.zeros(3, dtype=torch.long)),
            peft_eps(base, dirs[0], x, t, y),
            rtol=1e-5,
            atol=1e-5,
        )


def test_equal_blocks_fast_path_equals_the_general_path(lora_shards):
    base, dirs = lora_shards
    multi = MultiShardUNet.from_dirs(copy.deepcopy(base), dirs)
    g = torch.Generator().manual_seed(7)
    x, t, y = (
        torch.randn(6, 1, 8, 8, generator=g),
        torch.randint(0, 1000, (6,), generator=g),
        torch.randint(0, 11, (6,), generator=g),
    )
    blocks = torch.tensor(
        [0, 0, 1, 1, 2, 2]
    )  # one contiguous block per shard: the grouped-conv / bmm path
    with torch.no_grad():
        fast = multi(x, t, y, blocks)
        perm = torch.tensor([0, 2, 4, 1, 3, 5])  # same pairs, interleaved: the general path
        general = multi(x[perm], t[perm], y[perm], blocks[perm])
    torch.testing.assert_close(fast[perm], general, rtol=1e-5, atol=1e-5)
    for k, d in enumerate(dirs):
        rows = blocks == k
        torch.testing.assert_close(
            fast[rows], peft_eps(base, d, x[rows], t[rows], y[rows]), rtol=1e-5, atol=1e-5
        )
