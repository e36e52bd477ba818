"""Attribution of a stored CDM by composition: the wiring of ``shapley``, ``credit`` and
``properties`` to ``CDMPipeline`` (the library behind ``cdm-attribute``).

- Shard values (issue 13, section 3): v(S) = a global property of the samples composed from the
  shards S only (``CDMPipeline.from_config`` with ``shards=S``: exactly what
  ``cdm-sample shards=S`` draws), every coalition from the same x_T (one generator per batch,
  ``batch_generator(seed, start)``); v({}) = the property of the safe backbone's own samples from
  the same x_T. Exact leave-one-out / Shapley / Banzhaf by enumeration up to
  ``attribution.max_exact_shards`` shards, permutation Shapley and MSR Banzhaf (with standard
  errors) beyond.
- Credit of paper eq. 6 (section 4): along the composed model's DDIM (eta = 0) path, the
  divergence of w_i(x_t, t) score_i(x_t, t), score_i = -eps_i / sigma_t, by the configured
  ``attribution/divergence`` (Hutchinson or exact); per-step credit, weights and the Fig. 3 plot.

Each ``attribution/method`` option is a class here (``_target_``) with
``run(context) -> Attribution``; each ``attribution/property`` option is a factory here that gets
the ``PropertyContext`` (feature spaces, reference images) and returns a ``GlobalProperty``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cdm.attribution.credit import CreditResult, plot_credit, source_credit
from cdm.attribution.divergence import Divergence
from cdm.attribution.properties import (
    ClassShareProperty,
    FrechetDistanceProperty,
    GlobalProperty,
    MeanRouterWeightProperty,
    MemorizedShareProperty,
)
from cdm.attribution.shapley import (
    CompositionGame,
    ShardValues,
    exact_banzhaf,
    exact_shapley,
    leave_one_out,
    msr_banzhaf,
    permutation_shapley,
)
from cdm.core.logging import get_logger
from cdm.core.names import job_name
from cdm.core.runtime import configure_runtime
from cdm.core.sampling import sample as run_sampler
from cdm.eval.features import FeatureSpace
from cdm.eval.frechet import FeatureStats, stats_from_features
from cdm.jobs.context import device_description, load_data
from cdm.jobs.evaluate import (
    DEFAULT_REFERENCE,
    build_feature_space,
    reference_features,
    reference_images,
)
from cdm.jobs.pipeline import CDMPipeline, cycle_labels, instantiate_option, shard_indices
from cdm.jobs.sample import batch_generator
from cdm.models.backbone import UNET_CLASSES, predict_epsilon
from cdm.models.composed import draw
from cdm.store import ArtifactStore, make_card
from cdm.store.artifact import save_artifact

log = get_logger(__name__)

VALUES_FILE, TABLE_FILE, CREDIT_PLOT_FILE = "values.json", "table.md", "credit.png"
CREDIT_SAMPLE_PLOT_FILE = "credit-sample0.png"


# ---- properties ------------------------------------------------------------------------------


@dataclass
class PropertyContext:
    """What a property factory may need, built on first use: the experiment's dataset, feature
    spaces (``cdm.jobs.evaluate``: domain | inception | pixels) and the reference images
    (``evaluate.reference``) with their cached features."""

    cfg: DictConfig
    store: ArtifactStore

    @cached_property
    def dataset(self) -> Any:
        """The experiment's dataset (``load_data``)."""
        return load_data(self.cfg)

    def feature_space(self, name: str) -> FeatureSpace:
        """The feature space ``name`` for this experiment's data."""
        return build_feature_space(self.cfg, self.store, name, self.dataset)

    def reference(self, space: FeatureSpace) -> np.ndarray:
        """Features [M, dim] of the reference images in ``space`` (cached in the store)."""
        images, key, ids_hash = reference_images(self.cfg, self.store, self.dataset)
        parents = getattr(space, "parents", [])
        return reference_features(self.store, space, key, ids_hash, images, parents)[0]

    def reference_stats(self, space: FeatureSpace) -> FeatureStats:
        """Mean and covariance of the reference features in ``space``."""
        return stats_from_features(self.reference(space))


def fd_property(context: PropertyContext, space: str = "domain") -> GlobalProperty:
    """FD_<space> of the samples to the reference set (lower is better); named with the set when
    it is not the default (``FD_digits vs shard-01``)."""
    features = context.feature_space(space)
    prop = FrechetDistanceProperty(features, context.reference_stats(features))
    reference = str(context.cfg.evaluate.reference)
    if reference != DEFAULT_REFERENCE:
        prop.name = f"{prop.name} vs {reference}"
    return prop


