"""cdm-serve as an HTTP service: a real server process on loopback, a real HTTP client (httpx).

Identity from bearer tokens (401), the policy (403), malformed and oversized requests (4xx, the
server stays up, fuzzed), PNG and npz answers equal to one-shot sampling, batched groups that
never mix shard sets, a disallowed adapter never read, and one audit line per request.
"""

from __future__ import annotations

import io
import json
import random
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serve_load import (
    baseline_ratios,
    in_process_worker,
    run_load,
    run_paired,
    running_service,
)
from cdm.lifecycle.serving import (
    PolicyError,
    add_user,
    audit_path,
    authenticate,
)
from cdm.store import ArtifactStore
from cdm.store.io import append_json_line as append_audit
from cdm.store.io import read_json_lines as read_audit
from cdm.store.io import rotated_logs
from tests.test_serving import REPO, TINY, request, store_root  # noqa: F401 (the tiny store)

SERVED = [
    "serve.limits.samplers=[ddim,ddpm]", "serve.limits.compositions=[average,classifier]",
    "serve.limits.max_samples=8", "serve.limits.max_steps=8", "serve.limits.max_body_bytes=512",
    "serve.batch.max_size=4", "serve.batch.timeout=0.3", "steps=4", "num_samples=4",
    "batch_size=8", "progress=false",
]  # fmt: skip


@dataclass
class Service:
    """The running server: its URL, the users' tokens, and how many requests the tests sent."""

    url: str
    tokens: dict[str, str]
    audit: Path
    first_line: int  # audit lines before the tests' first request
    sent: int = 0
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=120))

    def post(self, body: object = None, user: str | None = None, *, raw: bytes | None = None,
             headers: dict | None = None) -> httpx.Response:  # fmt: skip
        """POST /sample as ``user`` (their bearer token) with a JSON ``body`` or ``raw`` bytes."""
        headers = dict(headers or {})
        if user is not None:
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
        content = raw if raw is not None else json.dumps(body).encode()
        self.sent += 1
        return self.client.post(self.url + "/sample", content=content, headers=headers)


@pytest.fixture(scope="module")
def service(store_root, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("service")
    policy = root / "policy.yaml"
    tokens = {
        "alice": add_user(policy, "alice", ["shard-01"]),
        "bob": add_user(policy, "bob", ["*"]),
    }
    args = [*TINY, *SERVED, f"serve.policy={policy}", f"paths.artifacts={store_root}",
            f"hydra.run.dir={root}/hydra"]  # fmt: skip
    with running_service(args, root / "server.log") as url:
        audit = audit_path(store_root)
        yield Service(url, tokens, audit, first_line=len(read_audit(audit)))


def npz(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    with np.load(io.BytesIO(response.content)) as data:
        return dict(data)


def detail(response: httpx.Response) -> str:
    text = response.json()["detail"]
    assert isinstance(text, str) and "\n" not in text
    return text


def test_png_and_npz_answers_equal_one_shot_sampling(service, store_root, tmp_path):  # noqa: F811
    png = service.post({"composition": "average", "num_samples": 3}, "bob")
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.headers["x-cdm-shards"] == "0,1"
    answer = npz(service.post({"composition": "average", "format": "npz"}, "alice"))
    assert answer["images"].shape == (4, 1, 8, 8) and answer["images"].dtype == np.uint8
    assert answer["shards"].tolist() == [1] and answer["weights"].shape == (4, 4, 1)
    # the same request through the one-shot path (cdm-sample's seeding) draws the same images
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"users": {"alice": ["shard-01"]}}))
    card = request(store_root, policy, "alice", None, "composition=average", "num_samples=4",
                   "steps=4", "name=http-vs-once")  # fmt: skip
    service.sent += 1  # the one-shot request is audited in the same log
    with np.load(Path(card["path"]) / "samples.npz") as stored:
        np.testing.assert_array_equal(answer["images"], stored["images"])


