"""The paper's Table 1: compartmentalized models vs the monolithic paragon, as the number of
shards grows (1, 2, 4, 8) and for each composition method (classifier, naive average, random, and
``compartmental``: the router made of per-shard heads, ``cdm.models.compartmental``).

``run_table1`` walks the experiments ``<dataset>_<n>split``: the config ``experiment/<name>``
when one is on the search path (shipped, ``--config-dir`` or ``hydra.searchpath``), else the
config's own data (``data=npz data.root=...``) with ``sharding.n_shards=n``. It trains only what the store lacks
(backbone, shards, router, paragon: every job skips an existing artifact), draws samples only when
the stored ones are stale, evaluates them, and writes the table as Markdown and CSV into
``<root>/tables/<name>/`` (and to W&B when the wandb logger is on).
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from cdm.core.identity import ADAPTER_JOBS
from cdm.core.logging import console_logging, get_logger
from cdm.core.names import ShardId
from cdm.data.datasets import dataset_from_config
from cdm.jobs.context import identity_of, trainer_device
from cdm.jobs.evaluate import run_evaluation
from cdm.jobs.run import run_job
from cdm.jobs.sample import run_sampling
from cdm.store import ArtifactStore, make_card
from cdm.store.artifact import save_artifact
from cdm.store.layout import GRID_FILE, WEIGHTS_PLOT_FILE
from cdm.store.staleness import stale_reason
from cdm.store.stats import KID_NOTE

log = get_logger(__name__)

METHOD_TITLES = {"classifier": "Classifier", "compartmental": "Compartmental",
                 "average": "Naive Avg", "random": "Random"}  # fmt: skip


# top-level keys conf/table1.yaml and conf/fig2.yaml set for every job (which compose conf/eval.yaml)
FORWARDED = ("num_samples", "batch_size", "steps", "evaluate.feature_spaces")


def forwarded_overrides(cfg: DictConfig) -> list[str]:
    """``key=value`` for the keys of ``FORWARDED`` as this config holds them."""
    out = []
    for key in FORWARDED:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_list(value):
            value = "[" + ",".join(str(v) for v in value) + "]"
        out.append(f"{key}={value}")
    return out


def searchpath_overrides() -> list[str]:
    """The running command's ``hydra.searchpath`` (a user's config directories) as an override for
    the inner composes (``--config-dir`` is on the search path of every compose already)."""
    if not HydraConfig.initialized():
        return []
    paths = list(HydraConfig.get().searchpath or [])
    return [f"hydra.searchpath={json.dumps(paths)}"] if paths else []


def has_experiment(name: str, searchpath: tuple[str, ...]) -> bool:
    """Whether ``experiment/<name>`` is on the search path (``searchpath``: its overrides)."""
    try:
        compose(config_name="eval", overrides=[f"experiment={name}", *searchpath])
    except MissingConfigException:
        return False
    return True


def select_experiment(experiment: str) -> list[str]:
    """Overrides that select one experiment of a sweep: ``experiment=<name>`` when that config
    exists, else ``<dataset>_<n>split`` on the config's data: ``experiment_name=<name>
    sharding.n_shards=<n>``."""
    searchpath = searchpath_overrides()
    if has_experiment(experiment, tuple(searchpath)):
        return [f"experiment={experiment}", *searchpath]
    match = re.fullmatch(r"(.+)_(\d+)split", experiment)
    if match is None:
        raise ValueError(
            f"no experiment config {experiment!r} on the search path, and the name is not "
            "<dataset>_<n>split: add experiment/<name>.yaml to a --config-dir, or name it "
            "<dataset>_<n>split to shard the config's data into n"
        )
    return [f"experiment_name={experiment}", f"sharding.n_shards={match.group(2)}", *searchpath]


def experiment_config(experiment: str, overrides: list[str], extra: list[str]) -> DictConfig:
    """The composed ``eval`` config of one experiment (``select_experiment``) with the user's and
    the job's overrides."""
    return compose(
        config_name="eval", overrides=[*select_experiment(experiment), *overrides, *extra]
    )


def dataset_name(cfg: DictConfig) -> str:
    """The name the loaded ``cfg.data`` gives itself (an ``.npz`` is named by its file stem)."""
    return str(dataset_from_config(OmegaConf.to_container(cfg.data, resolve=True)).name)


