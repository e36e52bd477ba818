"""``cdm-table1`` end to end on one device, timed per stage, on CIFAR-sized random data.

The script writes a seeded random dataset as an ``.npz`` (``--train-images`` + ``--test-images``
images of 32x32x3 in 10 classes: each class has its own mean colour and stripe pattern, plus
noise, so the domain feature net and the FD numbers have something to tell apart), then runs
``cdm-table1`` on it in this process (``data=npz``, the experiments ``<name>_<n>split`` of
``--splits``), with ``device=cuda cuda_graph=true trainer=gpu`` for ``--device cuda``. Training
runs fixed budgets (every stopping rule off, epochs from the flags), so a CPU run and a GPU run
of the same flags do the same number of optimizer steps.

Stages are timed from the outside, without touching ``cdm/``: the functions ``run_table1``
calls (``cdm.paper.table1.train_missing``, ``run_sampling``, ``run_evaluation``) are wrapped
for the run, so each stage's time includes its config composition, data loading, Trainer and
model set-up and the store writes. The wall time each job records itself (``wall_time_s`` on
its card: the fit, or the sampling/evaluation call) is reported beside it. Run from the repo
root (the CPU run of the proposed GPU config; the GPU run adds ``--device cuda``):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/table1_device.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/table1_device.py --device cuda \\
        --compare docs/benchmarks/table1-cpu.json --out $OUT/table1-cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python3 benchmarks/table1_device.py` without cdm installed
    sys.path.insert(0, str(ROOT))
DATASET = "randcifar"  # the npz's stem: the dataset's name, experiments randcifar_<n>split
METHODS = ("classifier", "compartmental", "average", "random")  # table1.compositions
BACKBONES = ("tiny", "small", "base")
SEED = 0

# --config-dir of the run: debug=bench (fixed budgets; debug/stage/bench_<stage>.yaml reach only
# the stages that compose those groups, as conf/debug/tiny.yaml does)
BENCH_DEBUG = """# @package _global_
# benchmarks/table1_device.py: fixed training budgets (no stopping rule), no progress bars.
pretrain:
  epochs: {backbone_epochs}
  batch_size: {train_batch}
  convergence: null
optim:
  epochs_per_slice: {shard_epochs}
  batch_size: {train_batch}
  convergence: null
trainer:
  enable_progress_bar: false
"""
BENCH_STAGE = {
    "router": "# @package _global_\nrouter:\n  epochs: {router_epochs}\n"
    "  batch_size: {train_batch}\n  convergence: null\n",
    "head": "# @package _global_\nrouter:\n  convergence: null\n",
    "feature_net": "# @package _global_\nfeature_net:\n  epochs: {feature_net_epochs}\n"
    "  batch_size: {train_batch}\n  convergence: null\n",
}


class ArgError(Exception):
    """A bad command-line value: reported as one line, exit status 2."""


class Table1Failed(Exception):
    """cdm-table1 ended with a user error (it printed the one line itself)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        die(message)


