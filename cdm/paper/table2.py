"""The paper's Table 2: how well compartmentalized text-to-image models follow their prompts,
against the monolithic paragon and the base model, on shards cut by a quality score.

The paper shards MSCOCO by aesthetic score (AE6+, AE6-, AE5-) and scores with TIFA. Here the data
are the embedded captioned canvases (``experiment=captioned_3band``: three bands of a known
quality score, ``cdm.data.captioned``) and the score is **TIFA-domain**: TIFA's protocol
(``cdm.eval.tifa``) with ``DomainVQA``, a VQA trained on the captioned train split's ground-truth
attributes. It is never plain "TIFA": its own accuracy on the real test canvases (the ceiling of
any score it gives) is reported beside the table.

Rows: the base model (the safe backbone alone, ``composition=base``), the paragon, each shard
alone, every pair, all shards. Columns for two or more shards: each composition method
(classifier router restricted to the subset, naive average, random; ``knn`` when listed). One
shard alone is one model whatever the method: one sample set. Each sample's prompt is a test
caption (``prompts.json`` of the samples artifact gives its test row), so its questions come from
that canvas's attributes. Per cell: TIFA-domain overall and per element type, and FD in the
domain feature net's space (``FD_<dataset>``, ``cdm-eval``).

``run_table2`` trains only what the store lacks (backbone, shards, router / k-NN centroids,
paragon, feature net, the VQA), redraws stale samples, and writes ``<root>/tables/<name>/``:
``table.md``, ``table.csv``, ``table2.png`` (TIFA-domain per subset and method; base, paragon and
the ceiling as lines) and a card with the command, time and machine; W&B when logger=wandb.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.hashing import sha256_bytes
from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.data.captioned import CaptionedDataset
from cdm.data.datasets import dataset_from_config
from cdm.eval.tifa import (
    ELEMENT_TYPES,
    ChoiceMatcher,
    DomainVQA,
    TifaQuestion,
    TifaResult,
    domain_vqa_accuracy,
    questions_from_attributes,
    tifa_score,
    train_domain_vqa,
)
from cdm.jobs.context import device_description
from cdm.jobs.evaluate import load_samples
from cdm.jobs.feature_net import feature_net_train_split
from cdm.jobs.pipeline import shard_indices
from cdm.paper.table1 import (
    METHOD_TITLES,
    checked_choices,
    evaluated_space,
    experiment_config,
    forwarded_overrides,
    log_wandb,
    sample_and_evaluate,
    save_table,
    train_backbone_and_shards,
    train_missing,
)
from cdm.store import ArtifactStore, make_card
from cdm.store.artifact import load_config, load_tensors, save_artifact, verify_weights
from cdm.store.cards import CARD_FILENAME
from cdm.store.io import read_card
from cdm.store.samples import read_samples_file

log = get_logger(__name__)

COMPOSITIONS = ("classifier", "average", "random", "knn")  # methods that compose a shard subset
ROUTERS = {"classifier": ("router", 0), "knn": ("knn", 0)}  # the job each routed method needs
PROMPTS_FILE = "prompts.json"
VQA_WEIGHTS, VQA_CONFIG = "vqa.safetensors", "vqa_config.json"
FIGURE_DPI = 100


def shard_subsets(shards: list[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``shards``: singles, then pairs, ..., then all of them."""
    return [s for k in range(1, len(shards) + 1) for s in itertools.combinations(shards, k)]