def stage_config(experiment: str, overrides: list[str], stage: str, index: int) -> DictConfig:
    """The composed config of one training job; overrides of the ``adapter`` group (e.g.
    ``adapter=full``) reach only the stages that train an adapter (shard, paragon)."""
    if stage not in ADAPTER_JOBS:
        overrides = [
            o for o in overrides if not o.lstrip("+~").startswith(("adapter=", "adapter."))
        ]
    return experiment_config(experiment, overrides, [f"stage={stage}", f"shard.index={index}"])


def train_missing(
    experiment: str, overrides: list[str], stages: list[tuple[str, int]], n_jobs: int
) -> None:
    """Train the jobs ``[(stage, shard index)]`` that the store lacks (each job checks itself)."""
    configs = [stage_config(experiment, overrides, stage, index) for stage, index in stages]
    if n_jobs > 1 and len(configs) > 1:
        from joblib import Parallel, delayed

        # resolved first: worker processes do not have this process's OmegaConf resolvers
        resolved = [OmegaConf.to_container(c, resolve=True) for c in configs]
        Parallel(n_jobs=n_jobs, backend="loky")(delayed(_run_resolved)(c) for c in resolved)
    else:
        for c in configs:
            run_job(c)


def current_adapter(
    store: ArtifactStore, experiment: str, k: int, config: DictConfig | None = None
) -> bool:
    """Shard k's adapter is stored and not stale (its manifest unchanged since it was trained)
    and, given its job's ``config``, was made by that job (not e.g. LoRA when adapter=full: such a
    shard is left to its job, which refuses it with the differing keys)."""
    job = ShardId(k).name
    if not store.has_adapter(experiment, job):
        return False
    card = store.read_adapter_card(experiment, job)
    made_by = card.get("signature")  # None on cards of older stores: not checked
    if config is not None and made_by is not None and made_by != identity_of(config).hash:
        return False
    return stale_reason(store, experiment, card) is None


def train_backbone_and_shards(
    experiment: str, overrides: list[str], store: ArtifactStore, stored: str, n: int,
    retrain: bool, n_jobs: int, check_job: bool = True,
) -> list[int]:  # fmt: skip
    """Train ``experiment``'s backbone and those of its shards 0..n-1 that the store (where the
    experiment is named ``stored``) lacks or holds stale (every shard with ``retrain``);
    ``check_job``: a stored shard must also have been made by this config's job
    (``current_adapter``). Returns the shards trained."""
    train_missing(experiment, overrides, [("backbone", 0)], 1)
    missing = [
        k for k in range(n)
        if retrain or not current_adapter(
            store, stored, k,
            stage_config(experiment, overrides, "shard", k) if check_job else None,
        )
    ]  # fmt: skip
    if len(missing) < n:
        log.info("%s of %s shards of %s are in the store already", n - len(missing), n, experiment)
    train_missing(experiment, overrides, [("shard", k) for k in missing], n_jobs)
    return missing


def sample_and_evaluate(
    experiment: str, overrides: list[str], draws: dict[str, list[str]]
) -> tuple[dict[str, dict], DictConfig]:
    """Draw each samples set ``{name: its overrides}`` (e.g. ``composition=...``, ``shards=[...]``;
    the table's own sets, redrawn only when stale, replaced when drawn with other settings) and
    evaluate them all: ``({name: evaluation card}, the evaluation's config)``."""
    for name, extra in draws.items():
        run_sampling(
            experiment_config(experiment, overrides, [*extra, f"name={name}", "overwrite=true"])
        )
    ecfg = experiment_config(experiment, overrides, [f"evaluate.samples=[{','.join(draws)}]"])
    return dict(zip(draws, run_evaluation(ecfg), strict=True)), ecfg


def checked_choices(key: str, values: list[str], allowed: tuple[str, ...]) -> list[str]:
    """``values`` (the setting ``key``) when there is one and each is ``allowed``, else a clear
    error."""
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"{key}={values}: unknown {unknown}; choose from {list(allowed)}")
    return values


