"""After a forget or add-source commit: routers retrained, k-NN centroids recomputed, stale
adapters and feature nets found, costs and the certificate's common parts."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.data.manifest import Manifest, indices_of
from cdm.jobs.context import load_data
from cdm.jobs.knn import embed, knn_embedder
from cdm.jobs.router import run_router_job
from cdm.models.knn_router import kmeans
from cdm.store import (
    CARD_FILENAME,
    ArtifactStore,
    make_card,
    read_card,
)
from cdm.store.cards import utc_now
from cdm.store.feature_nets import feature_net_stale_reason, list_feature_nets, train_hint
from cdm.store.knn import save_centroids
from cdm.store.records import (
    save_certificate,
)
from cdm.store.staleness import stale_reason

log = get_logger(__name__)


def schedule_cost(
    slice_sizes: Sequence[int],
    epochs_per_slice: int,
    batch_size: int,
    start_slice: int = 0,
    final_steps: int | None = None,
    world_size: int = 1,
) -> dict[str, int]:
    """Samples fed and optimizer steps of a SISA schedule run from slice ``start_slice`` on
    (slice s trains ``epochs_per_slice`` epochs on slices 0..s; each of ``world_size`` ranks
    steps on its part). ``final_steps``: the steps run once the last slice joined, as recorded on
    a card (the convergence rule decides them); None: ``epochs_per_slice`` epochs."""
    samples = steps = 0
    for s in range(start_slice, len(slice_sizes)):
        active = sum(slice_sizes[: s + 1])
        per_epoch = math.ceil(math.ceil(active / world_size) / batch_size)
        if s == len(slice_sizes) - 1 and final_steps is not None:
            steps += final_steps
            samples += round(final_steps * active / per_epoch)
        else:
            samples += epochs_per_slice * active
            steps += epochs_per_slice * per_epoch
    return {"samples_fed": samples, "optimizer_steps": steps}


def slice_sizes(m: Manifest) -> list[int]:
    """Samples per SISA slice of ``m``."""
    return [b - a for a, b in m.slices]


@dataclass(frozen=True)
class JobSchedule:
    """A trained shard's or the paragon's SISA schedule, with the steps its card says it ran."""

    slice_sizes: tuple[int, ...]
    epochs_per_slice: int
    batch_size: int
    final_steps: int | None = None  # steps after the last slice joined (None: the fixed epochs)
    world_size: int = 1

    @classmethod
    def from_card(
        cls, card: dict, trained_on: Manifest, runs_on: Manifest | None = None
    ) -> JobSchedule:
        """The schedule of the job on ``card`` (trained on ``trained_on``), run on ``runs_on``
        (default the same): its stage's settings (``router`` for a compartmental head, else
        ``optim``), and as final steps its ``optimizer_steps`` minus those of the slices before
        the last one."""
        stage = "router" if card.get("kind") == "head" else "optim"
        optim = (card.get("config") or {}).get(stage) or {}
        fixed = cls(tuple(slice_sizes(trained_on)), int(optim["epochs_per_slice"]),
                    int(optim["batch_size"]), world_size=int(card.get("world_size") or 1))  # fmt: skip
        if card.get("optimizer_steps") is not None:
            before = replace(fixed, slice_sizes=fixed.slice_sizes[:-1]).cost()
            final = int(card["optimizer_steps"]) - before["optimizer_steps"]
            fixed = replace(fixed, final_steps=max(final, 0))
        return fixed if runs_on is None else replace(fixed, slice_sizes=tuple(slice_sizes(runs_on)))

    def cost(self, start_slice: int = 0) -> dict[str, int]:
        """Samples fed and optimizer steps from ``start_slice`` on (``schedule_cost``)."""
        return schedule_cost(
            self.slice_sizes, self.epochs_per_slice, self.batch_size, start_slice,
            self.final_steps, self.world_size,
        )  # fmt: skip

    def without_one(self, k: int) -> JobSchedule:
        """The schedule once one sample of slice ``k`` is forgotten (the same final steps)."""
        sizes = tuple(n - (j == k) for j, n in enumerate(self.slice_sizes))
        return replace(self, slice_sizes=sizes)


def expected_forget_cost(shards: Sequence[JobSchedule], paragon: JobSchedule) -> dict[str, Any]:
    """The ideal cost of forgetting one uniformly drawn sample (SISA): its shard retrains from the
    checkpoint of the slice before the sample's (optimizer steps as the shards' cards ran them),
    against retraining the paragon from scratch; and their ratio."""
    total = sum(sum(s.slice_sizes) for s in shards)
    mean = {"samples_fed": 0.0, "optimizer_steps": 0.0}
    for shard in shards:
        for k, n in enumerate(shard.slice_sizes):
            cost = shard.without_one(k).cost(start_slice=k)
            for key in mean:
                mean[key] += n / total * cost[key]
    whole = paragon.cost()
    return {
        "n_samples": total,
        "paragon": whole,
        "mean_forget": {k: round(v, 1) for k, v in mean.items()},
        "ratio_samples": round(whole["samples_fed"] / mean["samples_fed"], 3),
        "ratio_steps": round(whole["optimizer_steps"] / mean["optimizer_steps"], 3),
    }


def forget_cost_model(store: ArtifactStore, experiment: str) -> dict[str, Any] | None:
    """``expected_forget_cost`` of the experiment's trained shards and paragon, from their
    manifests and cards (None until every shard and the paragon are trained)."""
    names = [n for n in store.list_manifests(experiment) if ShardId.is_shard(n)]
    jobs = [*names, "paragon"]
    if not names or not all(store.has_adapter(experiment, j) for j in jobs):
        return None
    schedules = [
        JobSchedule.from_card(
            store.read_adapter_card(experiment, j),
            Manifest.from_json(store.load_manifest(experiment, "private" if j == "paragon" else j)),
        )
        for j in jobs
    ]
    return expected_forget_cost(schedules[:-1], schedules[-1])


def retrain_routers(
    cfg: DictConfig, store: ArtifactStore, experiment: str, retrain: bool
) -> list[dict]:
    """Retrain (or leave stale and refused) every router trained on the old shard manifests."""
    records = []
    exp_dir = store.experiment_dir(experiment)
    for card_path in sorted(exp_dir.glob("*/card.json")):
        card = read_card(card_path)
        if card.get("kind") != "router" or not stale_reason(store, experiment, card):
            continue
        name = card_path.parent.name
        record = {"artifact": f"router {name}", "old_weights_sha256": card.get("weights_sha256")}
        if not retrain:
            store.clear_checkpoints(experiment, name)
            record.update(
                action="stale: refused on load until retrained",
                rebuild=f"cdm-train experiment={experiment} stage=router router.name={name} retrain=true",
            )
        else:
            router_cfg = job_config(card["config"], store, experiment, retrain=True)
            OmegaConf.update(router_cfg, "router.name", name, force_add=True)
            started = time.perf_counter()
            new = run_router_job(router_cfg)
            record.update(
                action="retrained",
                wall_time_s=round(time.perf_counter() - started, 3),
                new_weights_sha256=new["weights_sha256"],
                shard_manifests=new["shard_manifests"],
            )
        records.append(record)
    return records


def recompute_centroids(
    cfg: DictConfig, store: ArtifactStore, experiment: str, journal: dict
) -> list[dict]:
    """Recompute the k-NN centroids of every shard that lost ids (each embedder); where that
    fails, delete them (then they are missing, and ``cdm-train stage=knn`` remakes them)."""
    records = []
    for shard in journal["shards"]:
        job = shard["job"]
        base = cfg
        if store.has_adapter(experiment, job):
            base = job_config(store.read_adapter_card(experiment, job)["config"], store, experiment)
        for card_path in sorted(store.knn_dir(experiment).glob(f"*/{job}/{CARD_FILENAME}")):
            card = read_card(card_path)
            name = card_path.parent.parent.name
            record = {
                "artifact": f"knn centroids {name}/{job}",
                "old_weights_sha256": card.get("weights_sha256"),
            }
            try:
                knn_cfg = job_config(OmegaConf.to_container(base, resolve=True), store, experiment)
                knn_cfg.knn = card["config"]
                dataset = load_data(knn_cfg)
                manifest = Manifest.from_json(store.load_manifest(experiment, job))
                started = time.perf_counter()
                embedder, parents = knn_embedder(knn_cfg, store, dataset)
                points = embed(embedder, dataset, indices_of(dataset, manifest))
                k, seed = int(card["config"]["k"]), int(knn_cfg.seed) + int(shard["index"])
                new = make_card(
                    name=job,
                    experiment=experiment,
                    embedder=name,
                    manifest_hash=manifest.hash,
                    n_samples=len(manifest.ids),
                    config=card["config"],
                    parents=parents,
                    wall_time_s=round(time.perf_counter() - started, 3),
                )
                new = save_centroids(
                    store, experiment, name, job, kmeans(points, k, seed=seed), new
                )
                record.update(
                    action="recomputed",
                    new_weights_sha256=new["weights_sha256"],
                    manifest_hash=manifest.hash,
                )
            except Exception as err:  # never leave centroids of the old shard in use
                shutil.rmtree(card_path.parent)
                record.update(
                    action=f"deleted ({type(err).__name__}: {err})",
                    rebuild=f"cdm-train experiment={experiment} stage=knn knn={name}",
                )
            records.append(record)
    return records


def stale_adapters(store: ArtifactStore, experiment: str) -> list[dict]:
    """Adapters whose card no longer matches their manifest (e.g. the paragon): refused on load."""
    records = []
    for card_path in sorted(store.experiment_dir(experiment).glob("*/card.json")):
        card = read_card(card_path)
        if card.get("kind") == "router" or "adapter_kind" not in card:
            continue
        reason = stale_reason(store, experiment, card)
        if reason:
            job = card_path.parent.name
            records.append(
                {
                    "artifact": f"adapter {job}",
                    "action": "stale: refused on load until retrained",
                    "reason": reason,
                    "weights_sha256": card.get("weights_sha256"),
                    "rebuild": f"cdm-train experiment={experiment} stage={job} retrain=true",
                }
            )
    return records


def not_covered(
    store: ArtifactStore, experiment: str, ids: Sequence[str], dataset_name: str | None
) -> list[dict]:
    """What else in the store saw the ids but is outside this experiment's forgetting."""
    out = []
    wanted = set(ids)
    for other in store.list_experiments():
        if other == experiment or "private" not in store.list_manifests(other):
            continue
        held = wanted & set(store.load_manifest(other, "private").get("ids", []))
        if held:
            out.append(
                {
                    "artifact": f"experiment {other}",
                    "n_ids": len(held),
                    "fix": f"cdm-forget experiment={other} forget.ids_file=<the same ids>",
                }
            )
    return out


