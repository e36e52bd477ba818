"""Composed sampling: one shard is that adapter bit for bit, masked shards are never touched,
batched and sequential evaluation agree (issue items 6b-6d)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler
from peft import PeftModel

from cdm.core import composition as C
from cdm.core.sampling import sample
from cdm.models.backbone import predict_epsilon
from cdm.models.composed import ComposedDenoiser, draw
from cdm.models.multi_adapter import MultiShardUNet, read_peft_adapter

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def multi(base, dirs, poison: int | None = None) -> MultiShardUNet:
    adapters = [read_peft_adapter(d) for d in dirs]
    if poison is not None:  # a shard whose every LoRA factor is NaN: any use of it shows
        adapters[poison] = (
            {k: torch.full_like(v, float("nan")) for k, v in adapters[poison][0].items()},
            adapters[poison][1],
        )
    return MultiShardUNet(copy.deepcopy(base), adapters)


def test_one_shard_composed_equals_plain_adapter_sampling_bit_for_bit(lora_shards):
    base, dirs = lora_shards
    labels = torch.tensor([1, 4, 7, 9])
    for k in range(len(dirs)):
        composed = ComposedDenoiser(multi(base, [dirs[k]]), C.Average(), torch.ones(1))
        ours, trace = draw(composed, DDIMScheduler(**SCHED), shape=(4, 1, 8, 8), steps=10,
                           labels=labels, generator=torch.Generator().manual_seed(3 * 1_000_003))  # fmt: skip
        peft = PeftModel.from_pretrained(copy.deepcopy(base), dirs[k]).eval()
        generator = torch.Generator().manual_seed(3 * 1_000_003)
        x_T = torch.randn((4, 1, 8, 8), generator=generator)
        with torch.no_grad():
            plain = sample(lambda x, t, m=peft: predict_epsilon(m, x, t.expand(4), labels), DDIMScheduler(**SCHED),
                           x_T, 10, generator=generator).clamp(-1, 1)  # fmt: skip
        assert torch.equal(ours, plain)
        assert torch.equal(trace, torch.ones(4, 10, 1))


METHODS = {"average": C.Average, "random": C.RandomSelection}


@pytest.mark.parametrize("method", ["average", "random", "fixed"])
def test_masked_shard_changes_nothing_and_is_never_evaluated(lora_shards, method):
    base, dirs = lora_shards
    x, t, y = torch.randn(6, 1, 8, 8), torch.full((6,), 500), torch.arange(6)
    allowed = torch.tensor([True, False, True])
    fixed = torch.tensor([0.3, 0.5, 0.2])
    make = (lambda w: C.Fixed(w.tolist())) if method == "fixed" else (lambda w: METHODS[method]())
    masked = ComposedDenoiser(multi(base, dirs, poison=1), make(fixed), torch.tensor([1.0, 2.0, 3.0]), allowed=allowed,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    eps = masked(x, t, y)
    assert torch.isfinite(eps).all(), "the masked shard's (NaN) adapter was evaluated"
    assert (masked.trace[0][:, 1] == 0).all()
    # the same as a model that never had the masked shard
    two = ComposedDenoiser(multi(base, [dirs[0], dirs[2]]), make(C.mask_weights(fixed[None], allowed)[0][[0, 2]]),
                           torch.tensor([1.0, 3.0]), generator=torch.Generator().manual_seed(0))  # fmt: skip
    if method != "random":  # random draws from a different number of shards
        torch.testing.assert_close(eps, two(x, t, y), rtol=1e-5, atol=1e-6)


def test_batched_and_sequential_shard_evaluation_agree(lora_shards):
    base, dirs = lora_shards
    prior = torch.tensor([0.2, 0.3, 0.5])
    model = multi(base, dirs)
    composed = ComposedDenoiser(model, C.Average(), prior)
    x, t, y = (
        torch.randn(5, 1, 8, 8),
        torch.tensor([10, 200, 400, 600, 999]),
        torch.tensor([0, 3, 5, 8, 10]),
    )
    batched = composed(x, t, y)
    sequential = []
    for d in dirs:
        peft = PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
        with torch.no_grad():
            sequential.append(predict_epsilon(peft, x, t, y))
    expected = C.mix_epsilons(torch.stack(sequential), C.average_weights(5, prior))
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    assert composed.evaluated_pairs == 15  # 5 samples x 3 shards, in one forward


def test_classifier_composition_uses_router_posterior_and_topk_skips_shards(lora_shards):
    base, dirs = lora_shards
    logits = torch.tensor([[4.0, 0.0, -4.0], [0.0, 3.0, 2.9], [-2.0, 0.0, 5.0]])
    router = lambda x, t: logits  # noqa: E731
    prior = torch.tensor([1.0, 1.0, 1.0])
    full = ComposedDenoiser(multi(base, dirs), C.RouterPosterior(), prior, router=router)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 300), torch.tensor([1, 2, 3])
    full(x, t, y)
    torch.testing.assert_close(full.trace[0], torch.softmax(logits, dim=1))
    top1 = ComposedDenoiser(multi(base, dirs), C.TopK(k=1), prior, router=router)
    top1(x, t, y)
    assert top1.evaluated_pairs == 3  # one shard per sample: the cost of one model
    assert top1.trace[0].argmax(1).tolist() == [0, 1, 2]


def test_composition_errors_are_clear(lora_shards):
    base, dirs = lora_shards
    with pytest.raises(ValueError, match="stage=router"):
        ComposedDenoiser(multi(base, dirs[:1]), C.RouterPosterior(), torch.ones(1))
    with pytest.raises(ValueError, match="stage=router"):
        ComposedDenoiser(multi(base, dirs[:1]), C.TopK(k=1, router="knn"), torch.ones(1))
    with pytest.raises(ValueError, match="fixed_weights"):
        C.Fixed(None)


def test_classifier_free_guidance_combines_conditional_and_null_label_epsilons(lora_shards):
    base, dirs = lora_shards
    prior = torch.tensor([0.5, 0.5])
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 400), torch.tensor([1, 2, 3, 4])
    guided = ComposedDenoiser(
        multi(base, dirs[:2]), C.Average(), prior, guidance_scale=3.0, null_label=10
    )
    plain = ComposedDenoiser(multi(base, dirs[:2]), C.Average(), prior)
    cond, uncond = plain(x, t, y), plain(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(
        guided(x, t, y), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5
    )
    assert guided.evaluated_pairs == 16  # conditional and unconditional pairs in one forward


@pytest.mark.parametrize("method", ["average", "classifier"])
def test_dense_step_equals_the_selected_pairs_step(lora_shards, method):
    """The dense step (every pair as shard blocks, what GraphedDense captures on a GPU) gives
    the same epsilon as the sparse step; topk keeps skipping shards."""
    base, dirs = lora_shards
    logits = torch.tensor([[4.0, 0.0, -4.0], [0.0, 3.0, 2.9], [-2.0, 0.0, 5.0]])
    router = (lambda x, t: logits) if method == "classifier" else None
    composition = C.RouterPosterior() if method == "classifier" else C.Average()
    prior = torch.tensor([1.0, 2.0, 1.0])
    model = multi(base, dirs)
    sparse = ComposedDenoiser(model, composition, prior, router=router)
    dense = ComposedDenoiser(model, composition, prior, router=router, dense=model.dense)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 300), torch.tensor([1, 2, 3])
    torch.testing.assert_close(dense(x, t, y), sparse(x, t, y), rtol=1e-5, atol=1e-5)
    assert dense.evaluated_pairs == 9 and torch.equal(dense.trace[0], sparse.trace[0])
    eps_all = model.dense(x, t, y)
    for k in range(3):  # block k is shard k alone
        one = model(x, t, y, torch.full((3,), k))
        torch.testing.assert_close(eps_all[k], one, rtol=1e-5, atol=1e-5)
    top1 = ComposedDenoiser(
        model, C.TopK(k=1), prior, router=lambda x, t: logits, dense=model.dense
    )
    top1(x, t, y)
    assert top1.evaluated_pairs == 3


@pytest.mark.parametrize("lora_path", ["grouped", "stacked"])
def test_pairs_forward_gives_each_row_its_own_shard(lora_shards, lora_path):
    """MultiShardUNet.pairs: pair (b, j) is shard[b, j]'s epsilon of sample b, whatever the mix
    of shards in the batch (repeats, one shard only, every shard), on either LoRA path; dense
    block k is shard k alone."""
    base, dirs = lora_shards
    model = MultiShardUNet(copy.deepcopy(base), [read_peft_adapter(d) for d in dirs], lora_path)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([50, 300, 900]), torch.tensor([1, 2, 3])
    for shard in ([[2, 0], [1, 1], [0, 2]], [[1, 1], [1, 1], [1, 1]], [[0, 1], [2, 0], [1, 2]]):
        shard = torch.tensor(shard)
        eps = model.pairs(x, t, y, shard)
        assert eps.shape == (3, 2, 1, 8, 8)
        for j in range(2):
            torch.testing.assert_close(eps[:, j], model(x, t, y, shard[:, j]), rtol=1e-5, atol=1e-5)
    eps_all = model.dense(x, t, y)
    for k in range(3):
        one = model(x, t, y, torch.full((3,), k))
        torch.testing.assert_close(eps_all[k], one, rtol=1e-5, atol=1e-5)
    sel = model.selection
    assert sel.used is None and sel.blocks is None and sel.index is None  # state reset
    with pytest.raises(ValueError, match="lora_path must be one of"):
        MultiShardUNet(copy.deepcopy(base), [read_peft_adapter(dirs[0])], "fused")


@pytest.mark.parametrize(
    "make", [lambda: C.TopK(k=1), lambda: C.TopK(k=2, threshold=0.3), C.RandomSelection]
)
def test_static_capacity_step_equals_the_selected_pairs_step(lora_shards, make):
    """The gated step as a static k pairs per sample (what GraphedPairs captures on a GPU) gives
    the sparse step's epsilon; a disallowed (NaN) shard is never evaluated, padding included."""
    base, dirs = lora_shards
    logits = torch.tensor([[4.0, 0.0, -4.0], [0.0, 3.0, 2.9], [-2.0, 0.0, 5.0], [1.0, 1.1, 0.0]])
    router = lambda x, t: logits  # noqa: E731
    allowed, prior = torch.tensor([True, False, True]), torch.tensor([1.0, 2.0, 1.0])
    model = multi(base, dirs, poison=1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 300), torch.tensor([1, 2, 3, 4])
    kw = dict(router=router, allowed=allowed)
    sparse = ComposedDenoiser(
        model, make(), prior, **kw, generator=torch.Generator().manual_seed(1)
    )
    static = ComposedDenoiser(model, make(), prior, **kw, pairs=model.mixed_pairs,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    for _ in range(2):
        eps = static(x, t, y)
        assert torch.isfinite(eps).all(), "the disallowed shard's (NaN) adapter was evaluated"
        torch.testing.assert_close(eps, sparse(x, t, y), rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.stack(static.trace), torch.stack(sparse.trace))
    capacity = make().capacity
    assert static.evaluated_pairs == 2 * 4 * capacity
    assert sparse.evaluated_pairs <= static.evaluated_pairs


@pytest.mark.parametrize("lora_path", ["grouped", "stacked"])
def test_the_steps_cuda_graph_compiled_compiles_trace_as_one_graph(lora_shards, lora_path):
    """dense and mixed_pairs (what ``cuda_graph=compiled`` hands to torch.compile) trace with no
    graph break (fullgraph=True), so no host round trip sits inside the captured step; dynamo's
    eager backend runs the traced graph: the same epsilons as the plain call."""
    base, dirs = lora_shards
    model = MultiShardUNet(copy.deepcopy(base), [read_peft_adapter(d) for d in dirs], lora_path)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([50, 300, 900]), torch.tensor([1, 2, 3])
    shard, weight = torch.tensor([[2, 0], [1, 1], [0, 2]]), torch.tensor([[0.7, 0.3]] * 3)
    for fn, args in ((model.dense, (x, t, y)), (model.mixed_pairs, (x, t, y, shard, weight))):
        traced = torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)
        torch.testing.assert_close(traced(*args), fn(*args), rtol=0, atol=0)


