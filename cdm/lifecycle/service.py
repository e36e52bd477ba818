"""``cdm-serve`` as an HTTP service on LitServe: identity from a bearer token, only allowed shards.

    POST /sample   Authorization: Bearer <token>   (cdm-serve add-user NAME prints one)
    {"sources": ["shard-00"], "composition": "average", "sampler": "ddim", "steps": 25,
     "num_samples": 8, "seed": 0, "format": "png"}          -> image/png (or npz bytes)
    text models also take "prompts": ["two red 7s on the left", ...] (cycled over the samples)

Every field is optional (``experiment`` must be the served one). A gate in front of LitServe
(``ServiceGate``, an ASGI middleware in the API process) answers 401/403/4xx with a one-line
``{"detail": ...}`` and writes one audit line per request (``cdm.store.io.append_json_line``)
before its response leaves. Admitted requests reach the inference worker (``CDMServiceAPI``) with
the shards the policy grants; requests of one batch with the same (shards, composition,
sampler, steps) are composed in one batched forward (``cdm.lifecycle.service_worker``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import litserve as ls
from omegaconf import DictConfig, OmegaConf

from cdm.lifecycle.service_worker import FORMATS, CDMServiceAPI
from cdm.lifecycle.serving import (
    AccessDenied,
    PolicyError,
    audit_path,
    authenticate,
    grant_shards,
    joint_router,
    read_policy_file,
)
from cdm.store import ArtifactStore
from cdm.store.io import append_json_line

FIELDS = ("experiment", "sources", "composition", "sampler", "steps", "num_samples", "seed", "format", "prompts")  # fmt: skip
HEALTH = "/health"


class RequestError(ValueError):
    """A request the service refuses before sampling: ``status`` (4xx) and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``serve.limits``)."""

    max_samples: int
    max_steps: int
    max_body_bytes: int
    samplers: tuple[str, ...]
    compositions: tuple[str, ...]
    max_prompt_chars: int = 200  # characters per caption of a text request (at most max_samples)


@dataclass(frozen=True)
class ServiceSettings:
    """What the gate needs: the served experiment, store, policy, limits, request defaults."""

    experiment: str
    artifacts: str
    policy: str
    limits: Limits
    defaults: dict[str, Any]
    joint: dict[str, bool] = field(default_factory=dict)  # composition -> joint router
    api_path: str = "/sample"
    audit_max_bytes: int | None = None
    text: bool = False  # a text model: requests may carry prompts


def settings_from_config(cfg: DictConfig, configs: dict[tuple[str, str], DictConfig]) -> ServiceSettings:  # fmt: skip
    """The gate's settings from the composed ``serve`` config and its (composition, sampler) variants."""
    limits = cfg.serve.limits
    return ServiceSettings(
        experiment=str(cfg.experiment_name), artifacts=str(cfg.paths.artifacts),
        policy=str(cfg.serve.policy),
        limits=Limits(int(limits.max_samples), int(limits.max_steps), int(limits.max_body_bytes),
                      tuple(limits.samplers), tuple(limits.compositions),
                      int(limits.max_prompt_chars)),
        defaults={"experiment": str(cfg.experiment_name), "sources": None,
                  "composition": cfg.composition.name, "sampler": cfg.sampler.name,
                  "steps": int(cfg.steps), "num_samples": min(int(cfg.num_samples), int(limits.max_samples)),
                  "seed": int(cfg.seed), "format": "png", "prompts": None},
        joint={c: joint_router(v) for (c, _), v in configs.items()},
        api_path=str(cfg.serve.api_path), audit_max_bytes=cfg.serve.get("audit_max_bytes"),
        text=cfg.data.get("conditioning") == "text",  # is_text_data, without diffusers in the gate
    )  # fmt: skip


