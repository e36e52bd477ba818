"""Deep prompts on a frozen transformer backbone: the CDM paper's class-conditional adapter.

VPT-deep (Jia et al., 2022, "Visual prompt tuning", Sec. 3.2): a shard owns ``prompt_length``
learnable tokens per transformer block, ``P [n_blocks, L, dim]`` (or one set per class,
``[num_classes + 1, n_blocks, L, dim]``, the paper's class-wise prompts; the last row serves the
null label). At the input of block i the tokens ``P_i`` are concatenated to the patch tokens,
``[P_i; h]``, and at its output the first L tokens are dropped, so each block's prompts are new
(not carried over from the block before). The adaLN conditioning (timestep and class) of the
DiT is unchanged, and the backbone's weights are frozen: a shard is ``n_blocks * L * dim``
numbers (``prompts.safetensors``, key ``prompts``).

Because a sample only brings its own tokens, many shards share ONE batched forward
(``MultiShardPrompt``): sample b carries the tokens of its shard (and class), with no grouped
kernels as LoRA needs (``cdm.models.multi_adapter``).

Why not peft's prompt tuning: ``PromptTuningConfig`` / ``PrefixTuningConfig`` /
``PromptEncoder`` are built for causal and seq2seq *language* models. Prompt tuning prepends
virtual tokens through the model's ``inputs_embeds`` and extends an ``attention_mask`` (input
layer only, not VPT-deep); prefix tuning injects per-layer keys and values through
``past_key_values``. A diffusers ``DiTTransformer2DModel`` has neither interface (it embeds
patches itself, its blocks take no past key-values and its output unpatchifies a fixed token
grid), and peft ties these methods to ``PeftModelForCausalLM`` / ``Seq2SeqLM`` task types.
So the tokens are inserted here by a forward pre-hook and dropped by a forward hook on each
``transformer_blocks[i]``, which leaves the backbone's module tree and state dict untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cdm.models.backbone import class_embeds, predict_epsilon
from cdm.models.multi_adapter import check_shard_index

PROMPTS_FILE = "prompts.safetensors"
PROMPTS_KEY = "prompts"


class PromptSlot:
    """The tokens of the current forward, ``[B, n_blocks, L, dim]``, read by every block's hooks
    (None: the backbone runs bare)."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None