def test_a_missing_or_wrong_token_is_401(service):
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {service.tokens['bob']}"}):  # fmt: skip
        response = service.post({"composition": "average"}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in detail(response)
    # a user field is not an identity: it is an unknown field, even with a valid token
    response = service.post({"user": "bob"}, "alice")
    assert response.status_code == 400 and "unknown field(s) ['user']" in detail(response)


def test_disallowed_sources_and_the_joint_router_are_403(service):
    response = service.post({"sources": ["shard-00"], "composition": "average"}, "alice")
    assert response.status_code == 403
    assert "may not use ['shard-00']" in detail(response) and "may use ['shard-01']" in detail(response)  # fmt: skip
    response = service.post({"composition": "classifier"}, "alice")
    assert response.status_code == 403
    assert "router=compartmental" in detail(response) and "composition=knn" in detail(response)
    assert service.post({"composition": "classifier", "steps": 2}, "bob").status_code == 200


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"steps": 1000}, 422, "serve.limits.max_steps"),
        ({"num_samples": 9}, 422, "serve.limits.max_samples"),
        ({"num_samples": 0}, 422, "num_samples=0"),
        ({"sampler": "dpm++"}, 422, "serve.limits.samplers"),
        ({"composition": "paragon"}, 422, "serve.limits.compositions"),
        ({"format": "gif"}, 422, "format"),
        ({"seed": -1}, 422, "seed"),
        ({"steps": "4"}, 400, "steps must be an integer"),
        ({"steps": True}, 400, "steps must be an integer"),
        ({"sources": "shard-01"}, 400, "sources must be"),
        ({"sources": ["shard-07"]}, 400, "unknown shards/sources ['shard-07']"),
        ({"experiment": "digits_4split"}, 404, "serves 'digits_2split'"),
        ([1, 2], 400, "JSON object"),
        ({"prompt": "x"}, 400, "unknown field(s) ['prompt']"),
    ],
)
def test_malformed_and_over_limit_requests_are_4xx(service, body, status, reason):
    response = service.post(body, "alice")
    assert response.status_code == status and reason in detail(response)


def test_oversized_and_non_json_bodies_and_other_routes(service):
    response = service.post(raw=b'{"seed": 1' + b" " * 600 + b"}", user="alice")
    assert response.status_code == 413 and "serve.limits.max_body_bytes" in detail(response)
    response = service.post(raw=b"\xff\xfe{", user="alice")
    assert response.status_code == 400 and "not JSON" in detail(response)
    service.sent += 2
    assert service.client.get(service.url + "/sample").status_code == 405
    assert service.client.post(service.url + "/info").status_code == 404


def bad_request(rng: random.Random) -> tuple[bytes, dict]:
    """One malformed request: broken JSON, wrong types, unknown fields, values over limits."""
    junk = [None, True, -3, 2**40, 1.5, "", "x" * 50, [], {}, ["shard-00", 3.5], {"a": 1}]
    kind = rng.randrange(5)
    if kind == 0:  # broken bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))), {}
    if kind == 1:  # a JSON value that is not an object
        return json.dumps(rng.choice([j for j in junk if not isinstance(j, dict)])).encode(), {}
    if kind == 2:  # an unknown field
        return json.dumps({rng.choice(["user", "token", "shards", "Steps", ""]): rng.choice(junk)}).encode(), {}  # fmt: skip
    field_ = rng.choice(["steps", "num_samples", "seed", "sampler", "composition", "format", "sources", "experiment"])  # fmt: skip
    body = {field_: rng.choice(junk)}
    headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}  # fmt: skip
    return json.dumps(body).encode(), headers if kind == 3 else {}


def test_a_fuzz_pass_of_malformed_requests_leaves_the_server_up(service):
    rng = random.Random(12)
    statuses = []
    for _ in range(150):
        raw, headers = bad_request(rng)
        response = service.post(raw=raw, user=rng.choice(["alice", "bob"]), headers=headers)
        statuses.append(response.status_code)
        assert 400 <= response.status_code < 500, (raw, response.text)
        detail(response)
    assert {400, 422} <= set(statuses)
    good = service.post({"composition": "average", "steps": 2, "num_samples": 1}, "alice")
    assert good.status_code == 200, good.text


def test_concurrent_requests_share_a_forward_only_within_a_shard_set(service):
    # 4 requests of one group (shards [1], average, ddim, 4 steps: alice and bob alike) and 2
    # of another (bob, shards [0, 1]); each answer is what its request gets alone
    jobs = [("alice", {"seed": s}) for s in (10, 11)] + [("bob", {"sources": ["shard-01"], "seed": s}) for s in (12, 13)]  # fmt: skip
    jobs += [("bob", {"seed": s}) for s in (14, 15)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: service.post({"composition": "average", "format": "npz", **j[1]}, j[0]), jobs))  # fmt: skip
    batches = [int(a.headers["x-cdm-batch"]) for a in answers]
    assert max(batches) > 1, f"no batched forward: {batches}"
    for (user, body), answer in zip(jobs, answers, strict=True):
        shards = [1] if user == "alice" or "sources" in body else [0, 1]
        assert answer.headers["x-cdm-shards"] == ",".join(map(str, shards))
        batched = npz(answer)
        assert batched["shards"].tolist() == shards
        alone = npz(service.post({"composition": "average", "format": "npz", **body}, user))
        diff = np.abs(batched["images"].astype(int) - alone["images"].astype(int))
        assert diff.max() <= 1  # a bigger batch may round the last float bit otherwise


