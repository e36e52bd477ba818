"""Per-step time of shard training (ShardTraining under Lightning) against a bare PyTorch loop.

Both paths train the same LoRA UNet (conf/backbone/<preset>.yaml, conf/adapter/lora.yaml) on the
same fixed in-memory batch with the same math: generator-seeded noise, timesteps and label dropout
as in ``DenoisingModule.denoising_loss``, forward, MSE loss, backward, AdamW step, zero_grad.
Rounds alternate between the two paths; warm-up steps are excluded. Run from the repo root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_step.py --preset small --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch._inductor.config
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from peft.helpers import disable_input_dtype_casting
from torch.utils.data import DataLoader, default_collate
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/train_step.py` from the repo root

from benchmarks.presets import add_size_args, backbone_conf, fill_size_defaults  # noqa: E402
from benchmarks.profiling import profile_calls  # noqa: E402
from cdm.core.diffusion import (  # noqa: E402
    epsilon_loss,
    q_sample,
    sample_noise_and_timesteps,
    step_generator,
)
from cdm.core.runtime import machine_info  # noqa: E402
from cdm.models.adapters import prepare_shard_model, trainable_parameters  # noqa: E402
from cdm.models.backbone import build_scheduler, build_unet, null_label  # noqa: E402
from cdm.training.callbacks import CompileModel  # noqa: E402
from cdm.training.jobs import ShardTraining  # noqa: E402

SEED, LR, COND_DROP, NUM_CLASSES = 0, 2e-3, 0.1, 10  # conf/train.yaml optim defaults


def make_unet(bcfg: DictConfig, args: argparse.Namespace) -> torch.nn.Module:
    """A freshly initialised UNet; call right after seeding so both paths get the same weights."""
    kw = OmegaConf.to_container(bcfg.unet, resolve=True)
    size, ch = args.resolution, args.channels
    return build_unet(bcfg.kind, kw, sample_size=size, channels=ch, num_classes=NUM_CLASSES)


class StepTimer(pl.Callback):
    """Wall (perf_counter) and process CPU time at each batch start and end, after a CUDA sync.

    ``unsynced``: synchronise only at the starts of the first and the one-past-last timed step,
    so the host runs ahead of the GPU as in real training; only the mean period (throughput) is
    then meaningful, and ``summary`` reports it as ``period_ms`` (step_ms and cpu_ms: host side).
    """

    def __init__(self, sync: bool, unsynced: tuple[int, int] | None = None) -> None:
        self.sync, self.starts, self.ends, self.losses = sync, [], [], []
        self.unsynced = unsynced

    def now(self, at_start: bool = False) -> tuple[float, float]:
        edge = at_start and self.unsynced is not None and len(self.starts) in self.unsynced
        if self.sync and (self.unsynced is None or edge):
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(self.now(at_start=True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(self.now())
        self.losses.append(outputs["loss"].detach())

    def summary(self, warmup: int, steps: int) -> dict[str, float]:
        """Medians (ms) over the timed steps: in-step span, start-to-next-start period, CPU span
        (unsynced: the mean period over the timed span)."""
        pairs = list(zip(self.starts, self.ends, strict=True))[warmup : warmup + steps]
        nexts = list(pairwise(self.starts))[warmup : warmup + steps]
        med = statistics.median
        period = med(b[0] - a[0] for a, b in nexts)
        if self.unsynced is not None:
            period = (self.starts[warmup + steps][0] - self.starts[warmup][0]) / steps
        return {
            "step_ms": 1e3 * med(e[0] - s[0] for s, e in pairs),
            "period_ms": 1e3 * period,
            "cpu_ms": 1e3 * med(e[1] - s[1] for s, e in pairs),
        }


NORM_DTYPES = {"autocast": None, "bf16": torch.bfloat16}


@contextmanager
def group_norm_in(dtype: torch.dtype | None) -> Iterator[None]:
    """Under autocast, ``F.group_norm`` reads and writes ``dtype`` (weights cast too; the CUDA
    kernel accumulates its statistics in fp32 either way). CUDA autocast runs it in fp32, so its
    output is fp32 and each conv behind it casts that back to bf16; in bf16 the norm moves half
    the bytes and the casts go. Outside autocast, or with ``dtype`` None, nothing changes."""
    plain = F.group_norm

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
        if dtype is None or not torch.is_autocast_enabled(x.device.type):
            return plain(x, num_groups, weight, bias, eps)
        with torch.autocast(x.device.type, enabled=False):
            w, b = (None if t is None else t.to(dtype) for t in (weight, bias))
            return plain(x.to(dtype), num_groups, w, b, eps)

    F.group_norm = group_norm
    try:
        yield
    finally:
        F.group_norm = plain


def bare_loss(
    model, batch, alphas, step: int, null: int, amp: torch.autocast, peft_casts: bool = False
) -> torch.Tensor:
    """The epsilon loss of DenoisingModule.denoising_loss, written with cdm.core.diffusion only
    (under autocast without peft's input casts, as ShardTraining trains in bf16-mixed, unless
    ``peft_casts``)."""
    x0, labels = batch["image"], batch["label"]
    with (
        amp,  # entered before the next line is evaluated: the casts stay off under autocast only
        disable_input_dtype_casting(
            model, torch.is_autocast_enabled(x0.device.type) and not peft_casts
        ),
    ):
        generator = step_generator(SEED, step, 0, x0.device)
        noise, timesteps = sample_noise_and_timesteps(x0, alphas.shape[0], generator)
        drop = torch.rand(x0.shape[0], generator=generator, device=x0.device) < COND_DROP
        labels = torch.where(drop, torch.full_like(labels, null), labels)
        x_t = q_sample(x0, noise, timesteps, alphas)
        return epsilon_loss(model(x_t, timesteps, class_labels=labels, return_dict=False)[0], noise)


def run_bare(model, batch, alphas, null, amp, total: int, timer: StepTimer) -> StepTimer:
    """``total`` steps of the bare loop, timed over the same span as in Lightning."""
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=timer.sync or None)
    for step in range(total):
        timer.starts.append(timer.now(at_start=True))
        loss = bare_loss(model, batch, alphas, step, null, amp)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.ends.append(timer.now())
        timer.losses.append(loss.detach())
    return timer


def run_ours(
    module: ShardTraining,
    loader: DataLoader,
    args,
    total: int,
    timer: StepTimer,
    compiler: CompileModel | None = None,
) -> StepTimer:
    """``total`` steps of ShardTraining under a real ``Trainer.fit`` (with ``compiler``: what
    ``cdm-train callbacks=compile`` adds)."""
    sync, precision = timer.sync, "bf16-mixed" if args.precision == "bf16" else "32-true"
    off = dict.fromkeys(
        ("enable_checkpointing", "enable_progress_bar", "enable_model_summary"), False
    )
    kw = dict(accelerator="gpu" if sync else "cpu", devices=1, max_steps=total, logger=False, **off)
    callbacks = [timer, *([compiler] if compiler else [])]
    pl.Trainer(precision=precision, callbacks=callbacks, **kw).fit(module, train_dataloaders=loader)
    return timer


def count_flops(model, batch, alphas, null, amp) -> int:
    """FLOPs of one forward+backward of the bare path (the optimizer step is not counted)."""
    with FlopCounterMode(display=False) as counter:
        bare_loss(model, batch, alphas, 0, null, amp).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def machine() -> dict[str, Any]:
    """Where the numbers were measured (load average: this CPU may be shared)."""
    return machine_info(lightning=pl.__version__)


def parse_args() -> argparse.Namespace:
    """Command line; resolution/channels default to 8/1 (tiny, small) or 32/3 (base)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p, preset="small", batch_size=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["32", "bf16"], default="32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (cuda only)")
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
        default="default",
        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs of the step)",
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--layout-opt",
        action="store_true",
        help="with --compile: force inductor's layout optimization (channels-last buffers in the "
        "graph), which it skips for a UNet whose convs narrow the channels (LoRA's A, the up path)",
    )
    p.add_argument(
        "--pin-memory",
        action="store_true",
        help="ours: a pinned DataLoader, so the batch's copy to the GPU does not wait for the GPU",
    )
    p.add_argument(
        "--norm-dtype",
        choices=list(NORM_DTYPES),
        default="autocast",
        help="group_norm under bf16 autocast: as autocast runs it (fp32 on CUDA), or in bf16 (both paths)",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN pick the fastest conv kernels (not deterministic; cdm trains deterministic)",
    )
    p.add_argument(
        "--unsynced",
        action="store_true",
        help="no CUDA sync per step: the host runs ahead as in training; period = mean over the span",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile 5 bare steps: kernel time against wall time, the top kernels",
    )
    p.add_argument(
        "--census",
        type=Path,
        help="with --profile: set the profile's kernel families beside this train_census.py JSON's "
        "floors (counted for the same preset, size, batch, precision and norms)",
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    p.add_argument("--out", type=Path, help="default docs/benchmarks/train_step-<device>.json")
    args = p.parse_args()
    fill_size_defaults(args)
    if args.census is not None:
        if not args.profile:
            p.error("--census needs --profile (it reads the profile's kernel families)")
        if not args.census.is_file():
            p.error(
                f"--census {args.census}: no such file (make it with benchmarks/train_census.py)"
            )
        counted = json.loads(args.census.read_text())["config"]
        keys = ("preset", "resolution", "channels", "batch_size", "precision", "norm_dtype")
        mine, theirs = ({k: c.get(k) for k in keys} for c in (vars(args), counted))
        if mine != theirs or counted.get("targets"):
            p.error(f"--census {args.census} counted {theirs} (targets {counted.get('targets')}), "
                    f"this run is {mine}: count it with the same flags")  # fmt: skip
    args.out = args.out or ROOT / "docs" / "benchmarks" / f"train_step-{args.device}.json"
    if args.compile and args.device != "cuda":
        p.error("--compile is for --device cuda only")
    if args.layout_opt and not args.compile:
        p.error("--layout-opt is an inductor option: add --compile")
    if args.compile_mode != "default" and not args.compile:
        p.error("--compile-mode needs --compile")
    return args


def summarize(
    rounds: dict[str, list[dict[str, float]]], flops: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Medians over the rounds so far per path, images/s, TFLOP/s and the ours/bare ratios."""
    report: dict[str, Any] = {}
    for path, rs in rounds.items():
        med = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        med["images_per_s"] = round(1e3 * args.batch_size / med["period_ms"], 1)
        med["tflop_per_s"] = round(flops / med["period_ms"] / 1e9, 4)
        if args.device == "cuda":
            med["fraction_of_peak"] = round(med["tflop_per_s"] / args.peak_tflops, 4)
        report[path] = {**med, "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rs]}
    for key in ("step", "period", "cpu"):
        report[f"ratio_{key}"] = round(report["ours"][f"{key}_ms"] / report["bare"][f"{key}_ms"], 4)
        pairs = zip(rounds["ours"], rounds["bare"], strict=True)  # adjacent runs: less drift
        report[f"ratio_{key}_by_round"] = [
            round(o[f"{key}_ms"] / b[f"{key}_ms"], 4) for o, b in pairs
        ]
    return report


def measure(
    args: argparse.Namespace, save: Callable[[dict[str, Any], dict[str, Any]], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build both paths, count FLOPs, run the interleaved rounds; return (results, model info).

    ``save(results, info)`` is called after every round and before the profile, so a run killed
    part-way (a GPU lease running out) keeps the rounds it timed."""
    device, sync = torch.device(args.device), args.device == "cuda"
    total = args.warmup + args.steps + 1  # +1: the period of the last timed step
    bcfg = backbone_conf(args.preset)
    adapter = dict(OmegaConf.load(ROOT / "cdm" / "conf" / "adapter" / "lora.yaml"))
    alphas = build_scheduler(bcfg.scheduler).alphas_cumprod
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    gen = torch.Generator().manual_seed(SEED)
    shape = (args.batch_size, args.channels, args.resolution, args.resolution)
    images = torch.rand(shape, generator=gen) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen)
    batch = {"image": images.to(device).contiguous(memory_format=fmt), "label": labels.to(device)}
    # a list of dicts as the dataset: every sequential batch of size B is the same B samples
    data = [{"image": images[i], "label": labels[i], "index": i} for i in range(len(images))]
    data = data * total

    def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
        out = default_collate(samples)
        return {**out, "image": out["image"].contiguous(memory_format=fmt)}

    loader = DataLoader(
        data, batch_size=args.batch_size, collate_fn=collate, pin_memory=args.pin_memory
    )

    kw = dict(dataset_size=args.batch_size, lr=LR, cond_drop_prob=COND_DROP, seed=SEED)
    torch.manual_seed(SEED)  # the same UNet and LoRA init in both paths
    module = ShardTraining(make_unet(bcfg, args), alphas, adapter, **kw)
    module.model.to(memory_format=fmt)
    torch.manual_seed(SEED)
    bare = prepare_shard_model(make_unet(bcfg, args), adapter).to(device, memory_format=fmt).train()
    null, bare_alphas = null_label(bare), alphas.float().to(device)
    flops = count_flops(bare, batch, bare_alphas, null, amp)
    # ours: what callbacks=compile does (layout_opt: the same inductor setting main patches for bare)
    compiler = CompileModel(args.compile_mode, layout_opt=args.layout_opt) if args.compile else None
    if args.compile:
        bare.compile(mode=args.compile_mode)
    n_lora, n_all = sum(p.numel() for _, p in trainable_parameters(bare)), bare.num_parameters()
    info = {"lora_params": n_lora, "total_params": n_all}

    rounds: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
    losses: dict[str, torch.Tensor] = {}
    loss_diff = 0.0
    for r in range(args.rounds):  # alternate which path goes first
        for path in ("ours", "bare") if r % 2 == 0 else ("bare", "ours"):
            edges = (args.warmup, args.warmup + args.steps) if args.unsynced else None
            timer = StepTimer(sync, edges)
            if path == "ours":
                run_ours(module, loader, args, total, timer, compiler)
            else:
                run_bare(bare, batch, bare_alphas, null, amp, total, timer)
            rounds[path].append(timer.summary(args.warmup, args.steps))
            # where a slow or killed GPU run spent its time (the first round compiles)
            print(f"round {r + 1}/{args.rounds} {path}: {rounds[path][-1]['period_ms']:.2f} ms "
                  f"per period", file=sys.stderr, flush=True)  # fmt: skip
            losses[path] = torch.stack(timer.losses).float().cpu()
        loss_diff = max(loss_diff, (losses["ours"] - losses["bare"]).abs().max().item())
        report = summarize(rounds, flops, args)
        report.update(max_abs_loss_diff=loss_diff, flop_per_step_fwd_bwd=flops)
        report["peak_tflops"] = args.peak_tflops if sync else None
        save(report, info)
    if args.profile:  # where a bare step's time goes: kernel time against wall (after timing)
        opt = torch.optim.AdamW(
            [p for _, p in trainable_parameters(bare)], lr=LR, weight_decay=0.0, fused=sync or None
        )
        steps = iter(range(total, total + 100))

        def bare_step() -> None:
            bare_loss(bare, batch, bare_alphas, next(steps), null, amp).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        report["profile_bare_step"] = profile_calls(bare_step, 5, sync, origins="aten::copy_")
        if args.census is not None:
            census = json.loads(args.census.read_text())["results"]["step"]
            report["profile_vs_census"] = against_floors(report["profile_bare_step"], census)
        save(report, info)
    return report, info


def against_floors(profile: dict[str, Any], census: dict[str, Any]) -> dict[str, Any]:
    """Profiled kernel ms per step beside the census's floors (``benchmarks/train_census.py``):
    conv, gemm and attention each against their own floor; everything else (fused Triton kernels,
    elementwise, casts, norms, layout, optimizer) against the unfused floor of the non-matmul ops,
    which fusion may beat. ``x_floor``: measured / floor, how far from the roofline."""
    measured = {family: ms for family, ms, _, _ in profile["families"]}
    floors = {family: row["floor_ms"] for family, row in census["families"].items()}
    rows = {}
    for family in ("conv", "gemm", "attention"):
        ms, floor = measured.get(family, 0.0), floors.get(family, 0.0)
        rows[family] = {"ms": round(ms, 3), "floor_ms": floor, "x_floor": _ratio(ms, floor)}
    matmul_ms = sum(r["ms"] for r in rows.values())
    rest_ms = sum(measured.values()) - matmul_ms
    rest_floor = census["floor"]["unfused"]["ms"] - sum(r["floor_ms"] for r in rows.values())
    rows["everything else"] = {
        "ms": round(rest_ms, 3), "floor_ms": round(rest_floor, 3), "x_floor": _ratio(rest_ms, rest_floor)
    }  # fmt: skip
    total = sum(measured.values())
    rows["all kernels"] = {
        "ms": round(total, 3),
        "floor_ms": census["floor"]["unfused"]["ms"],
        "x_floor": _ratio(total, census["floor"]["unfused"]["ms"]),
        "x_compute_floor": _ratio(total, census["floor"]["compute"]["ms"]),
    }
    return rows


def _ratio(ms: float, floor: float) -> float | None:
    return round(ms / floor, 3) if floor > 0 else None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}

    def save(report: dict[str, Any], model_info: dict[str, Any]) -> None:
        out = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before]},
            "config": {**config, **model_info, "lr": LR, "cond_drop_prob": COND_DROP},
            "results": report,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    with (
        group_norm_in(NORM_DTYPES[args.norm_dtype]),
        torch._inductor.config.patch(force_layout_optimization=args.layout_opt),
    ):
        report, _ = measure(args, save)

    print(f"{'path':<6}{'step ms':>9}{'period ms':>11}{'cpu ms':>9}{'images/s':>10}{'TFLOP/s':>9}")
    for path in ("ours", "bare"):
        r = report[path]
        row = (r["step_ms"], r["period_ms"], r["cpu_ms"], r["images_per_s"], r["tflop_per_s"])
        print(f"{path:<6}{row[0]:>9.2f}{row[1]:>11.2f}{row[2]:>9.2f}{row[3]:>10.0f}{row[4]:>9.3f}")
    ratios = ", ".join(f"{k} {report[f'ratio_{k}']:.3f}" for k in ("step", "period", "cpu"))
    print(f"ours/bare: {ratios} (target <= 1.05); step by round {report['ratio_step_by_round']}")
    if args.device == "cuda":
        frac = {p: f"{report[p]['fraction_of_peak']:.1%}" for p in ("ours", "bare")}
        print(f"of the {args.peak_tflops:g} TFLOP/s peak: ours {frac['ours']}, bare {frac['bare']}")
    for family, row in report.get("profile_vs_census", {}).items():
        times = "-" if row["x_floor"] is None else f"{row['x_floor']:.2f}x the floor"
        print(
            f"profiled {family:<16}{row['ms']:>9.2f} ms, floor {row['floor_ms']:>8.2f} ms: {times}"
        )
    for chain, shapes, ms, n in (
        report.get("profile_bare_step", {}).get("origins", {}).get("aten::copy_", [])[:6]
    ):
        print(f"aten::copy_ {ms:7.3f} ms in {n:g} calls per step: {shapes} from {chain}")
    print(f"max |loss ours - loss bare| = {report['max_abs_loss_diff']:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