def die(message: str, status: int = 2) -> NoReturn:
    print(f"table1_device.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def default_threads(n_jobs: int) -> int:
    """torch threads per training job: the CPUs shared by the parallel jobs, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, n_jobs)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="device=cuda: cuda_graph=true for sampling (default on)")  # fmt: skip
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--splits", type=int, nargs="+", default=[2], help="table1.splits")
    p.add_argument("--compositions", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--paragon", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backbone", choices=BACKBONES, default="small")
    p.add_argument("--backbone-epochs", type=int, default=20, help="pretrain.epochs")
    p.add_argument("--shard-epochs", type=int, default=5,
                   help="optim.epochs_per_slice (shards, paragon, compartmental heads)")  # fmt: skip
    p.add_argument("--router-epochs", type=int, default=5)
    p.add_argument("--feature-net-epochs", type=int, default=10)
    p.add_argument("--train-batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per Table 1 cell")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch size")
    p.add_argument("--n-jobs", type=int, default=1, help="table1.n_jobs: shards in parallel")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of each job (default: CPUs / n-jobs, at most 8)")  # fmt: skip
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="another cdm-table1 override (repeatable), e.g. --set trainer.precision=32-true")  # fmt: skip
    p.add_argument("--artifacts", type=Path, default=None,
                   help="keep the data and the store here (default: a temporary folder, removed)")  # fmt: skip
    p.add_argument(
        "--out", type=Path, default=None, help="default docs/benchmarks/table1-<device>.json"
    )
    p.add_argument("--compare", type=Path, default=None,
                   help="a JSON of this script (e.g. the CPU run): per-stage time ratios")  # fmt: skip
    p.add_argument("--load", type=Path, default=None,
                   help="print the stage table of this JSON (and --compare) instead of running")  # fmt: skip
    args = p.parse_args(argv)
    try:
        check_args(args)
    except ArgError as err:
        die(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ArgError`` for the first value that cannot work; fill the defaults."""
    if args.threads is None:
        args.threads = default_threads(args.n_jobs)
    positive = ("train_images", "test_images", "classes", "resolution", "train_batch_size",
                "steps", "num_samples", "batch_size", "n_jobs", "threads", "backbone_epochs",
                "shard_epochs", "router_epochs", "feature_net_epochs")  # fmt: skip
    for key in positive:
        if getattr(args, key) < 1:
            raise ArgError(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.resolution % 4:
        raise ArgError(
            f"--resolution={args.resolution}: must be a multiple of 4 (the UNet halves it)"
        )
    if args.classes < 2 or args.classes > 255:
        raise ArgError(f"--classes={args.classes}: must be in 2..255")
    bad = [n for n in args.splits if n < 1 or n > args.classes]
    if bad:
        raise ArgError(
            f"--splits {bad}: each must be in 1..--classes={args.classes} (shards by class)"
        )
    if args.train_images < 4 * args.classes or args.test_images < args.classes:
        raise ArgError(
            f"--train-images={args.train_images} --test-images={args.test_images}: need at least "
            f"4 train and 1 test image per class ({args.classes} classes)"
        )
    if not args.compositions:
        raise ArgError("--compositions: give at least one of " + ", ".join(METHODS))
    for extra in args.extra:
        if "=" not in extra or extra.startswith("table1."):
            raise ArgError(f"--set {extra!r}: give KEY=VALUE of a cdm config key (not table1.*)")
    if args.load is not None and not args.load.is_file():
        raise ArgError(f"--load {args.load}: no such file")
    if args.compare is not None:
        read_result(args.compare, "--compare")
    if args.load is None and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ArgError("--device cuda: no CUDA device on this machine; use --device cpu")
    if args.out is None:
        args.out = ROOT / "docs" / "benchmarks" / f"table1-{args.device}.json"
    if args.artifacts is not None and args.artifacts.exists() and any(args.artifacts.iterdir()):
        raise ArgError(f"--artifacts {args.artifacts}: not empty; give a new or empty folder")


def read_result(path: Path, flag: str) -> dict[str, Any]:
    """A JSON this script wrote (``results.stages`` is what the comparison needs)."""
    if not path.is_file():
        raise ArgError(f"{flag} {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArgError(f"{flag} {path}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data.get("results", {}).get("stages"), dict):
        raise ArgError(f"{flag} {path}: no results.stages (not a table1_device.py JSON)")
    return data


# ------------------------------------------------------------------------------------------
# data and overrides
# ------------------------------------------------------------------------------------------


def make_dataset(path: Path, n_train: int, n_test: int, classes: int, resolution: int,
                 channels: int, seed: int = SEED) -> dict[str, Any]:  # fmt: skip
    """A seeded random npz in ``cdm.data.loaders.load_npz``'s layout (images uint8 [N,H,W,C],
    labels, split): class k has a mean colour and a stripe pattern of its own, plus noise."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    colour = rng.uniform(40, 215, size=(classes, channels))
    angle = rng.uniform(0, np.pi, size=classes)
    freq = rng.uniform(1.0, 4.0, size=classes)
    grid = np.arange(resolution) / resolution
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    phase = (
        2
        * np.pi
        * freq[:, None, None]
        * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
    )
    stripes = 35.0 * np.sin(phase)  # [classes, H, W]
    images = colour[labels][:, None, None, :] + stripes[labels][..., None]
    images = images + rng.normal(0, 25, size=(n, resolution, resolution, channels))
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    split = np.array(["train"] * n_train + ["test"] * n_test)
    np.savez(path, images=images, labels=labels.astype(np.int64), split=split)
    return {"path": str(path), "images": list(images.shape), "classes": classes,
            "train": n_train, "test": n_test, "bytes": path.stat().st_size}  # fmt: skip


def write_config_dir(directory: Path, args: argparse.Namespace) -> Path:
    """The run's ``--config-dir``: ``debug=bench`` and its per-stage files."""
    values = {
        "backbone_epochs": args.backbone_epochs, "shard_epochs": args.shard_epochs,
        "router_epochs": args.router_epochs, "feature_net_epochs": args.feature_net_epochs,
        "train_batch": args.train_batch_size,
    }  # fmt: skip
    (directory / "debug" / "stage").mkdir(parents=True, exist_ok=True)
    (directory / "debug" / "bench.yaml").write_text(BENCH_DEBUG.format(**values))
    for stage, text in BENCH_STAGE.items():
        (directory / "debug" / "stage" / f"bench_{stage}.yaml").write_text(text.format(**values))
    return directory


def table1_overrides(args: argparse.Namespace, npz: Path, store: Path, run_dir: Path) -> list[str]:
    """The ``cdm-table1`` command line (after ``--config-dir``)."""
    out = [
        "data=npz", f"data.root={npz}", f"data.num_classes={args.classes}",
        f"data.resolution={args.resolution}", f"data.channels={args.channels}",
        f"backbone={args.backbone}", "debug=bench", "logger=csv",
        f"table1.name=bench-{args.device}", f"table1.splits=[{','.join(map(str, args.splits))}]",
        f"table1.compositions=[{','.join(args.compositions)}]",
        f"table1.paragon={str(args.paragon).lower()}", f"table1.n_jobs={args.n_jobs}",
        f"num_samples={args.num_samples}", f"batch_size={args.batch_size}", f"steps={args.steps}",
        f"threads={args.threads}", "progress=false", f"seed={SEED}",
        f"paths.artifacts={store}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    if args.device == "cuda":
        out += ["device=cuda", "trainer=gpu", f"cuda_graph={str(args.cuda_graph).lower()}"]
    return out + list(args.extra)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


class StageTimer:
    """Wraps the functions ``cdm.paper.table1.run_table1`` calls and records each call's span."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.calls: list[dict[str, Any]] = []

    def now(self) -> float:
        if self.sync:
            import torch

            if torch.cuda.is_initialized():  # never the first CUDA call: the jobs set CUDA up
                torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, fn: Callable, label: Callable[..., tuple[str, str | None]]) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            stage, experiment = label(*a, **kw)
            start = self.now()
            try:
                return fn(*a, **kw)
            finally:
                self.calls.append({"stage": stage, "experiment": experiment,
                                   "s": round(self.now() - start, 3)})  # fmt: skip
                # where a slow or killed run spent its time, as it goes
                print(f"stage {stage} ({experiment}): {self.calls[-1]['s']} s", file=sys.stderr,
                      flush=True)  # fmt: skip

        return timed

    def install(self) -> Callable[[], None]:
        """Patch ``cdm.paper.table1``; returns the function that undoes it."""
        import cdm.paper.table1 as t1

        saved = {k: getattr(t1, k) for k in ("train_missing", "run_sampling", "run_evaluation")}

        def train_label(experiment: str, overrides: list, stages: list, n_jobs: int) -> tuple:
            kinds = sorted({s for s, _ in stages}) or ["nothing"]
            return "train_" + "+".join(kinds), experiment

        def sample_label(cfg: Any) -> tuple:
            return f"sample_{cfg.name}", str(cfg.experiment_name)

        def eval_label(cfg: Any) -> tuple:
            return "evaluate", str(cfg.experiment_name)

        t1.train_missing = self.wrap(saved["train_missing"], train_label)
        t1.run_sampling = self.wrap(saved["run_sampling"], sample_label)
        t1.run_evaluation = self.wrap(saved["run_evaluation"], eval_label)

        def undo() -> None:
            for k, v in saved.items():
                setattr(t1, k, v)

        return undo

    def stages(self) -> dict[str, float]:
        """Seconds per stage, summed over experiments; stages that trained nothing are left out."""
        out: dict[str, float] = {}
        for c in self.calls:
            if c["stage"] != "train_nothing":
                out[c["stage"]] = round(out.get(c["stage"], 0.0) + c["s"], 3)
        return out


def card_stage(card: dict[str, Any]) -> str | None:
    """The stage name (as ``StageTimer`` names it) of a stored card."""
    kind = card.get("kind")
    if kind in ("backbone", "shard", "paragon", "router", "head", "feature_net"):
        return f"train_{kind}"
    if kind == "samples":
        return f"sample_{card.get('name')}"
    if kind == "evaluation":
        return "evaluate"
    return None


def store_cards(root: Path, since_unix: float) -> list[dict[str, Any]]:
    """Every card under the store written during this run (files newer than ``since_unix``)."""
    cards = []
    for path in sorted(root.rglob("card.json")):
        rel = path.relative_to(root)
        if path.stat().st_mtime < since_unix or any(p.startswith(".") for p in rel.parts):
            continue  # older, or a writer's temp / set-aside folder (.tmp-*, .old-*)
        card = json.loads(path.read_text())
        config = card.get("config") if isinstance(card.get("config"), dict) else {}
        trainer = config.get("trainer") or {}
        entry = {"path": rel.as_posix(), "kind": card.get("kind"), "stage": card_stage(card),
                 "name": card.get("name"), "wall_time_s": card.get("wall_time_s"),
                 "device": card.get("device"), "optimizer_steps": card.get("optimizer_steps"),
                 "accelerator": trainer.get("accelerator"), "precision": trainer.get("precision")}  # fmt: skip
        if card.get("kind") == "samples":  # where drawn; a graphed step evaluates every pair
            entry.update(sample_device=config.get("device"), cuda_graph=config.get("cuda_graph"),
                         evaluated_pairs_per_sample_step=(card.get("metrics") or {}).get(
                             "evaluated_pairs_per_sample_step"))  # fmt: skip
        cards.append(entry)
    return cards


def card_seconds(cards: list[dict[str, Any]]) -> dict[str, float]:
    """The jobs' own ``wall_time_s`` summed per stage (parallel jobs add up)."""
    out: dict[str, float] = {}
    for c in cards:
        if c["stage"] and isinstance(c["wall_time_s"], int | float):
            out[c["stage"]] = round(out.get(c["stage"], 0.0) + float(c["wall_time_s"]), 3)
    return out


def table_summary(store: Path, name: str) -> dict[str, Any]:
    """The Table 1 the store holds: its CSV rows and each cell (experiment, n, method, value)."""
    import csv

    directory = store / "tables" / name
    card = json.loads((directory / "card.json").read_text())
    with open(directory / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    cells = [{"experiment": c["experiment"], "n": c["n"], "method": c["method"],
              "metric": c.get("metric_name"), "value": c.get("value")} for c in card["cells"]]  # fmt: skip
    return {"rows": rows, "cells": cells, "metric": card.get("metric"),
            "wall_time_s": card.get("wall_time_s"),
            "experiment_wall_time_s": card.get("experiment_wall_time_s")}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def run_table1(argv: list[str]) -> None:
    """``cdm-table1 <argv>`` in this process (Hydra reads ``sys.argv``)."""
    from cdm.cli.table1 import main as table1_main

    saved = sys.argv
    sys.argv = ["cdm-table1", *argv]
    try:
        table1_main()
    except SystemExit as err:  # cdm_main ends a user error with one line and exit 2
        if err.code not in (0, None):
            raise Table1Failed(
                f"cdm-table1 exited with status {err.code} (its error is above)"
            ) from None
    finally:
        sys.argv = saved


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Make the data, run cdm-table1 with the stages timed; the ``results`` of the JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    work.mkdir(parents=True, exist_ok=True)
    data = make_dataset(work / f"{DATASET}.npz", args.train_images, args.test_images,
                        args.classes, args.resolution, args.channels)  # fmt: skip
    conf = write_config_dir(work / "conf", args)
    store = work / "store"
    argv = ["--config-dir", str(conf),
            *table1_overrides(args, Path(data["path"]), store, work / "hydra")]  # fmt: skip
    t_import = time.perf_counter()
    import cdm.cli.table1  # noqa: F401  (cdm's imports, outside every stage)
    import cdm.paper.table1  # noqa: F401

    import_s = time.perf_counter() - t_import
    timer = StageTimer(sync=args.device == "cuda")
    undo = timer.install()
    since = time.time() - 1.0  # card mtimes: file systems keep whole seconds at worst
    start = time.perf_counter()
    error = None
    try:
        run_table1(argv)
    except (Exception, KeyboardInterrupt) as err:  # keep the stages timed so far (Ctrl-C too)
        error = f"{type(err).__name__}: {err}"
        if not isinstance(err, Table1Failed):
            traceback.print_exc()
    finally:
        undo()
        total = time.perf_counter() - start
    stages = timer.stages()
    cards = store_cards(store, since) if store.is_dir() else []
    results: dict[str, Any] = {
        "total_s": round(total, 3),
        "import_s": round(import_s, 3),
        "stages": stages,
        "other_s": round(total - sum(stages.values()), 3),  # compose, data load, table, W&B off
        "card_wall_time_s": card_seconds(cards),
        "calls": timer.calls,
        "cards": cards,
        "data": data,
        "cdm_table1_argv": argv,
    }
    if args.device == "cuda":
        import torch

        results["cuda_max_memory_allocated_gib"] = round(
            torch.cuda.max_memory_allocated() / 2**30, 3
        )
    if error is None:
        results["table"] = table_summary(store, f"bench-{args.device}")
    else:
        results["error"] = error
    return results


def compare(this: dict[str, Any], other: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per stage of either run (and ``total``): seconds of both and ``ratio`` = this / other
    (None where a run lacks the stage or took no time)."""
    a, b = dict(this["results"]["stages"]), dict(other["results"]["stages"])
    a["total"], b["total"] = this["results"]["total_s"], other["results"]["total_s"]
    out = {}
    for stage in [*a, *(s for s in b if s not in a)]:
        x, y = a.get(stage), b.get(stage)
        ratio = round(x / y, 4) if x is not None and y else None
        out[stage] = {"this_s": x, "other_s": y, "ratio": ratio}
    return out


def print_table(result: dict[str, Any], against: dict[str, Any] | None = None) -> None:
    """Stage, seconds, the jobs' own seconds and, with ``against``, the other run's and the ratio."""
    res = result["results"]
    cards = res.get("card_wall_time_s", {})
    device = result["config"]["device"]
    head = f"{'stage':<28}{device + ' s':>10}{'in jobs s':>11}"
    ratios = compare(result, against) if against is not None else {}
    if against is not None:
        head += f"{against['config']['device'] + ' s':>10}{'ratio':>8}"
    print(head)
    rows = [*res["stages"].items(), ("(between stages)", res.get("other_s")),
            ("total", res["total_s"])]  # fmt: skip
    for stage, s in rows:
        if s is None:
            continue
        line = f"{stage:<28}{s:>10.1f}"
        line += f"{cards[stage]:>11.1f}" if stage in cards else f"{'':>11}"
        if stage in ratios:
            r = ratios[stage]
            line += f"{r['other_s']:>10.1f}" if r["other_s"] is not None else f"{'-':>10}"
            line += f"{r['ratio']:>8.3f}" if r["ratio"] is not None else f"{'-':>8}"
        print(line)
    if "table" in res:
        for row in res["table"]["rows"]:
            print(" | ".join(row))
    if "error" in res:
        print(f"the run failed: {res['error']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    against = None
    if args.compare is not None:
        against = read_result(args.compare, "--compare")
    if args.load is not None:
        try:
            result = read_result(args.load, "--load")
        except ArgError as err:
            die(str(err))
        print_table(result, against)
        return 0
    load_before = os.getloadavg()
    started = time.perf_counter()
    tmp = None
    if args.artifacts is None:
        tmp = tempfile.TemporaryDirectory(prefix="table1_device-")
        work = Path(tmp.name)
    else:
        work = args.artifacts.resolve()
    try:
        results = measure(args, work)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp.name, ignore_errors=True)
    import diffusers
    import peft
    import pytorch_lightning

    from cdm.core.runtime import machine_info

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {
            **machine_info(
                diffusers=diffusers.__version__,
                peft=peft.__version__,
                pytorch_lightning=pytorch_lightning.__version__,
            ),
            "loadavg_before": [round(x, 2) for x in load_before],
        },  # fmt: skip
        "config": config,
        "results": results,
    }
    if against is not None:
        out["compare"] = {"file": str(args.compare), "stages": compare(out, against)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print_table(out, against)
    print(f"wrote {args.out} ({out['wall_s']} s)")
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
