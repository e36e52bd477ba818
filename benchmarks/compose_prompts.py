"""Cost of one composed denoising step over n deep-prompt shards, relative to one prompted shard.

For n in {1, 2, 4, 8} shards (``--shards``) and B samples per shard, one step's epsilon (uniform
weights: every sample meets every shard, n*B pairs) is computed in the same process by:

- ``one_prompt`` (the baseline): one shard's ``PromptedDiT`` on the B samples;
- ``prompt_loop``: n ``PromptedDiT`` forwards of B samples, mixed;
- ``prompt_composed``: ``ComposedDenoiser(MultiShardPrompt(n), Average())``: n*B pairs in ONE
  forward, each sample carrying its shard's tokens;
- ``one_prompt_nB``: one shard's ``PromptedDiT`` on n*B samples (the same forward as the
  composed step without its gather and mixing: the floor for n*B prompted pairs);
- ``bare_dit_nB``: the bare DiT on n*B samples (no prompt tokens);
- ``one_lora`` (a peft model with one adapter) and ``lora_composed`` (``MultiShardUNet``, n*B
  pairs in one forward): the same on a UNet of similar size with LoRA shards, as
  ``one_adapter`` and ``grouped`` in ``benchmarks/compose_step.py``.

Calls alternate between methods (order rotated); each time is also given as a ratio to
``one_prompt`` of the same round, and the composed steps to each other. Run from the repo root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compose_prompts.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from peft import PeftModel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/compose_prompts.py` from the repo root

from benchmarks.compose_step import machine, save_adapters  # noqa: E402
from benchmarks.presets import backbone_conf  # noqa: E402
from cdm.core import composition as C  # noqa: E402
from cdm.models.backbone import build_unet, predict_epsilon  # noqa: E402
from cdm.models.composed import ComposedDenoiser  # noqa: E402
from cdm.models.multi_adapter import MultiShardUNet  # noqa: E402
from cdm.models.prompts import MultiShardPrompt, PromptedDiT, transformer_blocks  # noqa: E402

SEED, NUM_CLASSES, N_MAX, T_STEP, PROMPT_STD = 0, 10, 8, 500, 0.5
METHODS = ("one_prompt", "prompt_loop", "prompt_composed", "one_prompt_nB", "bare_dit_nB",
           "one_lora", "lora_composed")  # fmt: skip
BASELINE = "one_prompt"


def parse_args() -> argparse.Namespace:
    """Command line (8x8x1 digits-sized inputs by default)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dit", default="dit_small", help="conf/backbone preset of the DiT")
    p.add_argument("--unet", default="small", help="conf/backbone preset of the LoRA UNet")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="B, samples per shard")
    p.add_argument("--per-class", action="store_true", help="class-wise prompts (the paper's)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, method order rotated")
    p.add_argument("--iters", type=int, default=10, help="timed calls per method per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8], choices=range(1, 9))
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/compose_prompts-cpu.json")
    return p.parse_args()


def adapter_conf(name: str) -> dict[str, Any]:
    """conf/adapter/<name>.yaml as a dict."""
    return OmegaConf.to_container(
        OmegaConf.load(ROOT / "cdm" / "conf" / "adapter" / f"{name}.yaml")
    )


def build(preset: str, args: argparse.Namespace) -> torch.nn.Module:
    """A seeded class-conditional backbone from a preset, in eval mode."""
    cfg = backbone_conf(preset)
    torch.manual_seed(SEED)
    return build_unet(
        cfg.kind, OmegaConf.to_container(cfg.unet, resolve=True), sample_size=args.resolution,
        channels=args.channels, num_classes=NUM_CLASSES,
    ).eval()  # fmt: skip


def random_prompts(dit: torch.nn.Module, length: int, per_class: bool) -> list[torch.Tensor]:
    """N_MAX seeded prompt sets ``[(C+1,) n_blocks, L, dim]`` of N(0, PROMPT_STD^2)."""
    shape = (len(transformer_blocks(dit)), length, int(dit.inner_dim))
    shape = (NUM_CLASSES + 1, *shape) if per_class else shape
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randn(shape, generator=gen) * PROMPT_STD for _ in range(N_MAX)]


