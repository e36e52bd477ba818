"""Cost of one composed denoising step over n LoRA shards, relative to one adapter.

For n in {1, 2, 4, 8} shards (``--shards``) and B samples, one step's epsilon is computed in
several ways in the same process: one peft adapter (the baseline), a Python loop over peft
adapters, peft's mixed-adapter batch, our grouped ``ComposedDenoiser(MultiShardUNet)``, top-k
gating (one step and over a DDIM trajectory), and the bare backbone on n*B samples (the floor).
Calls alternate between methods (order rotated); every time is also given as a ratio to the
baseline of the same round. Times are wall and process CPU. Run from the repo root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compose_step.py --preset small --batch-size 16
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
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diffusers
import peft
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf
from peft import PeftModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/compose_step.py` from the repo root

from benchmarks.presets import add_size_args, backbone_conf, fill_size_defaults  # noqa: E402
from benchmarks.profiling import profile_calls  # noqa: E402
from cdm.core import composition as C  # noqa: E402
from cdm.core.runtime import machine_info  # noqa: E402
from cdm.core.sampling import sample as run_sampler  # noqa: E402
from cdm.models.adapters import prepare_shard_model  # noqa: E402
from cdm.models.backbone import build_unet, predict_epsilon  # noqa: E402
from cdm.models.composed import ComposedDenoiser  # noqa: E402
from cdm.models.multi_adapter import GraphedDense, GraphedPairs, MultiShardUNet  # noqa: E402

SEED, NUM_CLASSES, N_MAX, T_STEP = 0, 10, 8, 500
FACTOR_STD = 0.05  # random LoRA factors: non-zero, small enough to keep eps sane
TOPK, THRESHOLD, SHARP_MIN, SHARP_MAX = 2, 0.1, 0.5, 100.0  # the trajectory router (see Router)
PROFILED_CALLS = (
    3  # calls per profiled method (the profiler's own bookkeeping is slow on eager steps)
)
METHODS = (
    "one_adapter",
    "loop",
    "peft_mixed",
    "grouped",
    "topk1",
    "topk",
    "topk_static",
    "bare_nB",
)
# CUDA only. The composed step as one CUDA graph replay: every pair (average; classifier), the
# same compiled by inductor, the same on MultiShardUNet's stacked LoRA path (dense A over all
# shards); then topk's static k pairs per sample as one replay (over a trajectory), and the bare
# backbone on n*B samples compiled (the floor of issue 16).
GRAPHED_STEPS = ("graphed", "graphed_classifier", "graphed_compiled", "graphed_stacked")
GRAPHED = (*GRAPHED_STEPS, "topk_graphed", "topk_graphed_compiled", "bare_nB_compiled")
# timed per step over a DDIM trajectory
TRAJECTORIES = ("topk", "topk_static", "topk_graphed", "topk_graphed_compiled")


def method_names(device: str) -> tuple[str, ...]:
    """The methods timed on ``device``."""
    return METHODS + GRAPHED if device == "cuda" else METHODS


def save_adapters(base: torch.nn.Module, adapter: dict, directory: Path) -> list[Path]:
    """N_MAX peft LoRA folders (conf/adapter/lora.yaml) with seeded random non-zero factors."""
    dirs = []
    for k in range(N_MAX):
        model = prepare_shard_model(copy.deepcopy(base), adapter)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    gen = torch.Generator().manual_seed(zlib.crc32(f"{k}{name}".encode()))
                    p.copy_(torch.randn(p.shape, generator=gen) * FACTOR_STD)
        model.save_pretrained(directory / f"shard-{k}")
        dirs.append(directory / f"shard-{k}")
    return dirs


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops that are not views."""

    count = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        rets = func._schema.returns
        self.count += not any(r.alias_info and not r.alias_info.is_write for r in rets)
        return func(*args, **(kwargs or {}))


