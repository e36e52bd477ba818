"""Sparsified unlearning (Lin, Lu & Lee, sec. 3; "prune first, then unlearn", Jia et al. 2023).

Step 1 prunes the trained model by weight magnitude; step 2 approximates "retrained on S_i" by
``steps`` of gradient descent on the retained subset with the original training objective, never
changing a pruned weight.

What is implemented, and how it differs from the paper's code. The paper prunes "using
magnitude-based pruning (Han et al., 2015) ... following Fang et al. (2023) with a pruning ratio of
0.3 and threshold of 0.05". In the authors' and Fang et al.'s scripts that is *structural*
pruning (torch-pruning's ``MagnitudePruner``: 30% of the channels of every layer removed by channel
norm, output conv kept), and the threshold 0.05 is Diff-Pruning's cut-off for accumulating Taylor
gradients over timesteps, which the magnitude pruner never reads. Here we implement Han et al.'s
*unstructured* magnitude pruning with the paper's ratio 0.3 through ``torch.nn.utils.prune``
(L1 magnitude, per layer by default like the per-layer channel sparsity of the paper's pruner, or
global), because it keeps masks (so the fine-tuning provably never revives a pruned weight) and it
applies unchanged to a peft LoRA adapter, where channel removal has no meaning. The threshold has
no role in magnitude pruning and is not a parameter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

PAPER_PRUNING_RATIO = 0.3
LossFn = Callable[[nn.Module, object], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def prunable_parameters(model: nn.Module, *, min_dim: int = 2) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, parameter name) of every trainable tensor with ``ndim >= min_dim``.

    Only parameters with ``requires_grad`` count, so a peft model (frozen base) yields its LoRA
    matrices only and a whole model yields every weight matrix / kernel (norm scales and biases
    are 1-D and kept by the default ``min_dim=2``).
    """
    found = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.dim() >= min_dim:
                found.append((f"{module_name}.{name}" if module_name else name, module, name))
    return found


def magnitude_prune(
    model: nn.Module, *, ratio: float = PAPER_PRUNING_RATIO, scope: str = "layer", min_dim: int = 2
) -> list[str]:
    """Zero the ``ratio`` share of smallest-|w| entries of the trainable weights, in place.

    ``scope="layer"``: ``ratio`` of every tensor (``prune.l1_unstructured``); ``"global"``: of all
    of them together (``prune.global_unstructured``). Masks stay attached (``<name>_mask``); the
    kept copy ``<name>_orig`` is zeroed where pruned, so an optimizer's weight decay cannot move
    a pruned entry either. Returns the pruned parameters' names.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"magnitude_prune: ratio must be in [0, 1), got {ratio}")
    if pruned_tensors(model):
        raise ValueError(
            "magnitude_prune: the model is already pruned; prune the trained model once and "
            "copy the pruned model for each subset"
        )
    targets = prunable_parameters(model, min_dim=min_dim)
    if not targets:
        raise ValueError("magnitude_prune: the model has no trainable weight tensors to prune")
    if scope == "layer":
        for _, module, name in targets:
            prune.l1_unstructured(module, name=name, amount=ratio)
    elif scope == "global":
        prune.global_unstructured(
            [(module, name) for _, module, name in targets],
            pruning_method=prune.L1Unstructured,
            amount=ratio,
        )
    else:
        raise ValueError(f"magnitude_prune: scope must be 'layer' or 'global', got {scope!r}")
    with torch.no_grad():
        for _, module, name in targets:
            getattr(module, f"{name}_orig").mul_(getattr(module, f"{name}_mask"))
    detach_pruned_weights(model)
    return [qualified for qualified, _, _ in targets]


def pruned_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, parameter name) of every parameter that carries a pruning mask."""
    found = []
    for module_name, module in model.named_modules():
        for buffer_name, _ in module.named_buffers(recurse=False):
            if buffer_name.endswith("_mask"):
                name = buffer_name[: -len("_mask")]
                found.append((f"{module_name}.{name}" if module_name else name, module, name))
    return found