def median_ratio(times: list[float], over: list[float]) -> float:
    """Median over rounds of ``times / over``, both measured in the same round."""
    return round(statistics.median(p / q for p, q in zip(times, over, strict=True)), 4)


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build every method for every n, check composed == loop, run the rounds; (results, info)."""
    prompt_cfg = adapter_conf("deep_prompt")
    lora_cfg = adapter_conf("lora")
    dit, unet = build(args.dit, args), build(args.unet, args)
    prompts = random_prompts(dit, int(prompt_cfg["prompt_length"]), args.per_class)
    singles = [PromptedDiT(copy.deepcopy(dit), p).eval() for p in prompts]
    composed_prompts = {n: MultiShardPrompt(copy.deepcopy(dit), prompts[:n]) for n in args.shards}
    with tempfile.TemporaryDirectory(prefix="compose_prompts-") as tmp:
        dirs = save_adapters(unet, lora_cfg, Path(tmp))
        one_lora = PeftModel.from_pretrained(copy.deepcopy(unet), dirs[0]).eval()
        loras = {n: MultiShardUNet.from_dirs(copy.deepcopy(unet), dirs[:n]) for n in args.shards}

    gen, b = torch.Generator().manual_seed(SEED), args.batch_size
    x = torch.randn(b, args.channels, args.resolution, args.resolution, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
    t = torch.full((b,), T_STEP)

    def methods(n: int) -> dict[str, Callable[[], torch.Tensor]]:
        """Zero-argument calls returning the composed eps [B, C, H, W] (or the floor's output)."""
        prior = torch.ones(n)
        w = C.average_weights(b, C.normalize_priors(prior).float())
        prompt_avg = ComposedDenoiser(composed_prompts[n], C.Average(), prior)
        lora_avg = ComposedDenoiser(loras[n], C.Average(), prior)

        def loop() -> torch.Tensor:
            eps = torch.stack([predict_epsilon(singles[k], x, t, y) for k in range(n)])
            return C.mix_epsilons(eps, w)

        return {
            "one_prompt": lambda: predict_epsilon(singles[0], x, t, y),
            "prompt_loop": loop,
            "prompt_composed": lambda: prompt_avg(x, t, y),
            "one_prompt_nB": lambda: predict_epsilon(
                singles[0], x.repeat(n, 1, 1, 1), t.repeat(n), y.repeat(n)
            ),
            "bare_dit_nB": lambda: predict_epsilon(
                dit, x.repeat(n, 1, 1, 1), t.repeat(n), y.repeat(n)
            ),  # fmt: skip
            "one_lora": lambda: predict_epsilon(one_lora, x, t, y),
            "lora_composed": lambda: lora_avg(x, t, y),
        }

    def span(fn: Callable[[], Any]) -> tuple[float, float]:
        """(wall ms, process CPU ms) of one call."""
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return 1e3 * (time.perf_counter() - wall), 1e3 * (time.process_time() - cpu)

    def flops(fn: Callable[[], Any]) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    calls = {n: methods(n) for n in args.shards}
    results: dict[str, Any] = {}
    with torch.no_grad():
        for n in args.shards:  # correctness and FLOPs once per n, before timing
            ref = calls[n]["prompt_loop"]()
            results[str(n)] = {
                "max_abs_diff_prompt_composed_vs_loop": (calls[n]["prompt_composed"]() - ref)
                .abs()
                .max()
                .item(),
                "eps_abs_mean": ref.abs().mean().item(),
                "gflops": {m: round(flops(calls[n][m]) / 1e9, 4) for m in METHODS},
            }
        times = {n: {m: [] for m in METHODS} for n in args.shards}  # (wall, CPU) ms per round
        for r in range(args.rounds):
            for n in args.shards:
                spans: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
                for i in range(args.warmup + args.iters):  # call by call, order rotated
                    k = (i + r) % len(METHODS)
                    for m in METHODS[k:] + METHODS[:k]:
                        spans[m].append(span(calls[n][m]))
                for m in METHODS:
                    kept = spans[m][args.warmup :]
                    times[n][m].append(tuple(statistics.median(s[j] for s in kept) for j in (0, 1)))
    for n in args.shards:
        row = results[str(n)]
        for kind, j in (("", 0), ("cpu_", 1)):
            ms = {m: [v[j] for v in times[n][m]] for m in METHODS}

            for m in METHODS:
                row.setdefault(m, {})
                row[m] |= {
                    f"{kind}ms": round(statistics.median(ms[m]), 3),
                    f"{kind}ratio": median_ratio(ms[m], ms[BASELINE]),
                    f"{kind}ms_by_round": [round(v, 3) for v in ms[m]],
                }
            row[f"{kind}lora_composed_over_one_lora"] = median_ratio(
                ms["lora_composed"], ms["one_lora"]
            )
            row[f"{kind}prompt_composed_over_lora_composed"] = median_ratio(
                ms["prompt_composed"], ms["lora_composed"]
            )
    info = {
        "dit_params": dit.num_parameters(),
        "unet_params": unet.num_parameters(),
        "prompt_params_per_shard": prompts[0].numel(),
        "lora_params_per_shard": sum(
            p.numel() for name, p in one_lora.named_parameters() if "lora_" in name
        ),
        "deep_prompt": prompt_cfg,
        "lora": lora_cfg,
    }
    return results, info


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results, info = measure(args)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before]},
        "config": {
            **config,
            **info,
            "t_single_step": T_STEP,
            "prompt_std": PROMPT_STD,
            "baseline": BASELINE,
        },  # fmt: skip
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    head = "".join(f"{m[:15]:>16}" for m in METHODS[1:])
    print(f"ratios to {BASELINE} (wall; median over rounds); last: prompt_composed / lora_composed")
    print(f"{'n':>2}{'one_prompt ms':>15}{head}{'vs lora':>9}{'max diff':>10}")
    for n in args.shards:
        row = results[str(n)]
        ratios = "".join(f"{row[m]['ratio']:>16.2f}" for m in METHODS[1:])
        vs_lora = row["prompt_composed_over_lora_composed"]
        diff = row["max_abs_diff_prompt_composed_vs_loop"]
        print(f"{n:>2}{row[BASELINE]['ms']:>15.2f}{ratios}{vs_lora:>9.2f}{diff:>10.1e}")
    print(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