def parse_request(body: bytes, settings: ServiceSettings) -> dict[str, Any]:
    """The request's fields (defaults filled in), checked; raises ``RequestError`` (400/404/422)."""
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not JSON ({' '.join(str(e).split())}): send a JSON object") from e  # fmt: skip
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object with fields {list(FIELDS)}, got {type(data).__name__}")  # fmt: skip
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}: a request has {list(FIELDS)} (identity comes from the bearer token)")  # fmt: skip
    request = {**settings.defaults, **data}
    for key in ("experiment", "composition", "sampler", "format"):
        if not isinstance(request[key], str):
            raise RequestError(400, f"{key} must be a string, got {json.dumps(request[key])[:80]}")  # fmt: skip
    for key in ("steps", "num_samples", "seed"):
        if not isinstance(request[key], int) or isinstance(request[key], bool):
            raise RequestError(400, f"{key} must be an integer, got {json.dumps(request[key])[:80]}")  # fmt: skip
    sources = request["sources"]
    if sources is not None and not (
        isinstance(sources, list)
        and all(
            isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool)) for s in sources
        )  # fmt: skip
    ):
        raise RequestError(400, "sources must be null or a list of shard/source names (or * for all)")  # fmt: skip
    limits = settings.limits
    check_prompts(request["prompts"], settings)
    if request["experiment"] != settings.experiment:
        raise RequestError(404, f"experiment {request['experiment'][:80]!r} is not served here: this server serves {settings.experiment!r}")  # fmt: skip
    checks = [
        (
            "composition",
            request["composition"] in limits.compositions,
            f"choose one of {list(limits.compositions)} (serve.limits.compositions)",
        ),  # fmt: skip
        (
            "sampler",
            request["sampler"] in limits.samplers,
            f"choose one of {list(limits.samplers)} (serve.limits.samplers)",
        ),  # fmt: skip
        ("format", request["format"] in FORMATS, f"choose one of {list(FORMATS)}"),
        (
            "steps",
            1 <= request["steps"] <= limits.max_steps,
            f"1 to {limits.max_steps} (serve.limits.max_steps)",
        ),  # fmt: skip
        (
            "num_samples",
            1 <= request["num_samples"] <= limits.max_samples,
            f"1 to {limits.max_samples} (serve.limits.max_samples)",
        ),  # fmt: skip
        ("seed", 0 <= request["seed"] < 2**31, "0 to 2**31 - 1"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise RequestError(422, f"{key}={json.dumps(request[key])[:80]} is not served: {allowed}")  # fmt: skip
    return request


def check_prompts(prompts: Any, settings: ServiceSettings) -> None:
    """``prompts``: null, or 1 to ``max_samples`` captions of at most ``max_prompt_chars`` each,
    for a text model only; raises ``RequestError`` (400/422)."""
    if prompts is None:
        return
    limits = settings.limits
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise RequestError(400, f"prompts must be null or a non-empty list of captions (strings), got {json.dumps(prompts)[:80]}")  # fmt: skip
    if not settings.text:
        raise RequestError(422, f"prompts are for text models: {settings.experiment!r} is not conditioned on captions; drop prompts")  # fmt: skip
    if len(prompts) > limits.max_samples:
        raise RequestError(422, f"{len(prompts)} prompts is not served: 1 to {limits.max_samples} (serve.limits.max_samples)")  # fmt: skip
    long = [p for p in prompts if not 0 < len(p.strip()) <= limits.max_prompt_chars]
    if long:
        raise RequestError(422, f"prompt {json.dumps(long[0])[:80]} is not served: 1 to {limits.max_prompt_chars} characters (serve.limits.max_prompt_chars)")  # fmt: skip


def json_reply(status: int, detail: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of a one-line ``{"detail": ...}`` answer."""
    body = json.dumps({"detail": " ".join(detail.split())}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]  # fmt: skip
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return status, headers, body


class ServiceGate:
    """ASGI middleware: body size, bearer token, request fields and access policy, then audit.

    Only ``POST <api_path>`` reaches LitServe (with ``user`` and ``shards`` set by the gate) and
    ``GET /health``; every request but the health check gets one audit line, written and
    fsynced before its response is sent.
    """

    def __init__(self, app: Any, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings
        self.store = ArtifactStore(settings.artifacts)
        self.audit = audit_path(settings.artifacts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "user": "anonymous",
            "method": scope["method"], "path": scope["path"][:200],
        }  # fmt: skip
        try:
            body = await self.admit(scope, receive, record)
        except RequestError as e:
            record |= {"decision": "refused", "error": str(e)}
            await self.answer(send, record, started, *json_reply(e.status, str(e)))
            return
        except Exception as e:  # a broken policy file or store: the server stays up
            record |= {"decision": "error", "error": f"{type(e).__name__}: {e}"}
            await self.answer(send, record, started, *json_reply(500, f"{type(e).__name__}: {e}"))  # fmt: skip
            return
        await self.forward(scope, body, send, record, started)

    async def admit(self, scope: dict, receive: Any, record: dict) -> bytes:
        """The body to forward (the checked request, user and shards); raises ``RequestError``."""
        api = self.settings.api_path
        if scope["path"] != api:
            raise RequestError(404, f"not found: the service answers POST {api}")
        if scope["method"] != "POST":
            raise RequestError(405, f"method {scope['method']} not allowed: use POST {api}")
        body = await read_body(scope, receive, self.settings.limits.max_body_bytes)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        user = await asyncio.to_thread(authenticate, authorization, self.settings.policy)
        if user is None:
            what = "missing" if not authorization else "wrong"
            raise RequestError(401, f"{what} bearer token: send 'Authorization: Bearer <token>' (cdm-serve add-user NAME creates one)")  # fmt: skip
        record["user"] = user
        request = parse_request(body, self.settings)
        record |= {k: request[k] for k in FIELDS if k != "sources"} | {"requested": request["sources"]}  # fmt: skip
        composition = request["composition"]
        try:
            shards = await asyncio.to_thread(
                grant_shards, self.store, self.settings.experiment, self.settings.policy, user,
                request["sources"], record, composition=composition,
                joint=self.settings.joint.get(composition, False),
            )  # fmt: skip
        except AccessDenied as e:
            raise RequestError(403, str(e)) from e
        except PolicyError as e:
            raise RequestError(400, str(e)) from e
        record["shards"] = shards
        return json.dumps({**request, "user": user, "shards": shards}).encode()

    async def forward(self, scope: dict, body: bytes, send: Any, record: dict, started: float) -> None:  # fmt: skip
        """Pass the admitted request to LitServe; audit when its response is complete."""
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        start: dict = {}

        async def send_after_audit(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                status = int(start.get("status", 500))
                record["decision"] = "granted" if status == 200 else "error"
                if status != 200:
                    record["error"] = message.get("body", b"")[:500].decode("utf-8", "replace")
                await self.write_audit(record, status, started)
            if start:
                await send(dict(start))
                start.clear()
            await send(message)

        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]  # fmt: skip
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]  # fmt: skip
        await self.app({**scope, "headers": headers}, receive, send_after_audit)

    async def answer(self, send: Any, record: dict, started: float, status: int, headers: list, body: bytes) -> None:  # fmt: skip
        """Audit, then send a gate's own answer."""
        await self.write_audit(record, status, started)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def write_audit(self, record: dict, status: int, started: float) -> None:
        record |= {"status": status, "latency_ms": round(1000 * (time.perf_counter() - started), 2)}  # fmt: skip
        await asyncio.to_thread(append_json_line, self.audit, record, self.settings.audit_max_bytes)


async def read_body(scope: dict, receive: Any, limit: int) -> bytes:
    """The request body; more than ``limit`` bytes (declared or sent) is a 413."""
    too_large = RequestError(413, f"the request body is over {limit} bytes (serve.limits.max_body_bytes)")  # fmt: skip
    declared = dict(scope["headers"]).get(b"content-length", b"0")
    if not declared.isdigit() or int(declared) > limit:
        raise too_large if declared.isdigit() else RequestError(400, "bad content-length header")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "the client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def variant_configs(cfg: DictConfig, overrides: list[str]) -> dict[tuple[str, str], DictConfig]:
    """The ``serve`` config for every served (composition, sampler), composed with the command's
    ``overrides`` (inside ``@hydra.main``: the user's config dirs count), resolved here (the
    worker process has no resolvers)."""
    from hydra import compose

    def resolved(overrides: list[str]) -> DictConfig:
        node = compose(config_name="serve", overrides=overrides)
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True))

    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in ("composition", "sampler")]  # fmt: skip
    limits = cfg.serve.limits
    return {
        (c, s): resolved([*kept, f"composition={c}", f"sampler={s}"])
        for c in limits.compositions
        for s in limits.samplers
    }