def test_a_disallowed_adapter_is_never_read_over_http(service, store_root):  # noqa: F811
    # shard-00's weights are corrupted: alice (shard-01) is served; bob (all) hits the check.
    # ddpm: no pipeline of this (shards, composition, sampler) is cached yet
    path = ArtifactStore(store_root).adapter_dir("digits_2split", "shard-00") / "adapter_model.safetensors"  # fmt: skip
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\x00" * 8)
    try:
        body = {"composition": "average", "sampler": "ddpm", "steps": 2}
        assert service.post(body, "alice").status_code == 200
        broken = service.post(body, "bob")
        assert broken.status_code == 500 and "corrupt" in detail(broken).lower()
    finally:
        path.write_bytes(original)
    assert service.post({"composition": "average", "steps": 2}, "bob").status_code == 200


def test_every_request_has_one_audit_line(service):
    """One line per request, in order, refusals included (runs alone or after the others)."""
    start = len(read_audit(service.audit))
    statuses = [
        service.post({"composition": "average", "steps": 2}, "bob").status_code,
        service.post({"composition": "average"}).status_code,
        service.post({"sources": ["shard-00"], "composition": "average"}, "alice").status_code,
        service.post({"steps": "4"}, "alice").status_code,
        service.post({"steps": 1000}, "alice").status_code,
        service.post({"experiment": "digits_4split"}, "alice").status_code,
        service.post(raw=b'{"seed": 1' + b" " * 600 + b"}", user="alice").status_code,
        service.client.get(service.url + "/sample").status_code,
        service.client.post(service.url + "/info").status_code,
    ]
    assert statuses == [200, 401, 403, 400, 422, 404, 413, 405, 404]
    lines = read_audit(service.audit)[start:]
    assert [r["status"] for r in lines] == statuses
    assert [r["user"] for r in lines[:3]] == ["bob", "anonymous", "alice"]
    assert all(isinstance(r["status"], int) and r["latency_ms"] >= 0 for r in lines)
    assert lines[0]["decision"] == "granted" and lines[0]["shards"]
    assert all(r["decision"] == "refused" and r["error"] for r in lines[1:])


def test_add_user_stores_only_a_digest_and_the_token_authenticates(tmp_path, capsys, monkeypatch):
    from cdm.cli.serve import main

    policy = tmp_path / "policy.json"
    monkeypatch.setattr(sys, "argv", ["cdm-serve", "add-user", "carol", f"serve.policy={policy}",
                                      "serve.sources=[shard-00]", f"hydra.run.dir={tmp_path}/h"])  # fmt: skip
    main()
    token = capsys.readouterr().out.strip().splitlines()[-1]
    stored = json.loads(policy.read_text())
    assert stored["users"] == {"carol": ["shard-00"]} and token not in policy.read_text()
    assert stored["tokens"]["carol"].startswith("sha256:")
    assert authenticate(f"Bearer {token}", policy) == "carol"
    assert authenticate(f"bearer  {token} ", policy) == "carol"
    for header in (None, "", "Bearer", f"Bearer {token}x", f"Token {token}"):
        assert authenticate(header, policy) is None
    again = add_user(policy, "carol")  # a new token; the old one stops working
    assert authenticate(f"Bearer {token}", policy) is None
    assert authenticate(f"Bearer {again}", policy) == "carol"
    assert json.loads(policy.read_text())["users"]["carol"] == ["shard-00"]
    with pytest.raises(PolicyError, match="new user needs the shards"):
        add_user(policy, "dave")
    policy.write_text(json.dumps({"users": {"erin": ["*"]}, "tokens": {"erin": "plaintext"}}))
    with pytest.raises(PolicyError, match="sha256:<64 hex>"):
        authenticate("Bearer plaintext", policy)


def test_the_service_refuses_one_shot_settings(tmp_path, capsys, monkeypatch):
    from cdm.cli.serve import main

    monkeypatch.setattr(sys, "argv", ["cdm-serve", *TINY, "serve.user=alice", f"serve.policy={tmp_path}/p.yaml",
                                      f"hydra.run.dir={tmp_path}/h"])  # fmt: skip
    with pytest.raises(SystemExit) as end:
        main()
    assert end.value.code == 2 and "serve.once=true" in capsys.readouterr().err


def write_lines(path: Path, worker: int, n: int) -> None:
    for i in range(n):
        append_audit(path, {"worker": worker, "i": i, "pad": "x" * 40}, max_bytes=1500)


def test_audit_rotation_under_concurrent_writers_loses_no_line(tmp_path):
    path = tmp_path / "audit" / "serve.jsonl"
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(write_lines, [path] * 4, range(4), [60] * 4))
    records = read_audit(path)
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(60)]  # fmt: skip
    parts = rotated_logs(path)
    assert len(parts) >= 5 and all(p.stat().st_size <= 1500 for p in [*parts, path])
    for w in range(4):  # each writer's lines stay in its order across the parts
        assert [r["i"] for r in records if r["worker"] == w] == list(range(60))


@pytest.mark.slow
def test_serve_load_benchmark_small(service, tmp_path):
    result = run_load(service.url, service.tokens["bob"], clients=4, requests=5, audit=service.audit,
                      body={"composition": "average", "steps": 2, "num_samples": 2})  # fmt: skip
    service.sent += 20
    assert result["failures"] == 0 and result["requests"] == 20
    assert result["audit_lines"] == 20 and result["p99_ms"] >= result["p50_ms"] > 0


def test_serve_load_in_process_floor_answers_the_http_request(service, store_root):  # noqa: F811
    # the benchmark's no-HTTP baseline runs the worker's code on the same request: same images
    body = {"composition": "average", "steps": 2, "num_samples": 2, "format": "npz"}
    overrides = [*TINY, *SERVED, "serve.policy=unused.yaml", f"paths.artifacts={store_root}"]
    api, request = in_process_worker(overrides, body)
    assert request["shards"] == [0, 1] and request["sampler"] == "ddim"
    over_http = npz(service.post({**body, "seed": 3}, "bob"))
    with np.load(io.BytesIO(bytes(api.predict({**request, "seed": 3}).body))) as floor:
        np.testing.assert_array_equal(floor["images"], over_http["images"])
        np.testing.assert_array_equal(floor["weights"], over_http["weights"])
    lone, floor = run_paired(service.url, service.tokens["bob"], api, request, clients=2,
                             requests=2, body=body, audit=service.audit)  # fmt: skip
    service.sent += 4
    assert lone["requests"] == lone["audit_lines"] == 4 and lone["failures"] == 0
    assert (
        floor["requests"] == 4 and floor["failures"] == 0 and floor["p99_ms"] >= floor["p50_ms"] > 0
    )
    http = {"requests_per_s": 10.0, "p50_ms": 2 * floor["p50_ms"]}
    ratios = baseline_ratios(http, {"requests_per_s": 5.0, "p50_ms": floor["p50_ms"]}, http, floor)
    assert ratios["requests_per_s_batched_over_unbatched"] == 2.0
    assert ratios["p50_batched_over_unbatched"] == ratios["p50_http_lone_over_in_process"] == 2.0
    assert ratios["http_overhead_ms_p50"] == floor["p50_ms"]


def test_the_worker_caches_a_bounded_number_of_pipelines(store_root):  # noqa: F811
    from hydra import compose, initialize_config_module

    from cdm.jobs.config import register_resolvers
    from cdm.lifecycle.service_worker import CDMServiceAPI

    register_resolvers()
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        cfg = compose(config_name="serve", overrides=[*TINY, *SERVED, "serve.policy=p.yaml",
                                                      f"paths.artifacts={store_root}"])  # fmt: skip
    api = CDMServiceAPI({("average", "ddim"): cfg}, cache_size=1, max_batch_size=4)
    api.setup("cpu")
    base = {"experiment": "digits_2split", "composition": "average", "sampler": "ddim",
            "steps": 2, "num_samples": 2, "seed": 0, "format": "npz", "user": "bob"}  # fmt: skip
    one, both = {**base, "shards": [1]}, {**base, "shards": [0, 1]}
    answers = api.predict([one, both, {**one, "seed": 1}])
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-cdm-batch"] for a in answers] == ["2", "1", "2"]
    assert [a.headers["x-cdm-shards"] for a in answers] == ["1", "0,1", "1"]
    assert api.loads == 2 and list(api.pipelines) == [((0, 1), "average", "ddim")]
    api.predict([both])
    assert api.loads == 2  # cached
    api.predict([one])
    assert api.loads == 3 and len(api.pipelines) == 1  # evicted by the bound, built again
