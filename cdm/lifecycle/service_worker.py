"""The inference worker of ``cdm-serve``'s HTTP service (``cdm.lifecycle.service``).

LitServe runs ``CDMServiceAPI`` in its own process. Requests arrive checked by the gate
(``ServiceGate``: user, granted shards, fields within limits); the requests of one LitServe batch
with the same (shards, composition, sampler, steps) are composed in one batched forward, each
request's x_T drawn from its own seed. A ``CDMPipeline`` is built once per (shards,
composition, sampler), reading only those shards' files, and the last ``serve.cache_size`` are
kept. diffusers is imported in ``setup``, in the worker only.
"""

from __future__ import annotations

import importlib
import io
import json
from collections import OrderedDict, defaultdict
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Response
from omegaconf import DictConfig, OmegaConf

from cdm.core.runtime import configure_runtime
from cdm.store import ArtifactStore

FORMATS = {"png": "image/png", "npz": "application/octet-stream"}


class CDMServiceAPI(ls.LitAPI):
    """The inference worker: admitted requests in, PNG/npz responses out, batched by group."""

    def __init__(self, configs: dict[tuple[str, str], DictConfig], cache_size: int = 8, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.configs = configs
        self.cache_size = int(cache_size)

    def setup(self, device: str) -> None:
        cfg = next(iter(self.configs.values()))
        configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
        self.store = ArtifactStore(cfg.paths.artifacts)
        self.pipelines: OrderedDict[tuple, Any] = OrderedDict()
        self.loads = 0  # pipelines built (the cache's misses)
        importlib.import_module("cdm.jobs.pipeline")  # diffusers, before the worker reports ready

    def decode_request(self, request):  # noqa: ANN001 (an annotation would become FastAPI's body type)
        return request  # the JSON ServiceGate wrote: checked, with user and shards

    def predict(self, batch: list[dict] | dict) -> list[Response] | Response:
        """One response per request; each group of equal (shards, composition, sampler, steps)
        is one batched forward; a failing group answers 500 without failing the others."""
        if isinstance(batch, dict):  # max_batch_size=1
            return self.predict([batch])[0]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(batch):
            groups[group_key(request)].append(i)
        outputs: list[Response] = [Response(status_code=500)] * len(batch)
        for members in groups.values():
            try:
                replies = self.compose([batch[i] for i in members])
            except Exception as e:
                error = json.dumps({"detail": " ".join(f"{type(e).__name__}: {e}".split())})
                replies = [Response(error, status_code=500, media_type="application/json")] * len(members)  # fmt: skip
            for i, reply in zip(members, replies, strict=True):
                outputs[i] = reply
        return outputs

    def encode_response(self, output: Response) -> Response:
        return output

    def pipeline(self, request: dict) -> Any:
        """The cached ``CDMPipeline`` of the request's (shards, composition, sampler)."""
        from cdm.jobs.pipeline import CDMPipeline

        key = (tuple(request["shards"]), request["composition"], request["sampler"])
        if key in self.pipelines:
            self.pipelines.move_to_end(key)
            return self.pipelines[key]
        cfg = self.configs[(request["composition"], request["sampler"])].copy()
        OmegaConf.update(cfg, "shards", list(request["shards"]), force_add=True)
        pipe = CDMPipeline.from_config(cfg, self.store)  # reads only these shards' files
        pipe.set_progress_bar_config(disable=True)
        self.loads += 1
        self.pipelines[key] = pipe
        while len(self.pipelines) > self.cache_size:
            self.pipelines.popitem(last=False)
        return pipe

    def compose(self, requests: list[dict]) -> list[Response]:
        """One batched forward for ``requests`` (one group); x_T of each from its own seed, as
        ``cdm-sample`` draws its first batch. Stochastic samplers (ddpm) and composition=random
        share the first request's generator after x_T."""
        from cdm.jobs.pipeline import cycle_labels
        from cdm.jobs.sample import batch_generator

        pipe = self.pipeline(requests[0])
        generators = [batch_generator(r["seed"]) for r in requests]
        latents = [torch.randn((r["num_samples"], *pipe.sample_shape), generator=g) for r, g in zip(requests, generators, strict=True)]  # fmt: skip
        labels = None
        if pipe.label_pool is not None:
            pools = request_label_pools(pipe, requests)
            labels = torch.cat([cycle_labels(p, r["num_samples"]) for p, r in zip(pools, requests, strict=True)])  # fmt: skip
        out = pipe(
            batch_size=sum(r["num_samples"] for r in requests), class_labels=labels,
            num_inference_steps=requests[0]["steps"], generator=generators[0],
            output_type="latent", latents=torch.cat(latents),
        )  # fmt: skip
        sizes = [r["num_samples"] for r in requests]
        images, weights = out.images.split(sizes), out.weights.split(sizes)
        label_parts = [None] * len(requests) if labels is None else labels.split(sizes)
        return [
            encode(r, pipe, x, w, y, batched=len(requests))
            for r, x, w, y in zip(requests, images, weights, label_parts, strict=True)
        ]


def request_label_pools(pipe: Any, requests: list[dict]) -> list[torch.Tensor]:
    """Each request's labels to cycle over: the pipeline's own (classes, or a text model's
    default prompts), or the rows of the request's ``prompts`` (``CDMPipeline.prompt_labels``:
    one encoding for the whole group, the pipeline's own rows kept)."""
    asked = [list(r.get("prompts") or []) for r in requests]
    if not any(asked):
        return [pipe.label_pool] * len(requests)
    rows = pipe.prompt_labels([c for captions in asked for c in captions]).split([len(a) for a in asked])  # fmt: skip
    return [pipe.label_pool if not a else r for a, r in zip(asked, rows, strict=True)]


def captions_of(pipe: Any, labels: torch.Tensor, request: dict) -> list[str]:
    """The caption each of a text request's samples was drawn for: its ``prompts`` cycled (as its
    labels cycle over their rows), else the pipeline's own prompts of its labels."""
    asked = list(request.get("prompts") or [])
    if asked:
        return [asked[i % len(asked)] for i in range(len(labels))]
    return [pipe.prompts[int(k)]["caption"] for k in labels]


def group_key(request: dict) -> tuple:
    """Requests that may share one batched forward: same shards, composition, sampler, steps."""
    return (tuple(request["shards"]), request["composition"], request["sampler"], request["steps"])


def encode(request: dict, pipe: Any, images: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor | None, batched: int = 1) -> Response:  # fmt: skip
    """A request's answer: the grid PNG, or an npz of images (uint8), labels, weights, shards.

    Headers: ``x-cdm-shards`` (the composed shards), ``x-cdm-batch`` (requests in its forward).
    """
    from cdm.eval.grids import grid_png
    from cdm.jobs.pipeline import to_uint8

    headers = {"x-cdm-shards": ",".join(str(k) for k in request["shards"]), "x-cdm-batch": str(batched)}  # fmt: skip
    if request["format"] == "png":
        title = f"{request['experiment']}: {request['composition']}, {request['sampler']} {request['steps']} steps"  # fmt: skip
        content = grid_png(images, labels=labels, title=title)
    else:
        buffer = io.BytesIO()
        text = {} if labels is None or pipe.prompts is None else {"captions": np.array(captions_of(pipe, labels, request))}  # fmt: skip
        np.savez(
            buffer, images=to_uint8(images).numpy(), weights=weights.numpy(),
            labels=np.array([] if labels is None else labels.numpy()),
            shards=np.array(pipe.shards), **text,
        )  # fmt: skip
        content = buffer.getvalue()
    return Response(content, media_type=FORMATS[request["format"]], headers=headers)