def evaluated_space(cfg: DictConfig, key: str) -> str:
    """The feature space the setting ``key`` names, checked to be in ``evaluate.feature_spaces``."""
    space = str(OmegaConf.select(cfg, key))
    if space not in cfg.evaluate.feature_spaces:
        raise ValueError(f"{key}={space} is not evaluated: add it to evaluate.feature_spaces")
    return space


def _run_resolved(config: dict) -> None:
    console_logging()  # a loky worker: Hydra configured logging in the parent only
    run_job(OmegaConf.create(config))


def plan(table: DictConfig, datasets: list[str]) -> list[dict[str, Any]]:
    """One entry per cell of the table: dataset, n shards, method, experiment and samples name."""
    cells = []
    for dataset in datasets:
        if table.paragon:
            n0 = int(table.splits[0])
            cells.append({"dataset": dataset, "n": 0, "method": "paragon",
                          "experiment": f"{dataset}_{n0}split", "samples": "paragon"})  # fmt: skip
        for n in table.splits:
            methods = ["average"] if int(n) == 1 else list(table.compositions)
            for method in methods:
                cells.append({"dataset": dataset, "n": int(n), "method": method,
                              "experiment": f"{dataset}_{n}split", "samples": method})  # fmt: skip
    return cells


def training_device_note(cfg: DictConfig) -> str | None:
    """A note when ``device=cuda`` samples on the GPU while ``cfg.trainer`` trains on the CPU."""
    if str(cfg.get("device", "cpu")).startswith("cuda") and trainer_device(cfg) == "cpu":
        return f"device={cfg.device} samples on the GPU; training stays on the CPU: add trainer=gpu"
    return None


