"""The paper's Table 1: compartmentalized models vs the monolithic paragon, as the number of
shards grows (1, 2, 4, 8) and for each composition method (classifier, naive average, random).

``run_table1`` walks the experiments ``<dataset>_<n>split``, trains only what the store lacks
(backbone, shards, router, paragon: every job skips an existing artifact), draws samples only when
the stored ones are stale, evaluates them, and writes the table as Markdown and CSV into
``<root>/tables/<name>/`` (and to W&B when the wandb logger is on).
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from hydra import compose
from omegaconf import DictConfig, OmegaConf

from cdm.core.logging import console_logging, get_logger
from cdm.core.names import ShardId
from cdm.jobs.evaluate import run_evaluation
from cdm.jobs.run import run_job
from cdm.jobs.sample import run_sampling
from cdm.store import ArtifactStore, make_card
from cdm.store.artifact import save_artifact
from cdm.store.layout import GRID_FILE, WEIGHTS_PLOT_FILE
from cdm.store.staleness import stale_reason

log = get_logger(__name__)

METHOD_TITLES = {"classifier": "Classifier", "average": "Naive Avg", "random": "Random"}


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


def experiment_config(experiment: str, overrides: list[str], extra: list[str]) -> DictConfig:
    """The composed ``eval`` config of one experiment with the user's and the job's overrides."""
    return compose(config_name="eval", overrides=[f"experiment={experiment}", *overrides, *extra])


def train_missing(
    experiment: str, overrides: list[str], stages: list[tuple[str, int]], n_jobs: int
) -> None:
    """Train the jobs ``[(stage, shard index)]`` that the store lacks (each job checks itself)."""
    configs = [
        experiment_config(experiment, overrides, [f"stage={stage}", f"shard.index={index}"])
        for stage, index in stages
    ]
    if n_jobs > 1 and len(configs) > 1:
        from joblib import Parallel, delayed

        # resolved first: worker processes do not have this process's OmegaConf resolvers
        resolved = [OmegaConf.to_container(c, resolve=True) for c in configs]
        Parallel(n_jobs=n_jobs, backend="loky")(delayed(_run_resolved)(c) for c in resolved)
    else:
        for c in configs:
            run_job(c)


def current_adapter(store: ArtifactStore, experiment: str, k: int) -> bool:
    """Shard k's adapter is stored and not stale (its manifest unchanged since it was trained)."""
    job = ShardId(k).name
    if not store.has_adapter(experiment, job):
        return False
    return stale_reason(store, experiment, store.read_adapter_card(experiment, job)) is None


def _run_resolved(config: dict) -> None:
    console_logging()  # a loky worker: Hydra configured logging in the parent only
    run_job(OmegaConf.create(config))


def plan(table: DictConfig) -> list[dict[str, Any]]:
    """One entry per cell of the table: dataset, n shards, method, experiment and samples name."""
    cells = []
    for dataset in table.datasets:
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


def run_table1(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Train what is missing, sample, evaluate, and write the table (see module docstring)."""
    started = time.perf_counter()
    table = cfg.table1
    store = ArtifactStore(cfg.paths.artifacts)
    cells = plan(table)
    overrides = [*forwarded_overrides(cfg), *overrides]
    experiments = list(dict.fromkeys(c["experiment"] for c in cells))  # in table order
    timings: dict[str, float] = {}
    statistic, space = str(table.metric), str(table.feature_space)
    if space not in cfg.evaluate.feature_spaces:
        raise ValueError(
            f"table1.feature_space={space} is not evaluated: add it to evaluate.feature_spaces"
        )
    for experiment in experiments:
        t0 = time.perf_counter()
        mine = [c for c in cells if c["experiment"] == experiment]
        n = mine[-1]["n"]
        log.info("table1: %s (%s shard(s)): train what is missing", experiment, n)
        train_missing(experiment, overrides, [("backbone", 0)], 1)
        missing = [k for k in range(n) if cfg.retrain or not current_adapter(store, experiment, k)]
        if len(missing) < n:
            log.info(
                "%s of %s shards of %s are in the store already", n - len(missing), n, experiment
            )
        train_missing(experiment, overrides, [("shard", k) for k in missing], int(table.n_jobs))
        if n > 1 and any(c["method"] in ("classifier", "topk") for c in mine):
            train_missing(experiment, overrides, [("router", 0)], 1)
        if any(c["method"] == "paragon" for c in mine):
            train_missing(experiment, overrides, [("paragon", 0)], 1)
        train_missing(
            experiment, overrides, [("feature_net", 0)], 1
        )  # shared by the dataset's experiments
        for c in mine:
            run_sampling(
                experiment_config(
                    experiment, overrides, [f"composition={c['method']}", f"name={c['samples']}"]
                )
            )
        ecfg = experiment_config(
            experiment, overrides, [f"evaluate.samples=[{','.join(c['samples'] for c in mine)}]"]
        )
        for c, card in zip(mine, run_evaluation(ecfg), strict=True):
            c["metrics"] = card["metrics"]
            c["metric_name"] = card["metric_names"][space][statistic]
            c["value"] = card["metrics"][c["metric_name"]]
        timings[experiment] = round(time.perf_counter() - t0, 1)
    markdown, rows = format_table(cells, list(table.splits), list(table.compositions))
    metric = ", ".join(dict.fromkeys(c["metric_name"] for c in cells))
    card = make_card(
        kind="table", name=str(table.name), metric=metric, cells=cells,
        wall_time_s=round(time.perf_counter() - started, 1), experiment_wall_time_s=timings,
        config=OmegaConf.to_container(cfg, resolve=True),
    )  # fmt: skip
    written = save_table(store, str(table.name), markdown, rows, card)
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
    names = ", ".join(dict.fromkeys(c.get("metric_name", "?") for c in cells))
    title = f"{names} (lower is better; samples per cell: see each evaluation card)"
    return title + "\n\n" + "\n".join(lines) + "\n", rows


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def save_table(
    store: ArtifactStore, name: str, markdown: str, rows: list[list[str]], card: dict,
    stem: str = "table", files: dict[str, bytes] | None = None,
) -> dict:  # fmt: skip
    """Write ``<stem>.md``, ``<stem>.csv``, any extra ``files`` (e.g. a plot) and the card under
    ``<root>/tables/<name>/`` atomically."""
    final = store.table_dir(name)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    tables = {
        f"{stem}.md": markdown.encode("utf-8"),
        f"{stem}.csv": buffer.getvalue().encode("utf-8"),
    }
    return save_artifact(
        final, {**card, "path": str(final)}, weights=None, files={**tables, **(files or {})}
    )


def log_wandb(cfg: DictConfig, cells: list[dict], rows: list[list[str]], metric: str) -> list[str]:
    """W&B (offline unless WANDB_API_KEY is set): one run per experiment in the experiment's group
    with its sample grids, router-weight plots and metrics; one run with Table 1 as a table and
    the metric per method. Returns the run directories."""
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
    run = wandb.init(project=spec.project, group="table1", job_type="table1", mode=mode,
                     name=str(cfg.table1.name), dir=str(store.root), reinit="create_new")  # fmt: skip
    run.log({"table1": wandb.Table(columns=rows[0], data=rows[1:])})
    per_method = wandb.Table(columns=["cell", metric], data=[
        [f"{c['dataset']} {c['n']}-split {c['method']}" if c["n"] else f"{c['dataset']} paragon", c.get("value")]
        for c in cells
    ])  # fmt: skip
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