def class_share_property(context: PropertyContext, target: int = 0) -> GlobalProperty:
    """Share of samples the domain classifier (``stage=feature_net``) assigns to ``target``."""
    return ClassShareProperty(context.feature_space("domain"), target)


def router_weight_property(context: PropertyContext, shard: int = 0) -> GlobalProperty:
    """Mean composition weight of shard ``shard`` (its index KK, ``shard-KK``) over samples and
    steps (0 in a coalition without it)."""
    return MeanRouterWeightProperty(shard)


def memorized_share_property(
    context: PropertyContext, space: str = "pixels", threshold: float = 1 / 3
) -> GlobalProperty:
    """Share of samples whose nearest / second-nearest reference distance ratio in ``space`` is
    below ``threshold``."""
    features = context.feature_space(space)
    return MemorizedShareProperty(features, context.reference(features), threshold)


# ---- sampling coalitions ---------------------------------------------------------------------


@dataclass
class Attribution:
    """What a method produced: ``values`` (JSON-able), the markdown table, extra files (png)."""

    values: dict[str, Any]
    table: str
    files: dict[str, bytes] = field(default_factory=dict)
    parents: list[dict[str, Any]] | None = None  # None: every adapter of the full composition


@dataclass
class AttributionContext:
    """One attribution run: the config, the store, the pipeline of all shards, the property."""

    cfg: DictConfig
    store: ArtifactStore
    divergence: Divergence
    pipelines: dict[tuple[int, ...], CDMPipeline] = field(default_factory=dict)
    full_trace: torch.Tensor | None = None

    @cached_property
    def prop(self) -> GlobalProperty:
        """The property attributed (``attribution/property``), built on first use: the credit
        method never needs it (nor its feature net)."""
        return instantiate_option(self.cfg.attribution.property)(
            PropertyContext(self.cfg, self.store)
        )

    @cached_property
    def shards(self) -> list[int]:
        """The shards attributed: ``shards=[...]`` or every shard of the experiment."""
        available = shard_indices(self.store, str(self.cfg.experiment_name))
        return available if self.cfg.shards is None else sorted(int(k) for k in self.cfg.shards)

    def pipeline(self, shards: Sequence[int]) -> CDMPipeline:
        """The composition of ``shards`` only (cdm-sample shards=...). Only the composition of
        every shard is kept (each other coalition is sampled once: the game is memoised)."""
        key = tuple(sorted(int(k) for k in shards))
        if key in self.pipelines:
            return self.pipelines[key]
        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.shards = list(key)
        pipe = CDMPipeline.from_config(cfg, self.store)
        pipe.set_progress_bar_config(disable=True)
        if list(key) == self.shards:
            self.pipelines[key] = pipe
        return pipe

    @property
    def full(self) -> CDMPipeline:
        """The composition of every attributed shard."""
        return self.pipeline(self.shards)

    def latents(self, start: int, size: int) -> tuple[torch.Tensor, torch.Generator]:
        """x_T of the batch at ``start`` and its generator (then serving the sampler's noise):
        the same for every coalition."""
        generator = batch_generator(int(self.cfg.seed), start)
        shape = (size, *self.full.sample_shape)
        return torch.randn(shape, generator=generator), generator

    def batches(self, num_samples: int) -> list[tuple[int, int]]:
        """(start, size) of each batch of ``batch_size``."""
        size = int(self.cfg.batch_size)
        return [(s, min(size, num_samples - s)) for s in range(0, num_samples, size)]

    def labels(self, num_samples: int) -> torch.Tensor | None:
        """Class labels cycling through every attributed shard's classes (conditional data)."""
        pool = self.full.label_pool
        return None if pool is None else cycle_labels(pool, num_samples)

    def coalition_samples(self, shards: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0 [N, C, H, W] in [-1, 1], weights [N, steps, K + 1]: column k is shard k's weight,
        zero where it is not composed) of the composition of ``shards``; the backbone alone for
        no shard."""
        n, steps = int(self.cfg.num_samples), int(self.cfg.steps)
        labels = self.labels(n)
        images, traces = [], []
        pipe = self.pipeline(shards) if shards else None
        width = max(self.shards) + 1
        for start, size in self.batches(n):
            x_T, generator = self.latents(start, size)
            y = None if labels is None else labels[start : start + size]
            if pipe is None:
                x0 = self.backbone_sample(x_T, generator, y)
                trace = torch.zeros(size, steps, width)
            else:
                out = pipe(
                    batch_size=size, class_labels=y, num_inference_steps=steps,
                    generator=generator, output_type="latent", latents=x_T,
                )  # fmt: skip
                x0, trace = out.images, torch.zeros(size, steps, width)
                trace[..., pipe.shards] = out.weights.float()
            images.append(x0)
            traces.append(trace)
        return torch.cat(images), torch.cat(traces)

    @cached_property
    def backbone(self) -> torch.nn.Module:
        """The safe backbone alone (v of the empty coalition)."""
        unet, _ = self.store.load_backbone(
            self.cfg.backbone.id, UNET_CLASSES[self.cfg.backbone.kind]
        )
        return unet.eval().to(self.full.device)

    def backbone_sample(
        self, x_T: torch.Tensor, generator: torch.Generator, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """x_0 of the safe backbone from ``x_T`` with the composed model's sampler."""
        device = self.full.device
        y = None if labels is None else labels.to(device)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return predict_epsilon(self.backbone, x, t.expand(x.shape[0]).to(device), y)

        x0 = run_sampler(
            denoise, self.full.scheduler, x_T.to(device), int(self.cfg.steps), generator=generator
        )
        return x0.clamp(-1, 1).cpu()

    def value(self, shards: Sequence[int]) -> float:
        """v(shards): the property of the composition's samples (the weight trace of all
        shards is kept: router-weight credit is read from the same samples)."""
        images, weights = self.coalition_samples(shards)
        if sorted(shards) == self.shards:
            self.full_trace = weights
        return float(self.prop(images, weights))