def run_table1(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train what is missing, sample, evaluate, and write the table (see module docstring)."""
    started = time.perf_counter()
    table = cfg.table1
    store = ArtifactStore(cfg.paths.artifacts)
    datasets = [dataset_name(cfg)] if table.datasets is None else [str(d) for d in table.datasets]
    cells = plan(table, datasets)
    overrides = [*forwarded_overrides(cfg), *overrides]
    experiments = list(dict.fromkeys(c["experiment"] for c in cells))  # in table order
    timings: dict[str, float] = {}
    statistic, space = str(table.metric), evaluated_space(cfg, "table1.feature_space")
    if note := training_device_note(cfg):
        log.warning("table1: %s", note)
    for experiment in experiments:
        t0 = time.perf_counter()
        mine = [c for c in cells if c["experiment"] == experiment]
        n = mine[-1]["n"]
        log.info("table1: %s (%s shard(s)): train what is missing", experiment, n)
        train_backbone_and_shards(
            experiment, overrides, store, experiment, n, bool(cfg.retrain), int(table.n_jobs)
        )
        if n > 1 and any(c["method"] in ("classifier", "topk") for c in mine):
            train_missing(experiment, overrides, [("router", 0)], 1)
        if n > 1 and any(c["method"] == "compartmental" for c in mine):  # one head per shard
            heads = [("head", k) for k in range(n)]
            train_missing(experiment, overrides, heads, int(table.n_jobs))
        if any(c["method"] == "paragon" for c in mine):
            train_missing(experiment, overrides, [("paragon", 0)], 1)
        train_missing(
            experiment, overrides, [("feature_net", 0)], 1
        )  # shared by the dataset's experiments
        draws = {c["samples"]: [f"composition={c['method']}"] for c in mine}
        evals, ecfg = sample_and_evaluate(experiment, overrides, draws)
        for c, card in zip(mine, evals.values(), strict=True):
            c["metrics"] = card["metrics"]
            c["metric_name"] = card["metric_names"][space][statistic]
            c["value"] = card["metrics"][c["metric_name"]]
        for c in mine:  # the models behind each cell: steps and held-out loss when they stopped
            jobs = ["paragon"] if c["method"] == "paragon" else [ShardId(k).name for k in range(n)]
            c["training"] = training_record(store, str(ecfg.experiment_name), jobs)
        timings[experiment] = round(time.perf_counter() - t0, 1)
    markdown, rows = format_table(cells, list(table.splits), list(table.compositions))
    training_md, training_rows = format_training(cells)
    markdown += "\n" + training_md
    metric = ", ".join(dict.fromkeys(c["metric_name"] for c in cells))
    card = make_card(
        kind="table", name=str(table.name), metric=metric, cells=cells,
        wall_time_s=round(time.perf_counter() - started, 1), experiment_wall_time_s=timings,
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    written = save_table(
        store,
        str(table.name),
        markdown,
        rows,
        card,
        files={"training.csv": csv_bytes(training_rows)},
    )
    log_wandb(cfg, cells, rows, metric)
    print(markdown)
    log.info("table written to %s in %.0f s", written["path"], written["wall_time_s"])
    return written


def format_table(
    cells: list[dict], splits: list[int], methods: list[str]
) -> tuple[str, list[list[str]]]:
    """The paper's layout: one row per dataset; No split (paragon), then each split's methods.

    Each cell holds ``value`` (its metric) and ``metric_name`` (e.g. ``FD_digits``).
    """
    header = ["Dataset"]
    columns: list[tuple[int, str]] = []
    if any(c["method"] == "paragon" for c in cells):
        header.append("No split: Paragon")
        columns.append((0, "paragon"))
    for n in splits:
        for m in ["average"] if int(n) == 1 else methods:
            header.append("1 shard" if int(n) == 1 else f"{n}-Splits: {METHOD_TITLES.get(m, m)}")
            columns.append((int(n), m))
    rows = [header]
    for dataset in dict.fromkeys(c["dataset"] for c in cells):
        value = {(c["n"], c["method"]): c.get("value") for c in cells if c["dataset"] == dataset}
        rows.append([dataset] + [_fmt(value.get(col)) for col in columns])
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    if (0, "paragon") in columns:  # each cell over the paragon's value (1.0 = as good)
        lines += ["", "Ratio to the paragon", "", lines[0], lines[1]]
        for dataset in dict.fromkeys(c["dataset"] for c in cells):
            value = {
                (c["n"], c["method"]): c.get("value") for c in cells if c["dataset"] == dataset
            }
            ref = value.get((0, "paragon"))
            ratios = [None if v is None or not ref else v / ref for v in map(value.get, columns)]
            lines.append("| " + " | ".join([dataset, *map(_fmt, ratios)]) + " |")
    names = ", ".join(dict.fromkeys(c.get("metric_name", "?") for c in cells))
    title = f"{names} (lower is better; samples per cell: see each evaluation card)"
    note = f"\n{KID_NOTE}\n" if "KID" in names else ""
    return title + "\n\n" + "\n".join(lines) + "\n" + note, rows


def training_record(store: ArtifactStore, experiment: str, jobs: list[str]) -> list[dict]:
    """Each job's optimizer steps, why it stopped and its final held-out denoising loss (its
    card: ``cdm.training.callbacks.Convergence``; None on cards of older stores)."""
    out = []
    for job in jobs:
        card = store.read_adapter_card(experiment, job)
        rule = card.get("convergence") or {}
        steps = card.get("optimizer_steps", (card.get("metrics") or {}).get("global_step"))
        out.append({"experiment": experiment, "job": job, "optimizer_steps": steps,
                    "stopped_by": rule.get("stopped_by"), "heldout_loss": rule.get("heldout_loss")})  # fmt: skip
    return out


def format_training(cells: list[dict]) -> tuple[str, list[list[str]]]:
    """The trained models behind the table (Markdown, one line per cell's models) and one CSV row
    per job: did every model get to converge, and how many steps did it take."""
    rows = [["dataset", "experiment", "job", "optimizer_steps", "stopped_by", "heldout_loss"]]
    lines = ["Training (optimizer steps; held-out denoising loss on the data's test split when "
             "training stopped)", "", "| Dataset | Models | Steps | Held-out loss | Stopped by |",
             "|---|---|---|---|---|"]  # fmt: skip
    seen = set()
    for c in cells:
        runs = c.get("training") or []
        key = (c["dataset"], c["experiment"], tuple(r["job"] for r in runs))
        if not runs or key in seen:
            continue
        seen.add(key)
        for r in runs:
            rows.append([c["dataset"], r["experiment"], r["job"], str(r["optimizer_steps"]),
                         str(r["stopped_by"]), _fmt(r["heldout_loss"], 4)])  # fmt: skip
        steps = sorted(int(r["optimizer_steps"] or 0) for r in runs)
        losses = [r["heldout_loss"] for r in runs if r["heldout_loss"] is not None]
        models = "paragon" if c["method"] == "paragon" else f"{c['n']} shard(s)"
        span = str(steps[0]) if steps[0] == steps[-1] else f"{steps[0]}-{steps[-1]}"
        loss = _fmt(sum(losses) / len(losses), 4) if losses else "-"
        why = ", ".join(sorted({str(r["stopped_by"]) for r in runs}))
        lines.append(f"| {c['dataset']} | {models} | {span} | {loss} | {why} |")
    return "\n".join(lines) + "\n", rows


def csv_bytes(rows: list[list[str]]) -> bytes:
    """``rows`` as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def save_table(
    store: ArtifactStore, name: str, markdown: str, rows: list[list[str]], card: dict,
    stem: str = "table", files: dict[str, bytes] | None = None,
) -> dict:  # fmt: skip
    """Write ``<stem>.md``, ``<stem>.csv``, any extra ``files`` (e.g. a plot) and the card under
    ``<root>/tables/<name>/`` atomically."""
    final = store.table_dir(name)
    tables = {f"{stem}.md": markdown.encode("utf-8"), f"{stem}.csv": csv_bytes(rows)}
    return save_artifact(
        final, {**card, "path": str(final)}, weights=None, files={**tables, **(files or {})}
    )


def cell_label(cell: dict) -> str:
    """A Table 1 cell as W&B names it: ``digits 4-split classifier`` or ``digits paragon``."""
    if cell["n"]:
        return f"{cell['dataset']} {cell['n']}-split {cell['method']}"
    return f"{cell['dataset']} paragon"


def log_wandb(
    cfg: DictConfig, cells: list[dict], rows: list[list[str]], metric: str,
    name: str | None = None, job_type: str = "table1",
    label: Callable[[dict], str] = cell_label, plot: str | None = None,
) -> list[str]:  # fmt: skip
    """W&B (offline unless WANDB_API_KEY is set): one run per experiment in the experiment's group
    with its sample grids, router-weight plots and metrics; one run (``job_type``, named ``name``,
    default ``table1.name``) with the table, the metric (each cell's ``value``) per cell named by
    ``label``, and the ``plot`` PNG when given. Returns the run directories."""
    if not (cfg.logger and cfg.logger.get("wandb")):
        return []
    import os

    import wandb

    store = ArtifactStore(cfg.paths.artifacts)
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    spec = cfg.logger.wandb
    run_dirs = []
    for experiment in dict.fromkeys(c["experiment"] for c in cells):
        run = wandb.init(project=spec.project, group=experiment, job_type="eval", mode=mode,
                         name=f"{experiment}-eval", dir=str(store.root), reinit="create_new")  # fmt: skip
        for c in (c for c in cells if c["experiment"] == experiment):
            directory = store.samples_dir(experiment, c["samples"])
            logged = {f"samples/{c['samples']}": wandb.Image(str(directory / GRID_FILE))}
            if c["method"] in ("classifier", "topk", "knn"):
                logged[f"router_weights/{c['samples']}"] = wandb.Image(
                    str(directory / WEIGHTS_PLOT_FILE)
                )
            logged.update({f"{c['samples']}/{k}": v for k, v in c["metrics"].items()
                           if isinstance(v, int | float)})  # fmt: skip
            run.log(logged)
        run_dirs.append(run.dir)
        run.finish()
    name = str(cfg.table1.name) if name is None else name
    run = wandb.init(project=spec.project, group=job_type, job_type=job_type, mode=mode,
                     name=name, dir=str(store.root), reinit="create_new")  # fmt: skip
    run.log({job_type: wandb.Table(columns=rows[0], data=rows[1:])})
    if plot is not None:
        run.log({f"{job_type}_plot": wandb.Image(plot)})
    per_method = wandb.Table(
        columns=["cell", metric], data=[[label(c), c.get("value")] for c in cells]
    )
    run.log(
        {
            "metric_per_method": wandb.plot.bar(
                per_method, "cell", metric, title=f"{metric} per method"
            )
        }
    )
    run_dirs.append(run.dir)
    run.finish()
    return run_dirs