def plan(
    name: str, shards: list[int], methods: list[str], base: bool, paragon: bool
) -> list[dict[str, Any]]:
    """One entry per cell: row, shards, method, the composition drawn and the samples name."""
    cells = []
    if base:
        cells.append({"row": "base", "shards": [], "method": "one model", "composition": "base",
                      "samples": f"{name}-base"})  # fmt: skip
    if paragon:
        cells.append({"row": "paragon", "shards": [], "method": "one model",
                      "composition": "paragon", "samples": f"{name}-paragon"})  # fmt: skip
    for subset in shard_subsets(shards):
        tag = "s" + "".join(str(k) for k in subset)
        row = " + ".join(ShardId(k).name for k in subset)
        if len(subset) == 1:  # one shard: weight 1 whatever the method
            cells.append({"row": row, "shards": list(subset), "method": "one model",
                          "composition": "average", "samples": f"{name}-{tag}"})  # fmt: skip
            continue
        for m in methods:
            cells.append({"row": row, "shards": list(subset), "method": m, "composition": m,
                          "samples": f"{name}-{m}-{tag}"})  # fmt: skip
    return cells


def captioned_dataset(cfg: DictConfig) -> CaptionedDataset:
    """The experiment's captioned dataset (with ground-truth attributes), or a clear error."""
    dataset = dataset_from_config(OmegaConf.to_container(cfg.data, resolve=True))
    if not isinstance(dataset, CaptionedDataset):
        raise ValueError(
            f"table2 scores prompts with TIFA-domain, which needs captions with ground-truth "
            f"attributes; data={cfg.data.name} has none: use an experiment on data=captioned "
            f"(table2.experiment=captioned_3band)"
        )
    return dataset


