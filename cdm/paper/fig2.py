"""The paper's Fig. 2 (Sec. 5, "Forgetting" and "Continual Learning"): the relative change in
FID, with respect to a single shard, as shards are added one by one; read right to left, the
increase when shards are forgotten.

``run_fig2`` takes one experiment with n shards (default ``<the data's name>_8split``: the
config ``experiment/digits_8split``, or the config's own data in 8 shards), trains what the store
lacks (backbone, the n shards, the router, the feature net; the helpers of ``cdm.paper.table1``), then
for k = 1..n samples the composition of shards ``[0..k-1]`` with each composition method
(``cdm-sample shards=[0,...,k-1] name=<name>-<method>-k<k>``), evaluates every samples artifact
with ``cdm.jobs.evaluate.run_evaluation`` and writes ``fig2.md``, ``fig2.csv``, ``fig2.png`` and a
card into ``<root>/tables/<name>/``.

The router of the k-shard composition is the n-shard router restricted to the first k shards
(its logits of the allowed shards only, ``cdm.jobs.sample``): the exact Bayes restriction of the
posterior P(shard | x_t) to the sub-mixture, *not* a router retrained on k shards. A router
retrained without a dropped shard is what ``cdm-forget`` of a whole source produces.

k = 1 is one shard alone: every composition of one shard is the same model (weight 1), so it is
sampled once (``<name>-k1``) and shared by all methods.

The main columns measure each model against all n shards' data (the evaluation's ``private``
reference), so a k-shard model also pays for what the missing shards hold. With
``fig2.own_reference`` the same samples are also measured against the composed shards' data only,
next to the dataset's held-out test images of those shards' classes (real images no model saw).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import sha256_bytes
from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.eval.features import to_uint8
from cdm.eval.frechet import frechet_distance, kernel_distance, stats_from_features
from cdm.jobs.context import load_data
from cdm.jobs.evaluate import build_feature_space, load_samples, reference_features
from cdm.jobs.pipeline import shard_indices
from cdm.paper.table1 import (
    METHOD_TITLES,
    checked_choices,
    dataset_name,
    evaluated_space,
    experiment_config,
    forwarded_overrides,
    sample_and_evaluate,
    save_table,
    train_backbone_and_shards,
    train_missing,
)
from cdm.store import ArtifactStore, make_card

log = get_logger(__name__)

COMPOSITIONS = ("classifier", "average", "random", "topk")  # methods that compose a shard subset
ROUTED = ("classifier", "topk")  # methods that need the trained router
STATISTICS = ("FD", "KID")
PAPER_DROP_ONE = 0.01  # the paper: forgetting a shard of 8 raises FID by at most 1%
FIGURE_DPI = 100
FIGURE_INCHES = (5.5, 4.0)  # per panel: 550 x 400 pixels


def sample_names(name: str, n: int, methods: list[str]) -> dict[tuple[int, str], str]:
    """``{(k, method): samples name}``; k = 1 is one artifact shared by every method."""
    return {
        (k, m): f"{name}-k1" if k == 1 else f"{name}-{m}-k{k}"
        for k in range(1, n + 1)
        for m in methods
    }


def check_spec(cfg: DictConfig) -> tuple[list[str], str, str]:
    """(methods, statistic, feature space) of ``cfg.fig2``, with a clear error for a bad one."""
    spec = cfg.fig2
    methods = checked_choices(
        "fig2.compositions", [str(m) for m in spec.compositions], COMPOSITIONS
    )
    statistic = str(spec.metric)
    if statistic not in STATISTICS:
        raise ValueError(f"fig2.metric={statistic}: choose one of {list(STATISTICS)}")
    return methods, statistic, evaluated_space(cfg, "fig2.feature_space")


def run_fig2(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train what is missing, sample k = 1..n shards per method, evaluate, write the figure."""
    started = time.perf_counter()
    spec = cfg.fig2
    methods, statistic, space = check_spec(cfg)
    experiment = (
        str(spec.experiment)
        if spec.experiment is not None
        else f"{dataset_name(cfg)}_{int(spec.shards)}split"
    )
    overrides = [*forwarded_overrides(cfg), *overrides]
    base = experiment_config(experiment, overrides, [])
    n, stored = (
        int(base.sharding.n_shards),
        str(base.experiment_name),
    )  # experiment_name=... may rename it
    if n < 2:
        raise ValueError(
            f"fig2.experiment={experiment} has {n} shard: adding or dropping shards needs at least 2"
        )
    store = ArtifactStore(cfg.paths.artifacts)
    log.info("fig2: %s (%s shards): train what is missing", experiment, n)
    train_backbone_and_shards(
        experiment, overrides, store, stored, n, bool(cfg.retrain), int(spec.n_jobs), False
    )
    if any(m in ROUTED for m in methods):
        train_missing(experiment, overrides, [("router", 0)], 1)
    train_missing(experiment, overrides, [("feature_net", 0)], 1)
    order = shard_indices(store, stored)  # shard k of the sweep is order[k]
    names = sample_names(str(spec.name), n, methods)
    draws: dict[str, list[str]] = {}
    for (k, method), name in names.items():  # one shard: weight 1 anyway
        draws.setdefault(name, [f"composition={'average' if k == 1 else method}",
                                f"shards=[{','.join(str(s) for s in order[:k])}]"])  # fmt: skip
    cards, ecfg = sample_and_evaluate(experiment, overrides, draws)
    unique = list(draws)
    metric = cards[unique[0]]["metric_names"][space][statistic]
    own, floor = (
        own_reference_values(ecfg, store, order, names, space, statistic)
        if spec.own_reference
        else ({}, {})
    )
    points = [
        {"k": k, "method": m, "shards": order[:k], "samples": name,
         "value": cards[name]["metrics"][metric], "own_reference_value": own.get(name),
         "heldout_value": floor.get(k), "label_accuracy": cards[name]["metrics"].get("label_accuracy")}
        for (k, m), name in names.items()
    ]  # fmt: skip
    add_relative_change(points, "value", "relative_change")
    add_relative_change(points, "own_reference_value", "own_reference_relative_change")
    add_relative_change(points, "heldout_value", "heldout_relative_change")
    drop_one = {m: _drop(points, m, n, "value") for m in methods}
    if spec.own_reference:
        drop_one |= {
            f"{m} (own shards)": _drop(points, m, n, "own_reference_value") for m in methods
        }
    markdown, rows = format_fig2(points, methods, metric, n, int(ecfg.num_samples), stored)
    figure = plot_png(points, methods, metric, stored)
    card = make_card(
        kind="table", name=str(spec.name), figure="fig2", experiment=stored, metric=metric,
        router="the n-shard router restricted to the first k shards (exact Bayes restriction of "
               "P(shard | x_t) to the sub-mixture), not a router retrained on k shards",
        points=points, drop_one_of_n=drop_one, paper_drop_one_at_most=PAPER_DROP_ONE,
        wall_time_s=round(time.perf_counter() - started, 1),
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    written = save_table(store, str(spec.name), markdown, rows, card, "fig2", {"fig2.png": figure})
    print(markdown)
    for filename in ("fig2.md", "fig2.csv", "fig2.png", "card.json"):
        log.info("%s/%s", written["path"], filename)
    log.info("fig2 written in %.0f s", written["wall_time_s"])
    return written


def own_reference_values(
    cfg: DictConfig, store: ArtifactStore, order: list[int], names: dict, space: str, statistic: str
) -> tuple[dict[str, float], dict[int, float]]:
    """``{samples name: metric}`` against the union of the *composed* shards' data, and
    ``{k: metric}`` of the held-out test images of those shards' classes against the same data.

    Against all n shards (the main columns) a k-shard model also pays for the classes it cannot
    draw; against its own shards' data it does not. The held-out real images are a floor: about
    what a perfect model would score at this k, up to sample size (the estimate depends on the
    reference's size and classes, so it moves with k too). None without a test split or classes.
    """

    def distance(mine: np.ndarray, ref: np.ndarray) -> float:
        if statistic == "FD":
            return frechet_distance(stats_from_features(mine), stats_from_features(ref))
        return kernel_distance(
            mine, ref, num_subsets=int(cfg.evaluate.kid_subsets),
            max_subset_size=int(cfg.evaluate.kid_subset_size), seed=int(cfg.seed),
        )[0]  # fmt: skip

    dataset = load_data(cfg)
    features = build_feature_space(cfg, store, space, dataset)
    test = [i for i, split in enumerate(dataset.splits) if split == "test"]
    values, floor = {}, {}
    for k in sorted({k for k, _ in names}):
        manifests = [store.load_manifest(cfg.experiment_name, ShardId(s).name) for s in order[:k]]
        ids = [i for m in manifests for i in m["ids"]]
        ids_hash = sha256_bytes("\n".join(sorted(ids)).encode())
        images = to_uint8(torch.stack([dataset.image(dataset.id_to_index[i]) for i in ids]))
        key = f"{dataset.name}-r{dataset.resolution}-shards{k}-{ids_hash[:16]}"
        ref, _ = reference_features(
            store, features, key, ids_hash, images, getattr(features, "parents", [])
        )
        for name in dict.fromkeys(v for (kk, _), v in names.items() if kk == k):
            values[name] = distance(
                features(load_samples(store, cfg.experiment_name, name)[0]), ref
            )
        if all(m.get("classes") is not None for m in manifests):
            classes = {int(c) for m in manifests for c in m["classes"]}
            rows = [i for i in test if int(dataset.labels[i]) in classes]
            if len(rows) > 1:
                floor[k] = distance(features(to_uint8(torch.stack([dataset.image(i) for i in rows]))), ref)  # fmt: skip
    return values, floor


def add_relative_change(points: list[dict], key: str, out: str) -> None:
    """``point[out] = point[key] / (the same method's k = 1 value) - 1`` (None without values)."""
    first = {p["method"]: p[key] for p in points if p["k"] == 1}
    for p in points:
        base = first[p["method"]]
        p[out] = None if p[key] is None or base is None else p[key] / base - 1.0


def _drop(points: list[dict], method: str, n: int, key: str) -> float:
    """Forgetting the last-added shard of n: value(n - 1) / value(n) - 1."""
    value = {p["k"]: p[key] for p in points if p["method"] == method}
    return value[n - 1] / value[n] - 1.0


def format_fig2(
    points: list[dict], methods: list[str], metric: str, n: int, num_samples: int, experiment: str
) -> tuple[str, list[list[str]]]:
    """Markdown (the figure's values, the own-reference values, the drop-one line) and CSV rows."""
    title = {m: METHOD_TITLES.get(m, m) for m in methods}
    at = {(p["k"], p["method"]): p for p in points}
    own = all(p["own_reference_value"] is not None for p in points)
    heldout = own and all(p["heldout_value"] is not None for p in points)
    header = ["k shards", "shards"]
    for m in methods:
        header += [f"{title[m]} {metric}", f"{title[m]} change vs 1 shard"]
    if own:
        for m in methods:
            header += [f"{title[m]} {metric} vs own shards", f"{title[m]} own change vs 1 shard"]
    if heldout:
        header += [f"held-out test images {metric} vs own shards", "held-out change vs 1 shard"]
    rows = [header]
    for k in range(1, n + 1):
        row = [str(k), " ".join(str(s) for s in at[(k, methods[0])]["shards"])]
        for m in methods:
            row += [f"{at[(k, m)]['value']:.4f}", f"{at[(k, m)]['relative_change']:+.4f}"]
        if own:
            for m in methods:
                p = at[(k, m)]
                row += [f"{p['own_reference_value']:.4f}", f"{p['own_reference_relative_change']:+.4f}"]  # fmt: skip
        if heldout:
            p = at[(k, methods[0])]
            row += [f"{p['heldout_value']:.4f}", f"{p['heldout_relative_change']:+.4f}"]
        rows.append(row)

    def table(columns: list[int], percent: set[int]) -> str:
        lines = ["| " + " | ".join(header[c] for c in columns) + " |", "|" + "---|" * len(columns)]
        for row in rows[1:]:
            cells = [f"{100 * float(row[c]):+.1f}%" if c in percent else row[c] for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    main = [0, 1, *range(2, 2 + 2 * len(methods))]
    text = [
        f"# Fig. 2: adding (and, right to left, dropping) shards of {experiment}\n",
        f"{metric} of {num_samples} samples per model against the union of all {n} shards' data "
        f"(lower is better); change = {metric}(k) / {metric}(1) - 1. The k-shard model composes "
        f"shards [0..k-1]; its router is the {n}-shard router restricted to those k shards (the "
        f"exact Bayes restriction of P(shard | x_t) to the sub-mixture, not a router retrained on "
        f"k shards). k = 1 is one shard alone, the same model for every method.\n",
        table(main, set(main[3::2])),
        "",
    ]
    if own:
        extra = [0, 1, *range(2 + 2 * len(methods), len(header))]
        text += [
            "The same samples against the union of the *composed* shards' data only (no penalty "
            "for the classes of shards not yet added)"
            + (
                "; last columns: the dataset's held-out test images of those shards' classes "
                "(real images no model saw; about a perfect model's score, up to sample size):\n"
                if heldout
                else ":\n"
            ),
            table(extra, set(extra[3::2])),
            "",
        ]
    drops = ", ".join(f"{title[m]} {100 * _drop(points, m, n, 'value'):+.1f}%" for m in methods)
    text.append(
        f"Dropping one of {n} shards (the last added, shard {at[(n, methods[0])]['shards'][-1]}): "
        f"{metric}({n - 1}) / {metric}({n}) - 1 = {drops} (paper: FID up by at most "
        f"{100 * PAPER_DROP_ONE:.0f}%)."
    )
    return "\n".join(text) + "\n", rows


def plot_png(points: list[dict], methods: list[str], metric: str, experiment: str) -> bytes:
    """Relative change (%) vs number of shards, one line per method (paper Fig. 2); a second
    panel against the composed shards' own data when those values exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("relative_change", f"{metric} vs all shards' data")]
    if all(p["own_reference_value"] is not None for p in points):
        panels.append(("own_reference_relative_change", f"{metric} vs the composed shards' data"))
    width, height = FIGURE_INCHES
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), dpi=FIGURE_DPI)
    for ax, (key, subtitle) in zip(np.atleast_1d(axes), panels, strict=True):
        for m in methods:
            mine = sorted((p["k"], p[key]) for p in points if p["method"] == m)
            ks = [k for k, _ in mine]
            ax.plot(ks, [100 * v for _, v in mine], marker="o", label=METHOD_TITLES.get(m, m))
        if key == "own_reference_relative_change" and all(p["heldout_value"] for p in points):
            mine = sorted({(p["k"], p["heldout_relative_change"]) for p in points})
            ax.plot([k for k, _ in mine], [100 * v for _, v in mine], color="gray", ls=":",
                    marker=".", label="held-out test images (floor)")  # fmt: skip
        ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(ks)
        ax.set_xlabel("number of shards composed (right to left: shards forgotten)")
        ax.set_ylabel(f"change in {metric} vs 1 shard (%)")
        ax.set_title(subtitle, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"{experiment}: adding shards one by one (paper Fig. 2)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
