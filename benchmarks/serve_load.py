"""Load on ``cdm-serve``'s HTTP service: C clients x R requests on loopback.

Builds a tiny ``digits_2split`` store (``debug=tiny``: backbone and 2 shard adapters) in a
temporary folder (or uses ``--store``), creates a user with ``cdm-serve add-user``'s library call,
starts ``cdm-serve`` as its own process on a free 127.0.0.1 port, sends one warm-up request, then
runs ``--clients`` threads, each with its own HTTP client (httpx) sending ``--requests`` requests
(one after the other; all clients at once). Prints and writes p50/p99/mean latency, requests/s,
failures (any answer but 200, or a transport error) and the audit lines the load added (must
equal the requests). Times are wall, measured by the clients. Run from the repo root:

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
    from cdm.lifecycle.serving import read_audit

    return 0 if audit is None else len(read_audit(audit))


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
                start = time.perf_counter()
                try:
                    response = http.post(url + "/sample", json={**body, "seed": i})
                    ok, why = response.status_code == 200, f"{response.status_code} {response.text[:200]}"  # fmt: skip
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                with lock:
                    latencies.append(1000 * (time.perf_counter() - start))
                    if not ok:
                        failures.append(why)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(latencies), "failures": len(failures),
        "failure_examples": failures[:3], "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
        "audit_lines": count_audit(audit) - before if audit is not None else None,
    }  # fmt: skip


def build_store(root: Path) -> None:
    """The tiny store: backbone and 2 shard adapters of digits_2split (cdm.jobs.run.run_job)."""
    from hydra import compose, initialize_config_module

    from cdm.jobs.config import register_resolvers
    from cdm.jobs.run import run_job

    register_resolvers()
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        for stage in (["stage=backbone"], ["stage=shard", "shard.index=0"], ["stage=shard", "shard.index=1"]):  # fmt: skip
            run_job(compose(config_name="train", overrides=[*TINY, *stage, f"paths.artifacts={root}"]))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--composition", default="average")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--batch", type=int, default=8, help="serve.batch.max_size")
    parser.add_argument("--store", type=Path, default=None, help="an existing tiny store")
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/serve_load-cpu.json")
    args = parser.parse_args()
    from cdm.lifecycle.serving import add_user, audit_path

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdm-serve-load-") as tmp:
        root = Path(tmp)
        store = args.store or root / "artifacts"
        if args.store is None:
            build_store(store)
        policy = root / "policy.yaml"
        token = add_user(policy, "load", ["*"])
        serve_args = [
            *TINY, f"serve.policy={policy}", f"paths.artifacts={store}",
            f"threads={args.threads}", f"serve.batch.max_size={args.batch}",
            f"serve.limits.compositions=[{args.composition}]", "serve.limits.samplers=[ddim]",
            f"hydra.run.dir={root}/hydra",
        ]  # fmt: skip
        body = {"composition": args.composition, "steps": args.steps, "num_samples": args.num_samples}  # fmt: skip
        with running_service(serve_args, root / "server.log") as url:
            warm = httpx.post(url + "/sample", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=300)  # fmt: skip
            assert warm.status_code == 200, warm.text
            result = run_load(url, token, clients=args.clients, requests=args.requests, body=body,
                              audit=audit_path(store))  # fmt: skip
    record = {
        "command": " ".join(["HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python", *sys.argv]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
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
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    if result["failures"] or result["audit_lines"] != result["requests"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
