"""Load on ``cdm-serve``'s HTTP service: C clients x R requests on loopback, against baselines.

Builds a tiny ``digits_2split`` store (``debug=tiny``: backbone and 2 shard adapters) in a
temporary folder (or uses ``--store``), creates a user with ``cdm-serve add-user``'s library call,
starts ``cdm-serve`` as its own process on a free 127.0.0.1 port, sends one warm-up request, then
runs ``--clients`` threads, each with its own HTTP client (httpx) sending ``--requests`` requests
(one after the other; all clients at once), then one client alone. Prints and writes p50/p99/mean
latency, requests/s, failures (any answer but 200, or a transport error) and the audit lines the
load added (must equal the requests). Times are wall, measured by the clients.

Baselines, same run, same store and request body:

- ``unbatched``: the same loads on a second server with ``serve.batch.max_size=1`` (no batching
  across requests); ratios batched / unbatched of requests/s and p50.
- ``in_process``: the floor: the same C x R requests answered one after the other in this
  process by the worker's own code (``CDMServiceAPI.predict``: the cached ``CDMPipeline``, x_T
  from the seed, the PNG), with no HTTP, token, policy, audit or LitServe queue. It alternates
  request by request with one HTTP client alone on the unbatched server (``lone_client``), so
  background load hits both alike; their p50 ratio is the per-request service overhead.

Run from the repo root:

    HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=digits_2split", "debug=tiny"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(args: list[str], log: Path, timeout: float = 300) -> Iterator[str]:
    """Start ``cdm-serve args`` (its own process group) on a free port; yield its URL once
    ``/health`` answers; end the group (LitServe's workers included) on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cdm.cli.serve", *args, f"serve.port={port}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cdm-serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")  # fmt: skip
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).text == "ok":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cdm-serve did not start in {timeout} s:\n{log.read_text()[-4000:]}")  # fmt: skip
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def count_audit(audit: Path | None) -> int:
    from cdm.store.io import read_json_lines

    return 0 if audit is None else len(read_json_lines(audit))


def latency_stats(latencies: list[float], failures: list[str], wall: float, clients: int) -> dict:
    """Percentiles (ms), rate and failures of one load: the fields every run reports."""
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(ordered), "failures": len(failures),
        "failure_examples": failures[:3], "wall_s": round(wall, 3),
        "requests_per_s": round(len(ordered) / wall, 2),
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }  # fmt: skip


def post(http: httpx.Client, url: str, body: dict, seed: int) -> tuple[float, str | None]:
    """One POST /sample: its latency (ms) and why it failed (None: answered 200)."""
    start = time.perf_counter()
    try:
        response = http.post(url + "/sample", json={**body, "seed": seed})
        why = None if response.status_code == 200 else f"{response.status_code} {response.text[:200]}"  # fmt: skip
    except httpx.HTTPError as e:
        why = repr(e)
    return 1000 * (time.perf_counter() - start), why


def run_load(
    url: str, token: str, *, clients: int, requests: int, body: dict, audit: Path | None = None
) -> dict:
    """``clients`` threads x ``requests`` POST /sample each; latency percentiles, rate, failures."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    before = count_audit(audit)

    def client() -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {token}"}) as http:
            for i in range(requests):
                ms, why = post(http, url, body, seed=i)
                with lock:
                    latencies.append(ms)
                    failures.extend([why] if why else [])

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = latency_stats(latencies, failures, time.perf_counter() - started, clients)
    return result | {"audit_lines": count_audit(audit) - before if audit is not None else None}


def in_process_worker(overrides: list[str], body: dict) -> tuple[Any, dict]:
    """The service's worker (``CDMServiceAPI``, set up in this process) and ``body`` as the gate
    admits it (defaults filled in, every shard of the experiment): the floor's path, no HTTP."""
    from hydra import compose, initialize_config_module

    from cdm.jobs.config import register_resolvers
    from cdm.lifecycle.service import parse_request, settings_from_config, variant_configs
    from cdm.lifecycle.service_worker import CDMServiceAPI
    from cdm.lifecycle.serving import resolve_sources
    from cdm.store import ArtifactStore

    register_resolvers()
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        cfg = compose(config_name="serve", overrides=overrides)
        configs = variant_configs(cfg, overrides)
    settings = settings_from_config(cfg, configs)
    request = parse_request(json.dumps(body).encode(), settings)
    shards = resolve_sources(ArtifactStore(settings.artifacts), settings.experiment, ["*"])
    api = CDMServiceAPI(configs, cache_size=int(cfg.serve.cache_size), max_batch_size=1)
    api.setup("cpu")
    return api, {**request, "user": "in-process", "shards": shards}