def stale_feature_nets(store: ArtifactStore) -> list[dict]:
    """Domain feature nets trained on a forgotten id (they train on a dataset's whole train split,
    private data included): refused on load until retrained without the forgotten ids."""
    records = []
    for card in list_feature_nets(store):
        reason = feature_net_stale_reason(store, card)
        if reason:
            hint = train_hint(
                str(card.get("dataset")), int(card.get("resolution", 0)), int(card.get("seed", 0))
            )
            records.append(
                {
                    "artifact": f"feature_net {card.get('name')}",
                    "action": "stale: refused on load until retrained (FD_<dataset>, knn=feature_net)",
                    "reason": reason,
                    "weights_sha256": card.get("weights_sha256"),
                    "rebuild": f"{hint} retrain=true",
                }
            )
    return records


def finish(cfg: DictConfig, store: ArtifactStore, experiment: str, journal: dict) -> dict:
    """Routers, centroids, stale list and the certificate; then the pending area is removed."""
    cert = dict(journal["certificate"])
    cert["routers"] = retrain_routers(cfg, store, experiment, bool(journal["retrain_router"]))
    cert["knn_centroids"] = recompute_centroids(cfg, store, experiment, journal)
    cert["stale"] = stale_adapters(store, experiment) + stale_feature_nets(store)
    cert["checkpoints_replaced"] = journal.get("done", {}).get("checkpoints_replaced", [])
    cert["checkpoints_deleted"] = journal.get("done", {}).get("checkpoints_deleted", [])
    cert["quarantined"] = journal.get("done", {}).get("quarantined", [])
    if journal.get("kind") == "source":
        cert["deleted"] = journal.get("done", {}).get("deleted", [])
    cert["not_covered"] = not_covered(store, experiment, journal["ids"], cert.get("dataset"))
    cert["finished"] = utc_now()
    cert["wall_time_s"] = round(time.time() - journal["started_unix"], 3)
    path = save_certificate(store, experiment, journal["tag"], cert)
    cert["path"] = str(path)
    shutil.rmtree(store.forget_pending_dir(experiment), ignore_errors=True)
    log.info("forget: certificate %s", path)
    return cert


