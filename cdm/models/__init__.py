"""Backbones (diffusers UNets) and per-shard parameters (peft LoRA or full fine-tuning)."""
