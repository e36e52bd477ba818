"""Ops, FLOPs and bytes of one shard-training step, and the time floor they set on a GPU.

Runs the step of ``train_step.py`` (forward, epsilon loss, backward, AdamW step) once on fake
tensors (torch's FakeTensorMode: shapes and dtypes, no data, no compute), so any batch size
takes seconds on a CPU. Every aten op is recorded with its FLOPs (torch.utils.flop_counter's
formulas) and the bytes of its tensor inputs and outputs (views excluded): what the op would
move if it ran as its own kernel. Per op the floor is max(FLOPs / peak, bytes / bandwidth);
summed per kernel family (``benchmarks/profiling.py``, the families of the GPU profiles):

- ``unfused``: every op its own kernel at the roofline (eager PyTorch at best);
- ``matmul-only``: only convolutions, matmuls and attention cost anything, every other op is
  fused away for free (a bound no compiler reaches: norms need their own passes);
- ``compute``: all FLOPs at peak.

The step runs under bf16 autocast as on the GPU (``--precision bf16``). CPU autocast keeps
group_norm in bf16 where CUDA autocast runs it in fp32; the census applies CUDA's rule (the norm
reads fp32 and writes fp32), or with ``--norm-dtype bf16`` counts ``train_step.py``'s lever of
the same name. Each run counts the step twice: as ShardTraining runs it, and with peft's input
casts (as it ran before they were switched off under mixed precision). Run from the repo root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_census.py --preset base --batch-size 512
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/train_census.py` from the repo root

from benchmarks.presets import add_size_args, backbone_conf, fill_size_defaults  # noqa: E402
from benchmarks.profiling import kernel_family  # noqa: E402
from benchmarks.train_step import (  # noqa: E402
    LR,
    NORM_DTYPES,
    NUM_CLASSES,
    bare_loss,
    group_norm_in,
    make_unet,
)
from cdm.core.runtime import machine_info  # noqa: E402
from cdm.models.adapters import prepare_shard_model, trainable_parameters  # noqa: E402
from cdm.models.backbone import build_scheduler, null_label  # noqa: E402

MATMUL_FAMILIES = ("conv", "gemm", "attention")
# ops that move no data of their own (metadata, aliasing, scalars)
FREE_OPS = {
    "detach",
    "_local_scalar_dense",
    "lift_fresh",
    "alias",
    "_unsafe_view",
    "_reshape_alias",
}


def sdpa_flops(query: torch.Tensor, key: torch.Tensor, backward: bool) -> int:
    """The FLOPs flop_counter gives SDPA on CUDA (its CPU kernel has no formula): forward two
    matmuls of (B, H, L, D) x (B, H, D, S), backward 2.5x that (the scores recomputed)."""
    b, h, q, d = query.shape
    return 4 * b * h * q * key.shape[-2] * d * (5 if backward else 2) // 2


class OpCensus(TorchDispatchMode):
    """Count, FLOPs and bytes (tensor inputs + outputs) per aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # count, flops, bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE_OPS or func.namespace == "prim":
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        packet = func.overloadpacket
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        elif name.startswith("_scaled_dot_product") and "attention" in name:
            backward = name.endswith("backward")  # its args: grad_out, query, key, ...
            flops = sdpa_flops(*args[1:3] if backward else args[:2], backward=backward)
        else:
            flops = 0
        row = self.ops[f"aten::{name}"]
        row[0], row[1], row[2] = row[0] + 1, row[1] + int(flops), row[2] + moved
        return out


def census(args: argparse.Namespace, peft_casts: bool) -> dict[str, list[int]]:
    """The ops of one training step at ``args``' size, on fake tensors."""
    torch.manual_seed(0)
    bcfg = backbone_conf(args.preset)
    adapter = dict(OmegaConf.load(ROOT / "cdm" / "conf" / "adapter" / "lora.yaml"))
    if args.targets:
        adapter["target_modules"] = args.targets.split(",")
    model = prepare_shard_model(make_unet(bcfg, args), adapter).train()
    alphas = build_scheduler(bcfg.scheduler).alphas_cumprod.float()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    params = [p for _, p in trainable_parameters(model)]
    counter = OpCensus()
    # CPU autocast leaves group_norm in bf16; CUDA's runs it in fp32: apply the GPU's rule
    norms = group_norm_in(NORM_DTYPES[args.norm_dtype] or torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True), norms:
        shape = (args.batch_size, args.channels, args.resolution, args.resolution)
        batch = {"image": torch.rand(shape), "label": torch.randint(0, NUM_CLASSES, shape[:1])}
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)
        with counter:
            loss = bare_loss(model, batch, alphas, 0, null_label(model), amp, peft_casts)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return dict(counter.ops)