def insert_tokens(
    slot: PromptSlot, index: int, module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """Forward pre-hook of block ``index``: ``[P_index; h]`` as the block's hidden states."""
    if slot.tokens is None:
        return None
    hidden = args[0]
    tokens = slot.tokens[:, index].to(hidden.dtype)
    return (torch.cat([tokens, hidden], dim=1), *args[1:]), kwargs


def drop_tokens(
    slot: PromptSlot, module: nn.Module, args: tuple, output: torch.Tensor
) -> torch.Tensor | None:
    """Forward hook: the block's output without the prompt tokens it was given."""
    if slot.tokens is None:
        return None
    return output[:, slot.tokens.shape[2] :]


def transformer_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The blocks that get prompts; a clear error for a backbone without them (a UNet)."""
    blocks = getattr(backbone, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(backbone, "inner_dim"):
        raise ValueError(
            f"deep prompts need a transformer backbone with transformer_blocks, got "
            f"{type(backbone).__name__}: use backbone=dit_tiny|dit_small|dit_base, or adapter=lora for a UNet"
        )
    return blocks


def check_prompts_fit(backbone: nn.Module, prompts: torch.Tensor) -> None:
    """Refuse prompts ``[(C,) n_blocks, L, dim]`` made for another backbone."""
    expected = (len(transformer_blocks(backbone)), int(backbone.inner_dim))
    if prompts.dim() not in (3, 4) or (prompts.shape[-3], prompts.shape[-1]) != expected:
        raise ValueError(
            f"prompts of shape {tuple(prompts.shape)} do not fit this backbone "
            f"({expected[0]} blocks of width {expected[1]}): wrong backbone?"
        )


def install_prompt_hooks(backbone: nn.Module) -> PromptSlot:
    """Hook every transformer block of ``backbone`` to read its prompts from the returned slot."""
    if getattr(backbone, "prompt_slot", None) is not None:
        raise ValueError(
            "this backbone already carries deep-prompt hooks: give each prompted model its own "
            "copy of the backbone (copy.deepcopy)"
        )
    slot = PromptSlot()
    for i, block in enumerate(transformer_blocks(backbone)):
        block.register_forward_pre_hook(functools.partial(insert_tokens, slot, i), with_kwargs=True)
        block.register_forward_hook(functools.partial(drop_tokens, slot))
    backbone.prompt_slot = slot
    return slot


def sample_tokens(
    prompts: torch.Tensor, shard_index: torch.Tensor, labels: torch.Tensor | None, per_class: bool
) -> torch.Tensor:
    """Each sample's tokens ``[B, n_blocks, L, dim]`` from stacked prompts ``[n, (C,) n_blocks,
    L, dim]``: its shard's, and with ``per_class`` its class's row (the null label's included)."""
    shard_index = shard_index.to(prompts.device)
    if not per_class:
        return prompts[shard_index]
    if labels is None:
        raise ValueError(
            "per-class deep prompts need class labels: sample with data.conditional=true"
        )
    return prompts[shard_index, labels.to(prompts.device)]


class PromptedDiT(nn.Module):
    """One shard's deep prompts on a frozen DiT, called like the DiT itself
    (``model(x_t, t, class_labels=y, return_dict=False)``); ``prompts`` is its only parameter."""

    def __init__(self, backbone: nn.Module, prompts: torch.Tensor) -> None:
        super().__init__()
        check_prompts_fit(backbone, prompts)
        self.per_class = prompts.dim() == 4
        self.dit = backbone
        self.prompts = nn.Parameter(prompts)
        self.slot = install_prompt_hooks(backbone)

    @property
    def config(self) -> Any:
        """The backbone's diffusers config (class embeddings, sizes)."""
        return self.dit.config

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        index = torch.zeros(hidden_states.shape[0], dtype=torch.long)
        self.slot.tokens = sample_tokens(self.prompts[None], index, class_labels, self.per_class)
        try:
            return self.dit(
                hidden_states, timestep, class_labels=class_labels, return_dict=return_dict
            )
        finally:
            self.slot.tokens = None

    def save_pretrained(self, directory: str | Path, safe_serialization: bool = True) -> None:
        """Write the prompts alone as ``prompts.safetensors`` (key ``prompts``) into ``directory``."""
        if not safe_serialization:
            raise ValueError("deep prompts are stored as safetensors only")
        tensor = self.prompts.detach().to("cpu").contiguous().clone()
        save_file(
            {PROMPTS_KEY: tensor}, str(Path(directory) / PROMPTS_FILE), metadata={"format": "pt"}
        )


def read_prompts(directory: str | Path) -> torch.Tensor:
    """The prompts of a stored deep-prompt shard (a store-checked ``shards/shard-KK`` folder)."""
    return load_file(str(Path(directory) / PROMPTS_FILE))[PROMPTS_KEY]


def deep_prompt_adapter(
    unet: nn.Module, *, prompt_length: int = 8, per_class: bool = False, init_std: float = 0.02
) -> PromptedDiT:
    """``adapter=deep_prompt``: freeze the DiT and give it learnable tokens per block,
    ``[n_blocks, L, dim]`` (``per_class``: ``[num_classes + 1, n_blocks, L, dim]``), drawn from
    N(0, init_std^2) with the job's seeded global generator (as peft initialises LoRA)."""
    blocks = transformer_blocks(unet)
    unet.requires_grad_(False)
    shape = (len(blocks), int(prompt_length), int(unet.inner_dim))
    if per_class:
        rows = class_embeds(unet)
        if rows is None:
            raise ValueError("per_class deep prompts need a class-conditional backbone")
        shape = (int(rows), *shape)
    return PromptedDiT(unet, torch.randn(shape) * float(init_std))


def merge_prompts(prompts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i P_i (float64 sums): the weight-space merge baseline for deep prompts."""
    if len(prompts) != len(weights) or not prompts:
        raise ValueError(f"{len(prompts)} prompt sets but {len(weights)} merge weights")
    total = sum(float(w) * p.double() for p, w in zip(prompts, weights, strict=True))
    return total.to(prompts[0].dtype)


class MultiShardPrompt(nn.Module):
    """n shards' deep prompts on one frozen DiT: ``forward(x_t, t, labels, shard_index) -> eps``
    in ONE batched forward, each sample carrying its own shard's (and class's) tokens."""

    def __init__(self, backbone: nn.Module, prompts: Sequence[torch.Tensor]) -> None:
        super().__init__()
        if not prompts:
            raise ValueError("MultiShardPrompt needs at least one shard's prompts")
        shapes = sorted({tuple(p.shape) for p in prompts})
        if len(shapes) > 1:
            raise ValueError(
                f"the shards' prompts have different shapes {shapes}: retrain them with one "
                "adapter config (adapter.prompt_length, adapter.per_class)"
            )
        check_prompts_fit(backbone, prompts[0])
        backbone.requires_grad_(False).eval()
        self.dit = backbone
        self.per_class = prompts[0].dim() == 4
        self.register_buffer("prompts", torch.stack([p.detach() for p in prompts]))
        self.n_shards = len(prompts)
        self.slot = install_prompt_hooks(backbone)

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        shard_index: torch.Tensor,
    ) -> torch.Tensor:
        check_shard_index(x_t, shard_index, self.n_shards)
        return self.prompted(x_t, timesteps, labels, shard_index)

    def prompted(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        shard_index: torch.Tensor,
    ) -> torch.Tensor:
        """The batched forward with no check and no host synchronisation (CUDA-graph safe)."""
        self.slot.tokens = sample_tokens(self.prompts, shard_index, labels, self.per_class)
        try:
            return predict_epsilon(self.dit, x_t, timesteps, labels)
        finally:
            self.slot.tokens = None

    def dense(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Every shard's epsilon for every sample, ``[n, B, C, H, W]``, in one forward with no
        host synchronisation (so ``GraphedDense`` can capture it)."""
        n, batch = self.n_shards, x_t.shape[0]
        index = torch.arange(n, device=x_t.device).repeat_interleave(batch)
        x = x_t.repeat(n, *([1] * (x_t.dim() - 1)))
        y = None if labels is None else labels.repeat(n)
        eps = self.prompted(x, timesteps.repeat(n), y, index)
        return eps.view(n, batch, *eps.shape[1:])
