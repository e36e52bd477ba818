"""Per-shard parameters on a frozen backbone: LoRA through peft (Hu et al., 2021) or a full copy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from cdm.models.targets import stored_target


def attach_lora(
    unet: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap the backbone in a PeftModel whose only trainable weights are the LoRA factors.

    ``target_modules`` may name attention projections (``to_q``, ``to_k``, ...), conv layers
    (``conv1``, ``conv2``, ``conv_shortcut``) and a DiT's feed-forward linears (``ff.net.0.proj``,
    ``ff.net.2``: ``adapter=lora_dit``); names that match nothing raise a clear error.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()}
    full_names = {name for name, _ in unet.named_modules()}
    missing = [
        t for t in target_modules if t not in names and not any(n.endswith(t) for n in full_names)
    ]
    if missing:
        fix = "adapter=lora_dit" if hasattr(unet, "transformer_blocks") else "adapter=lora"
        raise ValueError(
            f"adapter.target_modules {missing} match no layer of this backbone; use {fix} or "
            f"choose among e.g. {sorted(n for n in names if n.startswith(('to_', 'conv')))}"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        init_lora_weights=True,
    )
    return get_peft_model(unet, config, adapter_name=adapter_name)


def lora_adapter(
    unet: torch.nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
) -> PeftModel:
    """``adapter=lora``: freeze the backbone and attach LoRA factors, the shard's only weights."""
    unet.requires_grad_(False)
    return attach_lora(
        unet,
        rank=int(rank),
        alpha=float(alpha),
        target_modules=list(target_modules),
        dropout=float(dropout),
    )


def full_adapter(unet: torch.nn.Module) -> torch.nn.Module:
    """``adapter=full``: the shard owns (and trains) a whole copy of the backbone."""
    unet.requires_grad_(True)
    return unet


def prepare_shard_model(unet: torch.nn.Module, adapter_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The model whose trainable parameters belong to one shard: ``adapter_cfg["_target_"]``
    (``lora_adapter`` | ``full_adapter`` | ``cdm.models.prompts.deep_prompt_adapter``) called
    with the backbone and the other keys but ``kind`` (the stored layout). Shard cards store this config, so only cdm functions are accepted."""
    kwargs = {k: v for k, v in adapter_cfg.items() if k not in ("_target_", "kind")}
    attach = stored_target(adapter_cfg.get("_target_"), "the adapter config")
    return attach(unet, **kwargs)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs that receive gradients, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