def paragon_cost(
    store: ArtifactStore, experiment: str, private_new: Manifest, optim: dict | None
) -> dict[str, Any]:
    """What retraining the monolithic paragon on the data left would cost: its SISA schedule with
    the steps its card ran (``JobSchedule``; without a card: ``optim``'s fixed epochs) and its last
    training's wall time."""
    cost: dict[str, Any] = {}
    if store.has_adapter(experiment, "paragon"):
        paragon = store.read_adapter_card(experiment, "paragon")
        cost["paragon_wall_time_s_when_trained"] = paragon.get("wall_time_s")
        if (paragon.get("config") or {}).get("optim"):
            old = Manifest.from_json(store.load_manifest(experiment, "private"))
            schedule = JobSchedule.from_card(paragon, old, private_new)
            cost["paragon_from_scratch"] = schedule.cost()
            return cost
    if optim:
        cost["paragon_from_scratch"] = schedule_cost(
            slice_sizes(private_new), int(optim["epochs_per_slice"]), int(optim["batch_size"])
        )
    return cost


def shard_adapters(
    store: ArtifactStore, experiment: str, exclude: Iterable[str] = ()
) -> list[dict]:
    """``{artifact, weights_sha256, manifest_hash}`` of every trained shard adapter but ``exclude``:
    what a request leaves untouched (its certificate lists them to show it)."""
    records = []
    for name in store.list_manifests(experiment):
        if (
            ShardId.is_shard(name)
            and name not in set(exclude)
            and store.has_adapter(experiment, name)
        ):
            card = store.read_adapter_card(experiment, name)
            records.append(
                {"artifact": f"adapter {name}", "weights_sha256": card.get("weights_sha256"),
                 "manifest_hash": card.get("manifest_hash")}
            )  # fmt: skip
    return records


def certificate_header(tag: str, experiment: str, dataset: str | None, method: str) -> dict:
    """The fields every forget certificate starts with."""
    return {
        "kind": "forget_certificate",
        "name": tag,
        "experiment": experiment,
        "dataset": dataset,
        "created": utc_now(),
        "code_version": make_card()["code_version"],
        "method": method,
    }


def job_config(
    card_config: dict, store: ArtifactStore, experiment: str, **overrides: Any
) -> DictConfig:
    """The config a stored artifact was trained with, pointed at this store (to retrain it alike)."""
    cfg = OmegaConf.create(card_config)
    cfg.paths.artifacts = str(store.root)
    cfg.experiment_name = experiment
    cfg.resume, cfg.retrain = True, False
    cfg.kill_at_step = None
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg
