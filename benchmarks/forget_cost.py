"""Wall time to forget one random sample (``cdm-forget``) vs retraining the monolithic paragon.

For the digits experiment with 8 shards (``experiment=digits_8split``) and each SISA slice count S
in ``--slices``, in one fresh temporary artifact store and one process:

1. train, through the library's job runner (``cdm.jobs.run.run_job`` on a config composed with
   Hydra's compose API, as ``cdm-train`` does), the safe backbone (once: its id does not depend on
   S or on the experiment name, so every experiment reuses it), the 8 shard adapters, the paragon
   (one adapter on all private data, the same per-sample schedule: ``optim.epochs_per_slice``
   epochs per slice over the same S slices, same batch size) and the router. Every job is timed
   (wall, around ``run_job``); the paragon's time is the baseline "retrain the monolithic model";
2. forget ``--repeats`` sample ids drawn at random (seeded by ``--seed``; the same ids for every
   S) from the private data, one request each, with ``cdm.lifecycle.forget.run_forget`` (what
   ``cdm-forget`` calls) and ``forget.retrain_router=false``, so what is timed is the adapter
   retrain from the SISA slice checkpoint plus the request's bookkeeping. Each certificate's
   wall time, retrain time, restart checkpoint and sample/step counts are recorded;
3. retrain the router that the forgets left stale, with ``cdm.lifecycle.forget_samples.retrain_routers`` (the
   code ``forget.retrain_router=true`` runs), timed on its own;
4. retrain the now stale paragon (``stage=paragon`` on the private data without the forgotten
   ids): a second measurement of the baseline, this time the real alternative to forgetting.

The ratio paragon time / mean forget time is printed per S next to the paper's 8x (8 shards:
retrain one shard instead of the whole model) and next to the ratios expected from the sample
counts: the certificates' ``samples_saved_factor`` and the expectation over a uniformly random
private sample (``cdm.lifecycle.forget_samples.schedule_cost`` on the stored manifests). Every time is wall
and process CPU time (``time.process_time``, all threads). Training is CPU-sized: the tiny
backbone, ``--epochs-per-slice`` 5, batch 32, a 5-epoch router (shipped: 20); the shards and the
paragon share that schedule. Results go to ``docs/benchmarks/forget_cost-cpu.json``. Run from the
repo root (``--threads 1`` on a shared 2-CPU machine: 2 threads slow down many-fold under load;
docs/benchmarks.md has the numbers of this command):

    HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python benchmarks/forget_cost.py --threads 1 --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import diffusers  # noqa: E402
import peft  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cdm.core.runtime import machine_info  # noqa: E402
from cdm.data.manifest import Manifest  # noqa: E402
from cdm.jobs.config import config_dir, register_resolvers  # noqa: E402
from cdm.jobs.run import run_job  # noqa: E402
from cdm.lifecycle.downstream import retrain_routers, schedule_cost  # noqa: E402
from cdm.lifecycle.forget import run_forget  # noqa: E402
from cdm.store import ArtifactStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "digits_8split"
PAPER_FACTOR = 8.0  # paper Sec. 5 / App. B: retrain 1 of 8 shards instead of the whole model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, nargs="+", default=[1, 2, 4], help="SISA slice counts S")
    p.add_argument("--repeats", type=int, default=3, help="forget requests (one id each) per S")
    p.add_argument("--seed", type=int, default=0, help="draws the forgotten ids")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every job")
    p.add_argument("--backbone", default="tiny", help="conf/backbone preset")
    p.add_argument("--epochs-per-slice", type=int, default=5, help="optim.epochs_per_slice")
    p.add_argument("--batch-size", type=int, default=32, help="optim.batch_size")
    p.add_argument("--pretrain-epochs", type=int, default=5, help="backbone epochs (not timed)")
    p.add_argument("--router-epochs", type=int, default=5, help="router.epochs (shipped: 20)")
    p.add_argument("--no-router", action="store_true", help="skip the router and its retrain")
    p.add_argument(
        "--no-paragon-retrain", action="store_true", help="skip retraining the stale paragon"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary artifact store")
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/forget_cost-cpu.json")
    return p.parse_args()


def overrides(args: argparse.Namespace, n_slices: int | str, root: Path | str) -> list[str]:
    """The Hydra overrides of every job of the experiment with S = ``n_slices``."""
    return [
        f"experiment={EXPERIMENT}",
        f"experiment_name=forgetcost_s{n_slices}",
        f"sharding.n_slices={n_slices}",
        f"backbone={args.backbone}",
        f"threads={args.threads}",
        f"pretrain.epochs={args.pretrain_epochs}",
        f"optim.epochs_per_slice={args.epochs_per_slice}",
        f"optim.batch_size={args.batch_size}",
        f"router.epochs={args.router_epochs}",
        "trainer.enable_progress_bar=false",
        f"paths.artifacts={root}",
    ]


def compose_config(name: str, extra: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` composed with ``extra`` (as the CLI would, without a Hydra run dir)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=extra)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, Any]]:
    """Wall and process CPU time (all threads) of the block, and the load average before it."""
    out: dict[str, Any] = {"loadavg_before": loadavg()}
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out["wall_s"] = round(time.perf_counter() - wall, 3)
    out["cpu_s"] = round(time.process_time() - cpu, 3)


def timed_job(base: list[str], stage: str, index: int = 0) -> dict[str, Any]:
    """Run one ``cdm-train`` job in this process; its wall time and what its card says."""
    cfg = compose_config("train", [*base, f"stage={stage}", f"shard.index={index}"])
    with stopwatch() as timing:
        card = run_job(cfg)
    assert isinstance(card, dict)
    return {
        "job": card.get("name"),
        **timing,
        "card_wall_time_s": card.get("wall_time_s"),
        "n_samples_fed": card.get("n_samples_fed"),
    }


def draw_ids(store: ArtifactStore, experiment: str, k: int, seed: int) -> list[str]:
    """``k`` distinct private ids, seeded (sorted first: the same ids whatever the slicing)."""
    private = Manifest.from_json(store.load_manifest(experiment, "private"))
    return random.Random(seed).sample(sorted(private.ids), k)


def forget_one(base: list[str], sample_id: str) -> dict[str, Any]:
    """Forget one id with ``run_forget`` (router left stale); wall time and the certificate."""
    cfg = compose_config(
        "forget", [*base, f"forget.ids=[{sample_id}]", "forget.retrain_router=false"]
    )
    with stopwatch() as timing:
        cert = run_forget(cfg)
    (retrained,) = [r for r in cert["retrained"] if r.get("action") == "retrained"]
    (sample,) = cert["request"]["samples"]
    cost = cert["cost"]
    start = retrained["restarted_from"]
    return {
        "id": sample_id,
        "shard": sample["shard"],
        "slice": sample["slice"],
        **timing,
        "certificate_wall_time_s": cert["wall_time_s"],
        "retrain_wall_time_s": retrained["wall_time_s"],
        "restarted_from": "scratch"
        if start["kind"] == "scratch"
        else f"slice-{start['slice']:02d}",
        "shard_samples": cert["manifests"][sample["manifest"]]["old_n"],
        "samples_fed": cost["forget_retrain"]["samples_fed"],
        "optimizer_steps": cost["forget_retrain"]["optimizer_steps"],
        "samples_fed_from_scratch": retrained["cost_from_scratch"]["samples_fed"],
        "paragon_samples_fed": cost["paragon_from_scratch"]["samples_fed"],
        "paragon_optimizer_steps": cost["paragon_from_scratch"]["optimizer_steps"],
        "samples_saved_factor": cost.get("samples_saved_factor"),
        "paragon_wall_time_s_when_trained": cost.get("paragon_wall_time_s_when_trained"),
        "routers": [r["action"] for r in cert.get("routers", [])],
        "stale": [r["artifact"] for r in cert.get("stale", [])],
    }


def time_router_retrain(base: list[str], store: ArtifactStore, experiment: str) -> dict:
    """Retrain the routers the forgets left stale, as ``forget.retrain_router=true`` would."""
    cfg = compose_config("forget", base)
    with stopwatch() as timing:
        records = retrain_routers(cfg, store, experiment, retrain=True)
    card = json.loads((store.router_dir(experiment) / "card.json").read_text())
    return {
        **timing,
        "card_wall_time_s": card.get("wall_time_s"),
        "actions": [r["action"] for r in records],
    }


def expected_ratios(store: ArtifactStore, experiment: str, epochs: int, batch: int) -> dict:
    """Paragon cost / forget cost expected for one uniformly random private sample, from the
    stored manifests and ``schedule_cost`` (the certificates' own cost model): the ratio of the
    paragon's cost to the mean forget cost (as the measured wall ratio), in samples fed and in
    optimizer steps; and the 1-slice, equal-shard version of the paper's argument."""
    names = [n for n in store.list_manifests(experiment) if n.startswith("shard-")]
    shards = [Manifest.from_json(store.load_manifest(experiment, n)) for n in names]
    private = Manifest.from_json(store.load_manifest(experiment, "private"))
    n_total = len(private)
    paragon = schedule_cost([b - a for a, b in private.slices], epochs, batch)
    mean = {"samples_fed": 0.0, "optimizer_steps": 0.0}
    for m in shards:
        sizes = [b - a for a, b in m.slices]
        for k, size in enumerate(sizes):
            new = [s - (j == k) for j, s in enumerate(sizes)]
            cost = schedule_cost(new, epochs, batch, start_slice=k)
            for key in mean:
                mean[key] += size / n_total * cost[key]
    return {
        "shard_sizes": [len(m) for m in shards],
        "n_private": n_total,
        "paragon": paragon,
        "mean_forget": {k: round(v, 1) for k, v in mean.items()},
        "ratio_samples": round(paragon["samples_fed"] / mean["samples_fed"], 3),
        "ratio_steps": round(paragon["optimizer_steps"] / mean["optimizer_steps"], 3),
        "ratio_equal_shards_one_slice": float(len(shards)),
    }


def add_schedule(
    store: ArtifactStore, experiment: str, records: list[dict], args: argparse.Namespace
) -> None:
    """Samples fed and optimizer steps of each trained job's SISA schedule (its manifest now)."""
    for r in records:
        name = "private" if r["job"] == "paragon" else r["job"]
        m = Manifest.from_json(store.load_manifest(experiment, name))
        sizes = [b - a for a, b in m.slices]
        r["schedule"] = schedule_cost(sizes, args.epochs_per_slice, args.batch_size)


def fixed_cost_fit(results: dict[str, Any]) -> dict[str, Any]:
    """Least squares ``time = fixed + per_sample * samples fed`` over every shard and paragon
    training job of the run (wall and CPU): the per-job overhead that no shard size removes."""
    jobs = [
        r
        for res in results.values()
        for r in [*res["shards"], res["paragon"], res["paragon_retrain"]]
        if r is not None and "schedule" in r
    ]
    x = [float(r["schedule"]["samples_fed"]) for r in jobs]
    out: dict[str, Any] = {"n_jobs": len(jobs)}
    for key in ("wall_s", "cpu_s"):
        y = [float(r[key]) for r in jobs]
        mx, my = statistics.mean(x), statistics.mean(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
            (a - mx) ** 2 for a in x
        )
        out[key.removesuffix("_s")] = {
            "fixed_s": round(my - slope * mx, 3),
            "per_1000_samples_s": round(1000 * slope, 3),
        }
    return out


def summarize(forgets: list[dict], paragon: dict, paragon_retrain: dict | None) -> dict:
    walls = [f["wall_s"] for f in forgets]
    retrains = [f["retrain_wall_time_s"] for f in forgets]
    mean, mean_fit = statistics.mean(walls), statistics.mean(retrains)
    mean_cpu = statistics.mean(f["cpu_s"] for f in forgets)
    bookkeeping = statistics.mean(f["wall_s"] - f["retrain_wall_time_s"] for f in forgets)
    out: dict[str, Any] = {
        "forget_wall_mean_s": round(mean, 3),
        "forget_wall_min_s": round(min(walls), 3),
        "forget_wall_max_s": round(max(walls), 3),
        "forget_retrain_mean_s": round(mean_fit, 3),
        "forget_outside_retrain_mean_s": round(bookkeeping, 3),
        "ratio_paragon_to_forget": round(paragon["wall_s"] / mean, 3),
        "forget_cpu_mean_s": round(mean_cpu, 3),
        "ratio_paragon_to_forget_cpu": round(paragon["cpu_s"] / mean_cpu, 3),
        "ratio_paragon_fit_to_retrain": round(paragon["card_wall_time_s"] / mean_fit, 3),
        "ratio_samples_certificates": round(
            statistics.mean(f["paragon_samples_fed"] for f in forgets)
            / statistics.mean(f["samples_fed"] for f in forgets),
            3,
        ),
        "ratio_steps_certificates": round(
            statistics.mean(f["paragon_optimizer_steps"] for f in forgets)
            / statistics.mean(f["optimizer_steps"] for f in forgets),
            3,
        ),
    }
    if paragon_retrain is not None:
        out["ratio_paragon_retrain_to_forget"] = round(paragon_retrain["wall_s"] / mean, 3)
    return out


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    store = ArtifactStore(root)
    results: dict[str, Any] = {}
    ids: list[str] | None = None
    for n_slices in args.slices:
        base = overrides(args, n_slices, root)
        experiment = f"forgetcost_s{n_slices}"
        print(f"[bench] S={n_slices}: training {EXPERIMENT} as {experiment}", flush=True)
        backbone = timed_job(base, "backbone")
        shards = [timed_job(base, "shard", k) for k in range(8)]
        paragon = timed_job(base, "paragon")
        router = None if args.no_router else timed_job(base, "router")
        add_schedule(store, experiment, [*shards, paragon], args)
        expected = expected_ratios(store, experiment, args.epochs_per_slice, args.batch_size)
        if ids is None:
            ids = draw_ids(store, experiment, args.repeats, args.seed)
        forgets = []
        for sample_id in ids:
            print(f"[bench] S={n_slices}: forgetting {sample_id}", flush=True)
            forgets.append(forget_one(base, sample_id))
        router_retrain = None if args.no_router else time_router_retrain(base, store, experiment)
        paragon_retrain = None if args.no_paragon_retrain else timed_job(base, "paragon")
        if paragon_retrain is not None:
            add_schedule(store, experiment, [paragon_retrain], args)
        results[str(n_slices)] = {
            "experiment_name": experiment,
            "backbone": backbone,
            "shards": shards,
            "paragon": paragon,
            "router": router,
            "forgets": forgets,
            "router_retrain": router_retrain,
            "paragon_retrain": paragon_retrain,
            "expected": expected,
            "summary": summarize(forgets, paragon, paragon_retrain),
        }
    return results


def print_report(results: dict[str, Any]) -> None:
    head = (
        f"{'S':>2} {'paragon s':>10} {'retrain s':>10} {'forget mean s':>14} {'min':>7} {'max':>7}"
        f" {'fit s':>7} {'router s':>9} {'ratio':>6} {'ratio2':>7} {'cpu r':>6} {'fit r':>6}"
        f" {'cert samples':>13} {'exp samples':>12} {'exp steps':>10} {'paper':>6}"
    )
    print(head)
    for n_slices, r in results.items():
        s, e = r["summary"], r["expected"]
        retrain = r["paragon_retrain"]["wall_s"] if r["paragon_retrain"] else float("nan")
        router = r["router_retrain"]["wall_s"] if r["router_retrain"] else float("nan")
        print(
            f"{n_slices:>2} {r['paragon']['wall_s']:>10.2f} {retrain:>10.2f}"
            f" {s['forget_wall_mean_s']:>14.2f} {s['forget_wall_min_s']:>7.2f}"
            f" {s['forget_wall_max_s']:>7.2f} {s['forget_retrain_mean_s']:>7.2f} {router:>9.2f}"
            f" {s['ratio_paragon_to_forget']:>6.2f}"
            f" {s.get('ratio_paragon_retrain_to_forget', float('nan')):>7.2f}"
            f" {s['ratio_paragon_to_forget_cpu']:>6.2f}"
            f" {s['ratio_paragon_fit_to_retrain']:>6.2f} {s['ratio_samples_certificates']:>13.2f}"
            f" {e['ratio_samples']:>12.2f} {e['ratio_steps']:>10.2f} {PAPER_FACTOR:>6.1f}"
        )
    legend = (
        "paragon s: training the paragon (wall, run_job); retrain s: retraining it (stale) after "
        "the forgets",
        "forget: run_forget wall per request (router left stale); fit s: the certificates' shard "
        "retrain time; router s: retraining the stale router",
        "ratio = paragon / forget mean; ratio2 = paragon retrain / forget mean; cpu r = paragon / "
        "forget mean in process CPU time; fit r = paragon card fit time / fit s",
        "cert samples: paragon samples fed / forget samples fed (certificates); exp samples, "
        "exp steps: expected for a uniformly random private sample; paper: 8 shards",
    )
    print("\n".join(legend))
    for n_slices, r in results.items():
        for f in r["forgets"]:
            print(
                f"  S={n_slices} {f['id']} shard {f['shard']} slice {f['slice']} "
                f"({f['restarted_from']}): {f['wall_s']:.2f} s (retrain {f['retrain_wall_time_s']:.2f}"
                f" s), {f['samples_fed']} samples fed vs paragon {f['paragon_samples_fed']}"
            )


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    register_resolvers()
    load_before = loadavg()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="cdm-forget-cost-"))
    try:
        results = measure(args, root)
    finally:
        if args.keep:
            print(f"[bench] artifact store kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    fit = fixed_cost_fit(results)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config["experiment"] = EXPERIMENT
    config["overrides"] = overrides(args, "{S}", "<temporary dir>")
    versions = {
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "pytorch_lightning": pl.__version__,
    }
    out = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {**machine_info(**versions), "loadavg_before": load_before},
        "config": config,
        "paper_factor": PAPER_FACTOR,
        "results": results,
        "fixed_cost_fit": fit,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print_report(results)
    for key, what in (("wall", "wall"), ("cpu", "CPU")):
        f = fit[key]
        print(
            f"{what} time of a training job ~ {f['fixed_s']:.2f} s + {f['per_1000_samples_s']:.2f} s"
            f" per 1000 samples fed (least squares over {fit['n_jobs']} shard/paragon jobs)"
        )
    print(f"[bench] wrote {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