def floors(ops: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Per family and in total: ops, GFLOP, GB and the floor in ms at the peak and bandwidth."""
    peak, bandwidth = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12
    fam: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])
    for name, (count, flops, moved) in ops.items():
        row = fam[kernel_family(name)]
        row[0] += count
        row[1] += flops
        row[2] += moved / 1e9
        row[3] += 1e3 * max(flops / peak, moved / bandwidth)  # per-op averages: one kind each
    flops = sum(f for _, f, _ in ops.values())
    unfused = sum(r[3] for r in fam.values())
    matmul = sum(r[3] for f, r in fam.items() if f in MATMUL_FAMILIES)
    compute = 1e3 * flops / peak
    per_image = flops / args.batch_size

    def at(ms: float) -> dict[str, float]:
        return {"ms": round(ms, 3), "images_per_s": round(1e3 * args.batch_size / ms, 1)}

    return {
        "flop_per_step": int(flops),
        "gflop_per_image": round(per_image / 1e9, 4),
        "families": {
            f: {
                "ops": int(r[0]),
                "flop": int(r[1]),
                "gflop": round(r[1] / 1e9, 2),
                "gb": round(r[2], 3),
                "floor_ms": round(r[3], 3),
            }  # fmt: skip
            for f, r in sorted(fam.items(), key=lambda kv: -kv[1][3])
        },
        "floor": {"unfused": at(unfused), "matmul_only": at(matmul), "compute": at(compute)},
        "images_per_s_at_mfu_30pct": round(0.3 * peak / per_image, 1),
        "top_ops": [
            [name, count, round(flops / 1e9, 2), round(moved / 1e9, 3)]
            for name, (count, flops, moved) in sorted(ops.items(), key=lambda kv: -kv[1][2])[:15]
        ],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p, preset="base", batch_size=512)
    p.add_argument("--precision", choices=["32", "bf16"], default="bf16")
    p.add_argument(
        "--norm-dtype",
        choices=list(NORM_DTYPES),
        default="autocast",
        help="group_norm under autocast: fp32 as CUDA autocast runs it, or bf16 (train_step.py's lever)",
    )
    p.add_argument(
        "--targets", help="LoRA target modules, comma-separated (default: conf/adapter/lora.yaml's)"
    )
    p.add_argument("--peak-tflops", type=float, default=790.0, help="issue 16's H200 bf16 peak")
    p.add_argument("--bandwidth-tbs", type=float, default=4.8, help="H200 HBM3e, TB/s")
    p.add_argument(
        "--out", type=Path, help="default docs/benchmarks/train_census-<preset>-b<B>.json"
    )
    args = p.parse_args(argv)
    fill_size_defaults(args)
    norms = "" if args.norm_dtype == "autocast" else f"-{args.norm_dtype}-norms"
    targets = "" if not args.targets else "-lora-" + args.targets.replace(",", "-")
    name = f"train_census-{args.preset}-b{args.batch_size}{norms}{targets}.json"
    args.out = args.out or ROOT / "docs" / "benchmarks" / name
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = {
        "step": floors(census(args, peft_casts=False), args),
        "step_with_peft_casts": floors(census(args, peft_casts=True), args),
    }
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "config": config,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    step, before = results["step"], results["step_with_peft_casts"]
    print(f"{step['gflop_per_image']:.2f} GFLOP per image; B = {args.batch_size}, "
          f"{args.peak_tflops:g} TFLOP/s, {args.bandwidth_tbs:g} TB/s")  # fmt: skip
    print(f"{'family':<16}{'ops':>6}{'GFLOP':>11}{'GB':>9}{'floor ms':>10}")
    for f, r in step["families"].items():
        print(f"{f:<16}{r['ops']:>6}{r['gflop']:>11.1f}{r['gb']:>9.2f}{r['floor_ms']:>10.2f}")
    for kind in ("unfused", "matmul_only", "compute"):
        a, b = step["floor"][kind], before["floor"][kind]
        print(f"floor {kind:<12} {a['ms']:8.2f} ms {a['images_per_s']:>10,.0f} images/s "
              f"(with peft's casts: {b['ms']:.2f} ms)")  # fmt: skip
    print(f"30% MFU is {step['images_per_s_at_mfu_30pct']:,.0f} images/s; wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