def predict(api: Any, request: dict, seed: int) -> tuple[float, str | None]:
    """One request answered in this process by the worker's code: latency (ms), failure."""
    start = time.perf_counter()
    response = api.predict({**request, "seed": seed})
    why = None if response.status_code == 200 else f"{response.status_code} {bytes(response.body)[:200]!r}"  # fmt: skip
    return 1000 * (time.perf_counter() - start), why


def run_paired(
    url: str, token: str, api: Any, request: dict, *, clients: int, requests: int, body: dict,
    audit: Path | None = None,
) -> tuple[dict, dict]:  # fmt: skip
    """One client alone over HTTP and the floor (``api.predict`` in this process) on the
    ``clients`` x ``requests`` requests of ``run_load`` (same seeds), alternately request by
    request, so that the machine's changing load hits both alike. Rates: 1 / mean latency."""
    runs: dict[str, tuple[list[float], list[str]]] = {"http": ([], []), "floor": ([], [])}
    before = count_audit(audit)
    with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(clients):
            for i in range(requests):
                for name, (ms, why) in (("http", post(http, url, body, i)), ("floor", predict(api, request, i))):  # fmt: skip
                    runs[name][0].append(ms)
                    runs[name][1].extend([why] if why else [])
    lone, floor = (latency_stats(*runs[n], sum(runs[n][0]) / 1000, clients=1) for n in ("http", "floor"))  # fmt: skip
    return lone | {"audit_lines": count_audit(audit) - before if audit is not None else None}, floor


def ratio(a: float, b: float) -> float | None:
    """``a / b`` to 2 decimals (None where ``b`` is 0)."""
    return round(a / b, 2) if b else None


def baseline_ratios(batched: dict, unbatched: dict, lone: dict, in_process: dict) -> dict:
    """The ratios the docs quote: batching (batched / unbatched, C clients at once) and the
    service's per-request overhead (``lone``: one client on the unbatched server, vs the floor)."""
    return {
        "requests_per_s_batched_over_unbatched": ratio(
            batched["requests_per_s"], unbatched["requests_per_s"]
        ),  # fmt: skip
        "p50_batched_over_unbatched": ratio(batched["p50_ms"], unbatched["p50_ms"]),
        "p50_http_lone_over_in_process": ratio(lone["p50_ms"], in_process["p50_ms"]),
        "http_overhead_ms_p50": round(lone["p50_ms"] - in_process["p50_ms"], 1),
        "requests_per_s_in_process_over_unbatched": ratio(
            in_process["requests_per_s"], unbatched["requests_per_s"]
        ),  # fmt: skip
        "requests_per_s_batched_over_in_process": ratio(
            batched["requests_per_s"], in_process["requests_per_s"]
        ),  # fmt: skip
    }


def build_store(root: Path) -> None:
    """The tiny store: backbone and 2 shard adapters of digits_2split (cdm.jobs.run.run_job)."""
    from hydra import compose, initialize_config_module

    from cdm.jobs.config import register_resolvers
    from cdm.jobs.run import run_job

    register_resolvers()
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        for stage in (["stage=backbone"], ["stage=shard", "shard.index=0"], ["stage=shard", "shard.index=1"]):  # fmt: skip
            run_job(compose(config_name="train", overrides=[*TINY, *stage, f"paths.artifacts={root}"]))  # fmt: skip