class Router:
    """Fixed logits that sharpen as t decreases: ``s(t) * z_b`` with z_b ~ N(0, I_n) per sample.

    s(t) = SHARP_MIN * (SHARP_MAX / SHARP_MIN) ** (1 - t / T), geometric: spread weights at high t
    (top-2 both above THRESHOLD: 2 shards kept), one dominant shard near t = 0 (1 kept).
    """

    def __init__(self, batch: int, n: int, num_train_timesteps: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(SEED + n)
        self.z, self.T = torch.randn(batch, n, generator=gen).to(device), num_train_timesteps

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = SHARP_MIN * (SHARP_MAX / SHARP_MIN) ** (1 - t.float() / self.T)
        return s.to(self.z)[:, None] * self.z


def machine() -> dict[str, Any]:
    """Where the numbers were measured (load average: this CPU may be shared)."""
    return machine_info(diffusers=diffusers.__version__, peft=peft.__version__)


def parse_args() -> argparse.Namespace:
    """Command line; resolution/channels default to 8/1 (tiny, small) or 32/3 (base)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p, preset="small", batch_size=16, batch_help="B, samples per shard")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--rounds", type=int, default=3, help="rounds, method order rotated")
    p.add_argument("--iters", type=int, default=10, help="timed calls per method per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per method per round")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the topk trajectory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8], choices=range(1, 9))
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile a few calls of the main methods at the largest n: kernel time "
        "per call against wall time (launch- vs compute-bound) and the top kernels",
    )
    p.add_argument("--out", type=Path, help="default docs/benchmarks/compose_step-<device>.json")
    args = p.parse_args()
    fill_size_defaults(args)
    args.out = args.out or ROOT / "docs" / "benchmarks" / f"compose_step-{args.device}.json"
    return args


def measure(
    args: argparse.Namespace, save: Callable[[dict[str, Any], dict[str, Any]], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build every method for every n, check grouped == loop, run the rounds; (results, info).

    ``save(results, info)`` is called once the timings are in and again after each profile, so a
    run killed while profiling (a GPU lease running out) keeps what it measured."""
    shards: list[int] = args.shards
    device, sync = torch.device(args.device), args.device == "cuda"
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    bcfg = backbone_conf(args.preset)
    adapter = OmegaConf.to_container(
        OmegaConf.load(ROOT / "cdm" / "conf" / "adapter" / "lora.yaml")
    )
    kw = OmegaConf.to_container(bcfg.unet, resolve=True)
    torch.manual_seed(SEED)
    base = build_unet(bcfg.kind, kw, sample_size=args.resolution, channels=args.channels,
                      num_classes=NUM_CLASSES).eval()  # fmt: skip
    sched_kw = OmegaConf.to_container(bcfg.scheduler, resolve=True)
    T = int(sched_kw["num_train_timesteps"])
    tmp = tempfile.TemporaryDirectory(prefix="compose_step-")
    dirs = save_adapters(base, adapter, Path(tmp.name))
    one, multi = (PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], "s0") for _ in "12")
    for k in range(1, N_MAX):
        multi.load_adapter(dirs[k], adapter_name=f"s{k}")
    one, multi, bare = (m.to(device).eval() for m in (one, multi, copy.deepcopy(base)))
    # the floor of issue 16 goal 1: the bare backbone compiled (inductor), same process and inputs
    bare_compiled = torch.compile(copy.deepcopy(bare), dynamic=False) if sync else None
    grouped = {n: MultiShardUNet.from_dirs(copy.deepcopy(base), dirs[:n]) for n in shards}
    grouped = {n: g.to(device) for n, g in grouped.items()}
    graphed_pairs = {n: GraphedPairs(g) for n, g in grouped.items()} if sync else {}
    # cdm-sample cuda_graph=compiled: the inductor-compiled static-pairs step, graphed
    graphed_pairs_compiled = {n: GraphedPairs(g, True) for n, g in grouped.items()} if sync else {}
    stacked = {  # the other LoRA path, for the graphed dense step (CUDA only)
        n: MultiShardUNet.from_dirs(copy.deepcopy(base), dirs[:n], "stacked").to(device)
        for n in (shards if sync else ())
    }
    tmp.cleanup()

    gen, b = torch.Generator().manual_seed(SEED), args.batch_size
    x = torch.randn(b, args.channels, args.resolution, args.resolution, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device)
    t = torch.full((b,), T_STEP, device=device)

    def now() -> float:
        if sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def methods(n: int) -> dict[str, Callable[[], torch.Tensor]]:
        """Zero-argument calls returning the composed eps [B, C, H, W] (or the floor's output)."""
        prior, names = torch.ones(n, device=device), [f"s{k}" for k in range(n)]
        w = C.average_weights(b, C.normalize_priors(prior).float()).to(device)
        per_sample = [name for name in names for _ in range(b)]
        avg = ComposedDenoiser(grouped[n], C.Average(), prior)
        top1 = ComposedDenoiser(grouped[n], C.TopK(k=1), prior, router=Router(b, n, T, device))

        def loop() -> torch.Tensor:
            eps = []
            for name in names:
                multi.set_adapter(name, inference_mode=True)
                eps.append(predict_epsilon(multi, x, t, y))
            return C.mix_epsilons(torch.stack(eps), w)

        def mixed() -> torch.Tensor:
            xs, ts, ys = x.repeat(n, 1, 1, 1), t.repeat(n), y.repeat(n)
            out = multi(xs, ts, class_labels=ys, return_dict=False, adapter_names=per_sample)[0]
            return C.mix_epsilons(out.view(n, *x.shape), w)

        graphed: dict[str, Callable[[], torch.Tensor]] = {}
        if sync:
            dense = GraphedDense(grouped[n])
            g_avg = ComposedDenoiser(grouped[n], C.Average(), prior, dense=dense)
            compiled = GraphedDense(grouped[n], compile_step=True)  # cuda_graph=compiled
            g_comp = ComposedDenoiser(grouped[n], C.Average(), prior, dense=compiled)
            g_stack = ComposedDenoiser(
                stacked[n], C.Average(), prior, dense=GraphedDense(stacked[n])
            )
            g_cls = ComposedDenoiser(grouped[n], C.RouterPosterior(), prior, router=Router(b, n, T, device),
                                     dense=dense)  # fmt: skip
            graphed = {
                "graphed": lambda: g_avg(x, t, y),
                "graphed_classifier": lambda: g_cls(x, t, y),
                "graphed_compiled": lambda: g_comp(x, t, y),
                "graphed_stacked": lambda: g_stack(x, t, y),
                "bare_nB_compiled": lambda: predict_epsilon(
                    bare_compiled, x.repeat(n, 1, 1, 1), t.repeat(n), y.repeat(n)
                ),
            }
        return graphed | {
            "one_adapter": lambda: predict_epsilon(one, x, t, y),
            "loop": loop,
            "peft_mixed": mixed,
            "grouped": lambda: avg(x, t, y),
            "topk1": lambda: top1(x, t, y),
            "bare_nB": lambda: predict_epsilon(
                bare, x.repeat(n, 1, 1, 1), t.repeat(n), y.repeat(n)
            ),
        }

    def span(fn: Callable[[], Any]) -> tuple[float, float]:
        """(wall ms, process CPU ms) of one call; on CUDA synchronized before both timestamps."""
        wall, cpu = now(), time.process_time()
        fn()
        return 1e3 * (now() - wall), 1e3 * (time.process_time() - cpu)

    final: dict[str, torch.Tensor] = {}  # x_0 of each variant's last trajectory

    def trajectory(n: int, variant: str = "topk") -> tuple[float, float, list[float]]:
        """One topk DDIM run: (mean wall ms, mean CPU ms per step, mean kept shards by step).
        ``topk`` evaluates the kept pairs (data-dependent shapes); ``topk_static`` k pairs per
        sample, padded (static shapes, eager); ``topk_graphed`` the same as one CUDA graph replay."""
        prior, router = torch.ones(n, device=device), Router(b, n, T, device)
        pairs = {"topk": None, "topk_static": grouped[n].mixed_pairs,
                 "topk_graphed": graphed_pairs.get(n),
                 "topk_graphed_compiled": graphed_pairs_compiled.get(n)}[variant]  # fmt: skip
        den = ComposedDenoiser(grouped[n], C.TopK(k=min(TOPK, n), threshold=THRESHOLD), prior,
                               router=router, pairs=pairs)  # fmt: skip
        spans: list[tuple[float, float]] = []

        def denoise(x_t: torch.Tensor, t_step: torch.Tensor) -> torch.Tensor:
            out: list[torch.Tensor] = []
            spans.append(span(lambda: out.append(den(x_t, t_step, y))))
            return out[0]

        scheduler = DDIMScheduler(**sched_kw)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED)).to(device)
        final[variant] = run_sampler(denoise, scheduler, noise, args.steps).float()
        kept = [float((w > 0).sum(1).float().mean()) for w in den.trace]
        return statistics.fmean(s[0] for s in spans), statistics.fmean(s[1] for s in spans), kept

    def count(fn: Callable[[], Any]) -> dict[str, int]:
        """FLOPs and dispatched aten ops (views excluded; a proxy for GPU kernel launches)."""
        ops = OpCounter()
        with FlopCounterMode(display=False) as flops, ops:
            fn()
        return {"flops": int(flops.get_total_flops()), "aten_ops": ops.count}

    calls = {n: methods(n) for n in shards}
    clock = time.perf_counter()

    def progress(what: str) -> None:
        """One line on stderr with the seconds since the models were built (where a slow or
        killed GPU run spent its time)."""
        print(f"[{time.perf_counter() - clock:7.1f} s] {what}", file=sys.stderr, flush=True)

    tol = 1e-4 if args.precision == "32" else 1e-1
    results: dict[str, Any] = {}
    names = list(method_names(args.device))
    errors: dict[str, str] = {}
    # a method that cannot run here (e.g. compile) is reported, not fatal
    with torch.no_grad(), amp:
        for m in [m for m in GRAPHED if m in names and m not in TRAJECTORIES]:
            try:
                for n in shards:
                    calls[n][m]()
                progress(f"{m}: first call (capture{', compilation' if 'compiled' in m else ''})")
            except Exception as err:  # noqa: BLE001 - any failure: record it, time the others
                errors[m] = f"{type(err).__name__}: {err}"[:2000]
                names.remove(m)
                print(f"{m} failed, not timed: {errors[m][:300]}", file=sys.stderr)
    timed = [m for m in names if m not in TRAJECTORIES]
    trajectories = [m for m in names if m in TRAJECTORIES]
    with torch.no_grad(), amp:
        for n in shards:  # correctness and op counts once per n, before timing
            ref = calls[n]["loop"]().float()
            average = [m for m in GRAPHED_STEPS if m != "graphed_classifier" and m in names]
            checked = ("grouped", "peft_mixed", *average)
            diff = {m: (calls[n][m]().float() - ref).abs().max().item() for m in checked}
            results[str(n)] = {
                **{f"max_abs_diff_{m}_vs_loop": d for m, d in diff.items()},
                "allclose": all(d <= tol for d in diff.values()),
                "tolerance": tol,
                "eps_abs_mean": ref.abs().mean().item(),
                # a graph replay dispatches no aten op: the graphed methods are not counted
                "counts": {m: count(calls[n][m]) for m in timed if m not in GRAPHED},
            }
            for variant in list(trajectories):
                try:
                    trajectory(n, variant)  # warm-up (and the graph's capture, compilation)
                except Exception as err:  # noqa: BLE001 - a GPU-only variant: record, go on
                    if variant not in GRAPHED:
                        raise
                    errors[variant] = f"{type(err).__name__}: {err}"[:2000]
                    names.remove(variant)
                    trajectories.remove(variant)
                    print(f"{variant} failed, not timed: {errors[variant][:300]}", file=sys.stderr)
            for variant in trajectories[1:]:  # the same x_T: static pairs against kept pairs
                diff = (final[variant] - final["topk"]).abs().max().item()
                results[str(n)][f"max_abs_diff_{variant}_vs_topk_x0"] = diff
        progress("checked against the loop; trajectories warmed up")
        times = {n: {m: [] for m in names} for n in shards}  # (wall ms, CPU ms) per round
        kept: dict[int, list[float]] = {}
        for r in range(args.rounds):
            for n in shards:
                spans: dict[str, list[tuple[float, float]]] = {m: [] for m in timed}
                for i in range(args.warmup + args.iters):  # call by call, order rotated
                    for m in timed[(i + r) % len(timed) :] + timed[: (i + r) % len(timed)]:
                        spans[m].append(span(calls[n][m]))
                    if i == args.warmup + args.iters // 2:  # one trajectory each, mid-round
                        for variant in trajectories:
                            *traj, kept[n] = trajectory(n, variant)
                            times[n][variant].append(tuple(traj))
                for m in timed:
                    kept_spans = spans[m][args.warmup :]
                    times[n][m].append(
                        tuple(statistics.median(s[j] for s in kept_spans) for j in (0, 1))
                    )
            progress(f"round {r + 1}/{args.rounds} timed")
    for n in shards:
        row = results[str(n)]
        for m in names:
            row[m] = {}
            for kind, j in (("", 0), ("cpu_", 1)):
                ms, one_ms = [v[j] for v in times[n][m]], [v[j] for v in times[n]["one_adapter"]]
                by_round = [a / o for a, o in zip(ms, one_ms, strict=True)]
                row[m] |= {
                    f"{kind}ms": round(statistics.median(ms), 3),
                    f"{kind}ratio": round(statistics.median(by_round), 4),
                    f"{kind}ms_by_round": [round(v, 3) for v in ms],
                    f"{kind}ratio_by_round": [round(v, 4) for v in by_round],
                }
        if "bare_nB_compiled" in names:  # goal 1's second ratio: the composed step / the floor
            for m in [m for m in GRAPHED_STEPS if m in names]:
                by_round = [
                    a[0] / f[0]
                    for a, f in zip(times[n][m], times[n]["bare_nB_compiled"], strict=True)
                ]
                row[f"{m}_over_bare_nB_compiled"] = round(statistics.median(by_round), 4)
        row["topk_kept_per_sample_by_step"] = [round(k, 3) for k in kept[n]]
        row["topk_mean_kept_per_sample"] = round(statistics.fmean(kept[n]), 4)
    n_lora = sum(p.numel() for name, p in one.named_parameters() if "lora_" in name)
    info = {"total_params": bare.num_parameters(), "lora_params_per_shard": n_lora}
    info["adapter"], info["scheduler"] = adapter, sched_kw
    info["methods"], info["errors"] = names, errors
    save(results, info)
    if args.profile:  # at the largest n, after timing: where each method's time goes
        n = max(shards)
        results["profile"] = {"n": n}
        with torch.no_grad(), amp:
            for m in [
                m for m in (*GRAPHED_STEPS, "bare_nB", "one_adapter", "grouped") if m in names
            ]:
                results["profile"][m] = profile_calls(calls[n][m], PROFILED_CALLS, sync)
                progress(f"profiled {m}")
                save(results, info)
    return results, info


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    load_before = os.getloadavg()
    started = time.perf_counter()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    router = {"topk": TOPK, "threshold": THRESHOLD, "sharpness_min_max": [SHARP_MIN, SHARP_MAX]}
    fixed = {"t_single_step": T_STEP, "factor_std": FACTOR_STD}
    out: dict[str, Any] = {}

    def save(results: dict[str, Any], info: dict[str, Any]) -> None:
        out.update({
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "wall_s": round(time.perf_counter() - started, 1),
            "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before]},
            "config": {**config, **info, **fixed, "topk_router": router},
            "results": results,
        })  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    results, info = measure(args, save)

    names = out["config"]["methods"]
    head = "".join(f"{m[:11]:>12}" for m in names[1:])
    for kind in ("", "cpu_"):  # wall, then process CPU time
        print(f"{'n':>2}{kind + 'one ms':>11}{head}{'kept':>7}{'grouped-loop':>14}")
        for n in args.shards:
            row = results[str(n)]
            ratios = "".join(f"{row[m][kind + 'ratio']:>12.2f}" for m in names[1:])
            kept, diff = row["topk_mean_kept_per_sample"], row["max_abs_diff_grouped_vs_loop"]
            print(
                f"{n:>2}{row['one_adapter'][kind + 'ms']:>11.2f}{ratios}{kept:>7.2f}{diff:>14.1e}"
            )
    for m, prof in results.get("profile", {}).items():
        if m != "n":
            busy = (
                ""
                if prof["busy"] is None
                else f", kernels {prof['kernel_ms']} ms ({prof['busy']:.0%} busy)"
            )
            top = prof["top"][0][0][:60] if prof["top"] else "-"
            print(f"profile {m}: {prof['wall_ms']} ms per call{busy}; top: {top}")
    print(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