def domain_vqa(
    store: ArtifactStore, dataset: CaptionedDataset, spec: DictConfig
) -> tuple[DomainVQA, dict]:
    """The TIFA-domain VQA trained with ``spec`` (epochs, width, seed) on ``dataset``'s train split
    minus every id forgotten in the store (as a feature net is, ``feature_net_train_split``): from
    the store when one was trained on these ids and settings, else trained and saved there
    (``feature_nets/<dataset>-vqa-seed<seed>-<hash>``, listed and checked like a feature net)."""
    train, data_hash, excluded = feature_net_train_split(store, dataset)
    settings = {"epochs": int(spec.epochs), "width": int(spec.width), "seed": int(spec.seed)}
    key_hash = sha256_bytes(json.dumps({**settings, "train": data_hash}, sort_keys=True).encode())
    directory = store.feature_net_dir(f"{dataset.name}-vqa-seed{settings['seed']}-{key_hash[:8]}")
    remedy = f"delete {directory} to train it again"
    if (directory / CARD_FILENAME).is_file():
        card = read_card(directory)
        verify_weights(directory, card, remedy)
        config = load_config(directory, card, VQA_CONFIG, "config_sha256", "VQA", remedy)
        model = DomainVQA(**config)
        model.load_state_dict(load_tensors(directory, card))
        return model.eval(), card
    started = time.perf_counter()
    log.info("table2: training the TIFA-domain VQA on %s train canvases", len(train))
    model = train_domain_vqa(dataset, **settings, indices=train)
    card = make_card(
        kind="domain_vqa", name=directory.name, metric=model.metric_name, dataset=dataset.name,
        train_ids_hash=data_hash, forgotten_excluded=excluded, settings=settings,
        device=device_description("cpu"), wall_time_s=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    card = save_artifact(
        directory, card, tensors={k: v.contiguous() for k, v in model.state_dict().items()},
        weights_file=VQA_WEIGHTS, config=model.config(), config_file=VQA_CONFIG,
    )  # fmt: skip
    return model, card


def sample_questions(
    dataset: CaptionedDataset, prompts: list[dict[str, Any]]
) -> tuple[list[int], list[TifaQuestion]]:
    """(the samples that have questions, their questions): sample j's prompt is test caption
    ``test_row``, so its questions come from that canvas's attributes (keyed ``"{j:06d}"``);
    a prompt that is no test caption (``test_row`` null) has none."""
    test = [i for i, s in enumerate(dataset.splits) if s == "test"]
    scored, questions = [], []
    for j, p in enumerate(prompts):
        if p.get("test_row") is None:
            continue
        row = test[int(p["test_row"])]
        if p["caption"] != dataset.captions[row]:
            raise ValueError(
                f"sample {j}'s prompt {p['caption']!r} is not test caption {p['test_row']} "
                f"({dataset.captions[row]!r}): the samples were drawn on other data; redraw them"
            )
        scored.append(j)
        questions += questions_from_attributes(
            f"{j:06d}", p["caption"], dataset.attributes[row], dataset.colors
        )
    return scored, questions


def samples_tifa(
    store: ArtifactStore,
    experiment: str,
    name: str,
    dataset: CaptionedDataset,
    vqa: DomainVQA,
    matcher: ChoiceMatcher | None = None,
) -> TifaResult:
    """TIFA-domain of the samples artifact ``name``: each sample answered about its own prompt."""
    images, _, _ = load_samples(store, experiment, name)
    data, _ = read_samples_file(store, experiment, name, PROMPTS_FILE)
    prompts = json.loads(data)
    if len(prompts) != len(images):
        raise ValueError(f"samples {name!r}: {len(images)} images but {len(prompts)} prompts")
    scored, questions = sample_questions(dataset, prompts)
    if not questions:
        raise ValueError(
            f"samples {name!r}: no prompt is a test caption, so TIFA-domain has no questions; "
            "draw them with the default prompts (the test split's captions)"
        )
    x = torch.from_numpy(images).float() / 127.5 - 1.0
    by_id = {f"{j:06d}": x[j] for j in scored}
    return tifa_score(by_id, questions, vqa, matcher=matcher or ChoiceMatcher())


def shard_label(store: ArtifactStore, experiment: str, k: int) -> str:
    """``shard-02 (score 1.0)``: the shard and its score band (``sharding=by_score``)."""
    meta = store.load_manifest(experiment, ShardId(k).name).get("meta") or {}
    lo, hi = meta.get("score_min"), meta.get("score_max")
    if lo is None:
        return ShardId(k).name
    band = f"{lo:.2g}" if lo == hi else f"{lo:.2g}-{hi:.2g}"
    return f"{ShardId(k).name} (score {band})"


def run_table2(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train what is missing, sample, score, and write the table (see module docstring)."""
    started = time.perf_counter()
    spec = cfg.table2
    methods = checked_choices(
        "table2.compositions", [str(m) for m in spec.compositions], COMPOSITIONS
    )
    space = evaluated_space(cfg, "table2.feature_space")
    experiment = str(spec.experiment)
    overrides = [*forwarded_overrides(cfg), *overrides]
    base_cfg = experiment_config(experiment, overrides, [])
    n, stored = int(base_cfg.sharding.n_shards), str(base_cfg.experiment_name)
    dataset = captioned_dataset(base_cfg)
    store = ArtifactStore(cfg.paths.artifacts)
    log.info("table2: %s (%s shards): train what is missing", experiment, n)
    train_backbone_and_shards(
        experiment, overrides, store, stored, n, bool(cfg.retrain), int(spec.n_jobs)
    )
    for job in dict.fromkeys(ROUTERS[m] for m in methods if m in ROUTERS):
        train_missing(experiment, overrides, [job], 1)
    if spec.paragon:
        train_missing(experiment, overrides, [("paragon", 0)], 1)
    train_missing(experiment, overrides, [("feature_net", 0)], 1)
    vqa, vqa_card = domain_vqa(store, dataset, spec.vqa)
    ceiling = domain_vqa_accuracy(vqa, dataset, "test").summary()
    cells = plan(str(spec.name), shard_indices(store, stored), methods, bool(spec.base),
                 bool(spec.paragon))  # fmt: skip
    draws = {c["samples"]: [f"composition={c['composition']}"] for c in cells}
    for c in cells:
        if c["shards"]:
            draws[c["samples"]].append(f"shards=[{','.join(str(k) for k in c['shards'])}]")
    evals, ecfg = sample_and_evaluate(experiment, overrides, draws)
    fd_name = evals[cells[0]["samples"]]["metric_names"][space]["FD"]
    matcher = ChoiceMatcher()
    scores = {name: samples_tifa(store, stored, name, dataset, vqa, matcher) for name in draws}
    for c in cells:
        result = scores[c["samples"]]
        c["label"] = {"base": "Base (safe backbone alone)", "paragon": "Paragon (all shards' data)"}.get(
            c["row"], " + ".join(shard_label(store, stored, k) for k in c["shards"])
        )  # fmt: skip
        c["experiment"] = stored
        c["value"] = result.score
        c["per_element_type"] = result.per_element_type
        c["per_caption"] = result.per_caption
        c["n_questions"] = result.n_questions
        c["fd"] = evals[c["samples"]]["metrics"][fd_name]
        c["metrics"] = {result.metric: result.score, fd_name: c["fd"],
                        **{f"{result.metric}/{k}": v for k, v in result.per_element_type.items()}}  # fmt: skip
    metric = vqa.metric_name
    markdown, rows = format_table2(cells, methods, metric, fd_name, ceiling, int(ecfg.num_samples))
    figure = plot_png(cells, methods, metric, ceiling["score"], stored)
    card = make_card(
        kind="table", name=str(spec.name), table="table2", experiment=stored, metric=metric,
        fd_metric=fd_name, cells=cells, vqa=vqa_card["name"], vqa_ceiling=ceiling,
        command=" ".join(sys.argv), device=device_description(cfg.get("device", "cpu")),
        wall_time_s=round(time.perf_counter() - started, 1),
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    written = save_table(store, str(spec.name), markdown, rows, card,
                         files={"table2.png": figure})  # fmt: skip
    log_wandb(cfg, cells, rows, metric, str(spec.name), "table2",
              lambda c: f"{c['row']} {c['method']}", written["path"] + "/table2.png")  # fmt: skip
    print(markdown)
    log.info("table written to %s in %.0f s", written["path"], written["wall_time_s"])
    return written


def _fmt(value: float | None, digits: int = 3) -> str:
    """``digits`` decimals, or ``digits`` significant digits for values below 0.1 (an FD in a
    small-scale feature space would otherwise print as 0.000)."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if 0 < abs(value) < 0.1 else f"{value:.{digits}f}"


def format_table2(
    cells: list[dict], methods: list[str], metric: str, fd_name: str, ceiling: dict, n: int
) -> tuple[str, list[list[str]]]:
    """Markdown (the paper's layout: a row per model or shard subset, a column per method, for
    TIFA-domain then FD; then every cell per element type) and one CSV row per cell."""
    columns = ["one model", *methods]
    titles = ["One model", *(METHOD_TITLES.get(m, m) for m in methods)]
    out = []
    for key, title in (("value", f"{metric} (higher is better)"),
                       ("fd", f"{fd_name} (lower is better)")):  # fmt: skip
        lines = [f"{title}; {n} samples per cell, prompted by the test captions in order", "",
                 "| Model | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]  # fmt: skip
        for label in dict.fromkeys(c["label"] for c in cells):
            value = {c["method"]: c[key] for c in cells if c["label"] == label}
            lines.append(f"| {label} | " + " | ".join(_fmt(value.get(m)) for m in columns) + " |")
        out.append("\n".join(lines))
    types = [t for t in ELEMENT_TYPES if any(t in c["per_element_type"] for c in cells)]
    header = ["model", "shards", "method", "samples", metric,
              *(f"{metric} {t}" for t in types), fd_name, "n_questions"]  # fmt: skip
    rows = [header]
    lines = [f"{metric} per element type", "", "| Model | Method | " + " | ".join(types)
             + f" | {metric} | {fd_name} |", "|---|---|" + "---|" * (len(types) + 2)]  # fmt: skip
    for c in cells:
        per = [c["per_element_type"].get(t) for t in types]
        rows.append([c["label"], " ".join(map(str, c["shards"])), c["method"], c["samples"],
                     _fmt(c["value"], 4), *(_fmt(v, 4) for v in per), _fmt(c["fd"], 4),
                     str(c["n_questions"])])  # fmt: skip
        lines.append(f"| {c['label']} | {c['method']} | " + " | ".join(map(_fmt, per))
                     + f" | {_fmt(c['value'])} | {_fmt(c['fd'])} |")  # fmt: skip
    out.append("\n".join(lines))
    real = ", ".join(f"{t} {_fmt(v)}" for t, v in ceiling["per_element_type"].items())
    out.append(
        f"Ceiling: {metric} of the real test canvases (the VQA's own accuracy) is "
        f"{_fmt(ceiling['score'])} ({real}); {metric} is TIFA's protocol with a VQA trained on "
        "this dataset's ground truth, not TIFA with its published VQA models."
    )
    out.append(verdict(cells, metric))
    return "\n\n".join(out) + "\n", rows


def paired_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """(mean, standard error) over the captions both cells scored of a's per-caption score minus
    b's: the same prompts, so the comparison is paired."""
    keys = sorted(a.keys() & b.keys())
    diff = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    if diff.size < 2:
        return float(diff.mean()) if diff.size else 0.0, float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


def verdict(cells: list[dict], metric: str) -> str:
    """Does the paper's claim (a CDM above the paragon) hold in this table? Decided on the paired
    per-caption difference of the best CDM and the paragon: above only when it exceeds twice its
    standard error (the best of many cells is biased upwards, so this is lenient, not strict)."""
    paragon = next((c for c in cells if c["row"] == "paragon"), None)
    composed = [c for c in cells if len(c["shards"]) > 1]
    if paragon is None or not composed:
        return "No paragon or no composed subset in this table: the paper's comparison is not made."
    best = max(composed, key=lambda c: c["value"])
    mean, se = paired_difference(best.get("per_caption", {}), paragon.get("per_caption", {}))
    if not np.isfinite(se) or abs(mean) <= 2 * se:
        outcome = "cannot be told apart here (the difference is within two standard errors)"
    else:
        outcome = "holds here" if mean > 0 else "does not hold here (the paragon is above)"
    return (
        f"Best CDM: {best['label']}, {best['method']}, {metric} {_fmt(best['value'])} vs the "
        f"paragon's {_fmt(paragon['value'])} (paired difference over captions {mean:+.3f} +/- "
        f"{se:.3f} s.e.): the paper's result (a CDM above the paragon) {outcome} (one seed)."
    )


def plot_png(
    cells: list[dict], methods: list[str], metric: str, ceiling: float, title: str
) -> bytes:
    """TIFA-domain per shard subset (x) and method (bars); base, paragon and the VQA's ceiling on
    real images as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = list(dict.fromkeys(c["label"] for c in cells if c["shards"]))
    bars = ["one model", *methods]
    width = 0.8 / len(bars)
    # 2.4 in more for the legend, right of the axes (inside, it hid the last bar group)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(subsets) + 2) + 2.4, 4.0), dpi=FIGURE_DPI)
    for b, m in enumerate(bars):
        value = {c["label"]: c["value"] for c in cells if c["method"] == m and c["shards"]}
        xs = [i for i, s in enumerate(subsets) if s in value]
        if xs:
            ax.bar([x + (b - (len(bars) - 1) / 2) * width for x in xs],
                   [value[subsets[x]] for x in xs], width, label=METHOD_TITLES.get(m, m))  # fmt: skip
    refs = [("paragon", "--", "black"), ("base", ":", "gray")]
    for row, style, color in refs:
        for c in (c for c in cells if c["row"] == row):
            ax.axhline(c["value"], ls=style, color=color, lw=1.2, label=c["label"])
    ax.axhline(ceiling, ls="-", color="green", lw=0.8, label="real test canvases (ceiling)")
    ax.set_xticks(range(len(subsets)))
    ax.set_xticklabels([s.replace(" + ", "\n+ ") for s in subsets], fontsize=7)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(f"{title}: {metric} per shard subset and method (paper Table 2)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