def serve_loads(
    args: list[str], log: Path, token: str, body: dict, audit: Path, clients: int, requests: int,
    floor: tuple[Any, dict] | None = None,
) -> dict[str, dict]:  # fmt: skip
    """Start ``cdm-serve args``, warm it up, run the C x R load, then one client alone (paired
    with the in-process ``floor`` (api, request), if given)."""
    with running_service(args, log) as url:
        warm = httpx.post(url + "/sample", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300)  # fmt: skip
        assert warm.status_code == 200, warm.text
        runs = {"load": run_load(url, token, clients=clients, requests=requests, body=body, audit=audit)}  # fmt: skip
        if floor is None:
            runs["lone"] = run_load(url, token, clients=1, requests=requests, body=body, audit=audit)  # fmt: skip
        else:
            runs["lone"], runs["floor"] = run_paired(
                url, token, *floor, clients=clients, requests=requests, body=body, audit=audit
            )  # fmt: skip
    return runs


def failed(run: dict) -> bool:
    """A run with a failed request, or (HTTP) audit lines unequal to its requests."""
    return bool(run["failures"]) or run.get("audit_lines", run["requests"]) != run["requests"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--composition", default="average")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--batch", type=int, default=8, help="serve.batch.max_size (baseline: 1)")
    parser.add_argument("--store", type=Path, default=None, help="an existing tiny store")
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/serve_load-cpu.json")
    args = parser.parse_args()
    from cdm.lifecycle.serving import add_user, audit_path

    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="cdm-serve-load-") as tmp:
        root = Path(tmp)
        store = args.store or root / "artifacts"
        if args.store is None:
            build_store(store)
        policy = root / "policy.yaml"
        token = add_user(policy, "load", ["*"])
        common = [
            *TINY, f"serve.policy={policy}", f"paths.artifacts={store}", f"threads={args.threads}",
            f"serve.limits.compositions=[{args.composition}]", "serve.limits.samplers=[ddim]",
        ]  # fmt: skip
        body = {"composition": args.composition, "steps": args.steps, "num_samples": args.num_samples}  # fmt: skip
        api, request = in_process_worker([*common, "serve.batch.max_size=1"], body)
        assert api.predict(request).status_code == 200  # warm-up: the pipeline is built
        batched = serve_loads(
            [*common, f"serve.batch.max_size={args.batch}", f"hydra.run.dir={root}/hydra-batched"],
            root / "server-batched.log", token, body, audit_path(store), args.clients, args.requests,
        )  # fmt: skip
        unbatched = serve_loads(
            [*common, "serve.batch.max_size=1", f"hydra.run.dir={root}/hydra-unbatched"],
            root / "server-unbatched.log", token, body, audit_path(store), args.clients,
            args.requests, floor=(api, request),
        )  # fmt: skip
    runs = {**{f"batched_{k}": v for k, v in batched.items()}, **{f"unbatched_{k}": v for k, v in unbatched.items()}}  # fmt: skip
    result = runs["batched_load"]
    floor = {"path": "CDMServiceAPI.predict in this process, sequential, alternating with lone_client.unbatched: no HTTP, token, policy, audit or queue"}  # fmt: skip
    baselines = {
        "unbatched": {"serve_batch_max_size": 1, **runs["unbatched_load"]},
        "in_process": floor | runs["unbatched_floor"],
        "lone_client": {"batched": runs["batched_lone"], "unbatched": runs["unbatched_lone"]},
        "ratios": baseline_ratios(
            result, runs["unbatched_load"], runs["unbatched_lone"], runs["unbatched_floor"]
        ),  # fmt: skip
    }
    record = {
        "command": " ".join(["HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python", *sys.argv]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_1_5_15_start": load_start,
            "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
        "config": {
            **vars(args),
            "store": str(args.store),
            "out": os.path.relpath(args.out, REPO),
            "body": body,
            "experiment": "digits_2split debug=tiny",
            "sampler": "ddim",
            "format": "png",
        },  # fmt: skip
        "results": result,
        "baselines": baselines,
    }
    print(json.dumps({"results": result, "baselines": baselines}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if any(failed(run) for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