# ---- eq. 6 credit ----------------------------------------------------------------------------


def composed_fields(
    pipe: CDMPipeline, labels: torch.Tensor | None
) -> tuple[Callable, list[Callable]]:
    """(w(x, t) -> [B, n], [score_i(x, t)]) of the composed model, differentiable in x; ``t`` is
    a float timestep [B]; score_i = -eps_i / sigma_t (sigma_t^2 = 1 - alpha_bar_t)."""
    denoiser = pipe.denoiser
    denoiser.allowed = pipe.allowed_mask(None)
    alpha_bar = pipe.scheduler.alphas_cumprod.double()
    device = pipe.device
    y = None if labels is None else labels.to(device)

    def weights(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser.weights(x, t.round().long().to(device), y).to(x)

    def score(shard: int) -> Callable:
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            steps = t.round().long()
            sigma = (1 - alpha_bar[steps.cpu()]).sqrt().to(x)
            eps = denoiser.shard_epsilon(x, steps.to(device), shard, y)
            return -eps / sigma.reshape(-1, *[1] * (x.dim() - 1))

        return fn

    return weights, [score(i) for i in range(denoiser.model.n_shards)]


def credit_of_samples(
    pipe: CDMPipeline,
    x_T: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    divergence: Divergence,
) -> CreditResult:
    """Eq. 6 credit of the composed model along its DDIM (eta = 0) paths from ``x_T``: the states
    x_t before each step at the scheduler's timesteps (the ODE's discretisation)."""
    states: list[torch.Tensor] = []
    pipe.denoiser.allowed = pipe.allowed_mask(None)
    draw(
        pipe.denoiser, pipe.scheduler, shape=tuple(x_T.shape), steps=steps, labels=labels,
        device=pipe.device, callback=lambda i, t, x: states.append(x.detach()), latents=x_T,
    )  # fmt: skip
    path = torch.stack([x_T.to(pipe.device), *states[:-1]]).float()
    times = pipe.scheduler.timesteps.float().to(pipe.device)
    weights, scores = composed_fields(pipe, labels)
    return source_credit(path, times, weights, scores, lambdas=None, divergence=divergence)


def credit_values(ctx: AttributionContext) -> tuple[CreditResult, dict[str, Any]]:
    """Eq. 6 credit of the full composition on its first ``attribution.credit_samples`` samples
    (the same x_T as the shard values)."""
    n = min(int(ctx.cfg.attribution.credit_samples), int(ctx.cfg.num_samples))
    covering = [(s, size) for s, size in ctx.batches(int(ctx.cfg.num_samples)) if s < n]
    x_T = torch.cat([ctx.latents(s, size)[0] for s, size in covering])[:n]
    labels = ctx.labels(n)
    result = credit_of_samples(ctx.full, x_T, labels, int(ctx.cfg.steps), ctx.divergence)
    names = shard_names(ctx.shards)
    return result, {
        "credit": dict(zip(names, result.mean_credit.tolist(), strict=True)),
        "credit_per_step": result.step_credit.nanmean(1).tolist(),
        "weights_per_step": result.weights.mean(1).tolist(),
        "timesteps": result.times.tolist(),
        "per_sample": result.credit.tolist(),
        # 1 = each sample credited to one shard (cross-domain, Fig. 3 left); 1/n = shared (iid)
        "mean_max_credit": float(result.credit.max(-1).values.mean()),
        "samples": n,
        "divergence": getattr(ctx.divergence, "name", type(ctx.divergence).__name__),
    }


def credit_plots(result: CreditResult, labels: Sequence[str], title: str) -> dict[str, bytes]:
    """The Fig. 3-style plots as PNG files: averaged over the samples (``credit.png``) and of the
    first sample alone (``credit-sample0.png``, as the paper's figure shows one sample)."""
    first = dataclasses.replace(
        result, weights=result.weights[:, :1], integrand=result.integrand[:, :1],
        step_credit=result.step_credit[:, :1], contributions=result.contributions[:1],
        credit=result.credit[:1],
    )  # fmt: skip
    files = {}
    for filename, part, note in ((CREDIT_PLOT_FILE, result, "mean over samples"),
                                 (CREDIT_SAMPLE_PLOT_FILE, first, "sample 0")):  # fmt: skip
        buffer = io.BytesIO()
        plot_credit(part, labels, f"{title} ({note})").savefig(buffer, format="png", dpi=120)
        files[filename] = buffer.getvalue()
    return files


def shard_names(shards: Sequence[int]) -> list[str]:
    """``shard-KK`` of each index."""
    return [job_name("shard", k) for k in shards]


# ---- methods ---------------------------------------------------------------------------------


@dataclass
class ShardValueMethod:
    """Shard values by composition (LOO, Shapley, Banzhaf), next to router-weight credit and
    eq. 6 credit on the same samples. Exact up to ``max_exact_shards`` shards; beyond that
    permutation Shapley (``n_permutations``) and MSR Banzhaf (``msr_samples``)."""

    max_exact_shards: int = 8
    n_permutations: int = 50
    msr_samples: int = 200
    credit: bool = True

    def run(self, ctx: AttributionContext) -> Attribution:
        """Every value, the comparison table and (with ``credit``) the Fig. 3 plot."""
        players = tuple(ctx.shards)
        empty = ctx.value(())
        game = CompositionGame(ctx.value, players, empty)
        seed = int(ctx.cfg.seed)
        if len(players) <= self.max_exact_shards:
            estimates = [exact_shapley(game, players), exact_banzhaf(game, players)]
        else:
            estimates = [
                permutation_shapley(game, players, n_permutations=self.n_permutations, seed=seed),
                msr_banzhaf(game, players, n_samples=self.msr_samples, seed=seed),
            ]
        estimates.append(leave_one_out(game, players))
        values_all = game(players)  # sets ctx.full_trace (once: v is memoised)
        trace = ctx.full_trace if ctx.full_trace is not None else ctx.coalition_samples(players)[1]
        names = shard_names(players)
        router = {
            name: float(trace[..., k].double().mean())
            for k, name in zip(players, names, strict=True)
        }
        values: dict[str, Any] = {
            "property": ctx.prop.name,
            "players": names,
            "v_empty": empty,
            "v_all": values_all,
            "coalitions": {
                ",".join(shard_names(sorted(c))) or "{}": v for c, v in game.cache.items()
            },
            "evaluations": game.evaluations,
            "router_weight": router,
        }
        for est in estimates:
            values[est.method] = {"values": dict(zip(names, est.values.tolist(), strict=True)),
                                  "stderr": dict(zip(names, est.stderr.tolist(), strict=True))}  # fmt: skip
        files: dict[str, bytes] = {}
        credit = None
        if self.credit:
            result, credit = credit_values(ctx)
            values["eq6"] = credit
            files.update(credit_plots(result, names, title(ctx)))
        return Attribution(values, values_table(values, estimates, credit), files)


@dataclass
class CreditMethod:
    """Eq. 6 credit only: per-step credit and weights along the DDIM path, the Fig. 3 plot."""

    def run(self, ctx: AttributionContext) -> Attribution:
        """Credit of each shard of the full composition."""
        result, credit = credit_values(ctx)
        names = shard_names(ctx.shards)
        rows = [f"| {name} | {credit['credit'][name]:.4f} | {float(result.weights.mean((0, 1))[j]):.4f} |"
                for j, name in enumerate(names)]  # fmt: skip
        table = "\n".join(["| shard | eq. 6 credit | mean weight |", "|---|---|---|", *rows])
        table += (
            f"\n\nmean over samples of max_i C_i: {credit['mean_max_credit']:.3f} (1: each sample "
            f"credited to one shard; 1/{len(names)}: shared)"
        )
        values = {"players": names, "eq6": credit}
        return Attribution(values, table, credit_plots(result, names, title(ctx)))


def title(ctx: AttributionContext) -> str:
    """The plot title: experiment, composition, sampler and steps."""
    cfg = ctx.cfg
    return f"{cfg.experiment_name}: {cfg.composition.name}, {cfg.sampler.name} {cfg.steps} steps"


def values_table(
    values: dict[str, Any], estimates: Sequence[ShardValues], credit: dict | None
) -> str:
    """Markdown: one row per shard, one column per value (``± stderr`` when sampled)."""
    names = values["players"]
    header = ["shard", *(e.method for e in estimates), "router weight"]
    header += ["eq. 6 credit"] if credit else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j, name in enumerate(names):
        cells = [name]
        for e in estimates:
            se = f" ± {e.stderr[j]:.2g}" if e.stderr[j] > 0 else ""
            cells.append(f"{e.values[j]:.4g}{se}")
        cells.append(f"{values['router_weight'][name]:.4f}")
        if credit:
            cells.append(f"{credit['credit'][name]:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\n{values['property']}: v(all) = {values['v_all']:.4g}, v(empty: backbone) = "
        f"{values['v_empty']:.4g}; {values['evaluations']} coalitions evaluated"
    )
    return "\n".join(lines)


# ---- the job ---------------------------------------------------------------------------------


def run_attribution(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.attribution.method`` on ``cfg.attribution.property`` and store the result under
    ``experiments/<exp>/attribution/<name>/``; returns its card."""
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    started = time.perf_counter()
    store = ArtifactStore(cfg.paths.artifacts)
    experiment, name = str(cfg.experiment_name), str(cfg.attribution.name)
    final = store.attribution_dir(experiment, name)  # a bad name fails before any sampling
    ctx = AttributionContext(cfg, store, instantiate_option(cfg.attribution.divergence))
    result = instantiate_option(cfg.attribution.method).run(ctx)
    parents = result.parents if result.parents is not None else ctx.full.parents
    card = make_card(
        kind="attribution", name=name, experiment=experiment,
        method=cfg.attribution.method.name, property=result.values.get("property"),
        shards=ctx.shards,
        parents=parents, seeds={"seed": int(cfg.seed), "batch_seed": "seed * 1_000_003 + start"},
        config=OmegaConf.to_container(cfg, resolve=True), device=device_description(cfg.device),
        wall_time_s=round(time.perf_counter() - started, 3),
    )  # fmt: skip
    files = {
        VALUES_FILE: json.dumps(result.values, indent=1, sort_keys=True).encode(),
        TABLE_FILE: (result.table + "\n").encode(),
        **result.files,
    }
    saved = save_artifact(final, {**card, "path": str(final)}, weights=None, files=files)
    log_wandb(cfg, store, saved, result)
    return saved


def log_wandb(cfg: DictConfig, store: ArtifactStore, card: dict, result: Attribution) -> None:
    """The values table (and the credit plot) to W&B when a wandb logger is configured (offline
    unless WANDB_API_KEY is set)."""
    if not (cfg.logger and cfg.logger.get("wandb")):
        return
    import os

    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(
        project=cfg.logger.wandb.project, group=str(cfg.experiment_name), job_type="attribution",
        mode=mode, name=f"{cfg.experiment_name}-{card['name']}", dir=str(store.root),
        reinit="create_new",
    )  # fmt: skip
    rows = [line.strip("|").split("|") for line in result.table.splitlines() if line.startswith("| ")]  # fmt: skip
    rows = [[c.strip() for c in r] for r in rows]
    logged: dict[str, Any] = {"attribution": wandb.Table(columns=rows[0], data=rows[1:])}
    if CREDIT_PLOT_FILE in result.files:
        logged["credit"] = wandb.Image(card["path"] + "/" + CREDIT_PLOT_FILE)
    run.log(logged)
    run.finish()