def detach_pruned_weights(model: nn.Module) -> None:
    """Recompute every masked weight (``orig * mask``) outside autograd. torch's pruning keeps
    the masked weight as a non-leaf tensor, which ``copy.deepcopy`` refuses; after this the
    pruned model deep-copies (one copy per subset S_i). Each forward recomputes it with grad."""
    with torch.no_grad():
        for _, module, name in pruned_tensors(model):
            orig, mask = getattr(module, f"{name}_orig"), getattr(module, f"{name}_mask")
            setattr(module, name, orig * mask)


def pruning_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The pruning mask (1 = kept) of every pruned parameter, by qualified name."""
    return {
        qualified: getattr(module, f"{name}_mask")
        for qualified, module, name in pruned_tensors(model)
    }


def sparsity(model: nn.Module) -> float:
    """Share of pruned entries over all pruned parameters (0 when nothing is pruned)."""
    masks = list(pruning_masks(model).values())
    total = sum(m.numel() for m in masks)
    return float(sum(int((m == 0).sum()) for m in masks) / total) if total else 0.0


def make_pruning_permanent(model: nn.Module) -> None:
    """Fold every mask into its weight (``prune.remove``): plain parameters again, zeros kept, so
    the model or adapter saves in its usual layout."""
    for _, module, name in pruned_tensors(model):
        prune.remove(module, name)


def unlearn_by_finetuning(
    model: nn.Module,
    batches: Iterable,
    loss: LossFn,
    *,
    steps: int,
    optimizer: OptimizerFactory | None = None,
    seed: int = 0,
) -> list[float]:
    """``steps`` of gradient descent on ``loss(model, batch)`` over the retained subset's batches
    (re-iterated when exhausted). Returns the losses.

    Only trainable parameters move; a pruned entry gets zero gradient through its mask and stays
    zero. The torch RNG is forked and seeded with ``seed`` for the run (noise and timesteps drawn
    by ``loss``, a shuffling loader), so a seed gives the same model and the caller's RNG state is
    left as it was. ``optimizer`` builds the optimizer from the parameter list (default: SGD,
    lr 1e-4, plain gradient descent).
    """
    if steps < 0:
        raise ValueError(f"unlearn_by_finetuning: steps must be >= 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("unlearn_by_finetuning: the model has no trainable parameters")
    build = optimizer if optimizer is not None else (lambda ps: torch.optim.SGD(ps, lr=1e-4))
    losses: list[float] = []
    devices = [p.device for p in params if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
        torch.manual_seed(seed)
        opt = build(params)
        model.train()
        for batch in itertools.islice(passes(batches), steps):
            opt.zero_grad(set_to_none=True)
            value = loss(model, batch)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
    detach_pruned_weights(model)
    if len(losses) < steps:
        raise ValueError("unlearn_by_finetuning: the retained subset gave no batches")
    return losses


def passes(batches: Iterable) -> Iterator:
    """The batches of ``batches`` pass after pass (a fresh iteration each time); ends if a pass
    is empty."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


@dataclass
class SparsifiedUnlearning:
    """Prune once, then unlearn per subset (a Hydra ``_target_``: ratio, scope, steps, seed).

    ``prune(model)`` prunes in place; ``unlearn(pruned_copy, batches, loss)`` fine-tunes a copy
    on the retained subset S_i.
    """

    ratio: float = PAPER_PRUNING_RATIO
    scope: str = "layer"
    steps: int = 100
    seed: int = 0
    optimizer: OptimizerFactory | None = None

    def prune(self, model: nn.Module) -> list[str]:
        return magnitude_prune(model, ratio=self.ratio, scope=self.scope)

    def unlearn(self, model: nn.Module, batches: Iterable, loss: LossFn) -> list[float]:
        return unlearn_by_finetuning(model, batches, loss, steps=self.steps,
                                     optimizer=self.optimizer, seed=self.seed)  # fmt: skip
