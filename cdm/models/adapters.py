"""Per-shard parameters on a frozen backbone: LoRA through peft (Hu et al., 2021) or a full copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model

ADAPTER_KINDS = ("lora", "full")


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

    ``target_modules`` may name attention projections (``to_q``, ``to_k``, ...) and conv layers
    (``conv1``, ``conv2``, ``conv_shortcut``); names that match nothing raise a clear error.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()}
    full_names = {name for name, _ in unet.named_modules()}
    missing = [
        t for t in target_modules if t not in names and not any(n.endswith(t) for n in full_names)
    ]
    if missing:
        raise ValueError(
            f"adapter.target_modules {missing} match no layer of this backbone; "
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


def prepare_shard_model(unet: torch.nn.Module, adapter_cfg: dict) -> torch.nn.Module:
    """Freeze the backbone and return the model whose trainable parameters belong to one shard."""
    kind = adapter_cfg["kind"]
    if kind == "lora":
        unet.requires_grad_(False)
        return attach_lora(
            unet,
            rank=int(adapter_cfg["rank"]),
            alpha=float(adapter_cfg["alpha"]),
            target_modules=list(adapter_cfg["target_modules"]),
            dropout=float(adapter_cfg.get("dropout", 0.0)),
        )
    if kind == "full":
        unet.requires_grad_(True)
        return unet
    raise ValueError(f"unknown adapter.kind {kind!r}: choose one of {ADAPTER_KINDS}")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs that receive gradients, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