def run_service(cfg: DictConfig, configs: dict[tuple[str, str], DictConfig]) -> None:
    """Serve ``cfg.experiment_name`` on ``serve.host:serve.port`` until interrupted.

    The gate needs ``cdm.jobs.pipeline`` (diffusers) only from the first request on: it is
    imported in the background while LitServe starts the worker (which imports it too).
    """
    threading.Thread(target=importlib.import_module, args=("cdm.jobs.pipeline",), daemon=True).start()  # fmt: skip
    settings = settings_from_config(cfg, configs)
    read_policy_file(
        settings.policy
    )  # a missing or malformed policy file fails now, not per request
    missing = [c for c in settings.limits.compositions if c not in settings.joint]
    if missing or not configs:
        raise ValueError(f"serve.limits.compositions {missing} have no composed config")
    api = CDMServiceAPI(
        configs, cache_size=int(cfg.serve.cache_size), api_path=settings.api_path,
        max_batch_size=int(cfg.serve.batch.max_size), batch_timeout=float(cfg.serve.batch.timeout),
    )  # fmt: skip
    server = ls.LitServer(
        api, accelerator="cuda" if str(cfg.device).startswith("cuda") else "cpu", devices=1,
        timeout=float(cfg.serve.timeout), middlewares=[(ServiceGate, {"settings": settings})],
        disable_openapi_url=True,
    )  # fmt: skip
    server.run(
        host=str(cfg.serve.host), port=int(cfg.serve.port), num_api_servers=1,
        generate_client_file=False, api_server_worker_type="thread", log_level="warning",
    )  # fmt: skip