@pytest.mark.gpu
def test_graphed_dense_step_equals_eager_on_cuda(lora_shards):
    from cdm.models.multi_adapter import GraphedDense

    base, dirs = lora_shards
    model = multi(base, dirs).cuda()
    graphed = GraphedDense(model)
    for seed in range(3):  # new inputs are copied into the captured graph's buffers
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 1, 8, 8, generator=gen).cuda()
        t, y = torch.full((4,), 100 * (seed + 1)).cuda(), torch.tensor([0, 1, 2, 3]).cuda()
        torch.testing.assert_close(
            graphed(x, t, y).clone(), model.dense(x, t, y), rtol=1e-4, atol=1e-4
        )
    assert len(graphed.graphs) == 1


@pytest.mark.gpu
def test_graphed_pairs_step_equals_eager_on_cuda(lora_shards, monkeypatch):
    from cdm.models.multi_adapter import GraphedPairs

    # TF32 (cuDNN's default for convs) rounds to ~1e-3: the kept-pairs path runs other batch
    # shapes, so other conv algorithms, than the static pairs (seen on an H200: 1.5e-3 apart)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    base, dirs = lora_shards
    model = multi(base, dirs).cuda()
    logits = torch.tensor([[4.0, 0.0, -4.0], [0.0, 3.0, 2.9], [-2.0, 0.0, 5.0], [1.0, 1.1, 0.0]])
    router = lambda x, t: logits  # noqa: E731
    prior = torch.ones(3)
    graphed = ComposedDenoiser(model, C.TopK(k=2), prior, router=router, pairs=GraphedPairs(model))
    static = ComposedDenoiser(model, C.TopK(k=2), prior, router=router, pairs=model.mixed_pairs)
    kept = ComposedDenoiser(model, C.TopK(k=2), prior, router=router)
    for seed in range(3):  # new inputs (and new pairs) are copied into the graph's buffers
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 1, 8, 8, generator=gen).cuda()
        t, y = torch.full((4,), 100 * (seed + 1)).cuda(), torch.tensor([0, 1, 2, 3]).cuda()
        replayed = graphed(x, t, y).clone()
        torch.testing.assert_close(replayed, static(x, t, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(replayed, kept(x, t, y), rtol=1e-4, atol=1e-4)
    assert len(graphed.pairs.graphs) == 1
