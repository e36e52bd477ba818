"""Removal-based attribution of a global property: datamodels fitted on models retrained from
scratch vs on sparsified-unlearned models, at equal compute, scored by LDS (issue 13, section 2;
Lin, Lu & Lee, sec. 3 and Fig. 1).

One run (``cdm-attribute attribution/method=datamodels``):

1. The attributed model is one compartment's adapter (``target=shard-KK``) or the paragon's
   (``target=paragon``, all private data) on the experiment's safe backbone. Its training ids are
   grouped into units (``units.kind``: groups within classes, single samples, or a grouping file).
2. The full model epsilon is trained on every unit for ``retrain_steps`` (one compute unit), then
   pruned by weight magnitude (``pruning_ratio``, paper: 0.3) once.
3. Unlearning: for each of ``max(budgets) * cost_ratio`` subsets S_i (alpha N units each), a copy of
   the pruned model is fine-tuned on S_i with the training objective for
   ``retrain_steps / cost_ratio`` steps (paper eq. 2 and alg. 1); its gamma is measured. Its
   batches visit S_i in a seeded shuffle (``unlearn_order=shuffled``) or sorted by a keyed hash of
   each id (``keyed``: removing a unit leaves the others' order, so gamma varies more smoothly with
   the subset); retraining always shuffles.
4. Retraining: ``max(budgets)`` subsets retrained from scratch for ``retrain_steps`` (the
   baseline), and ``heldout_subsets`` more (K, another seed) for the LDS (paper eq. 3).
5. For each budget b (in retraining units): a ridge datamodel on the first b retrained subsets and
   one on the first ``b * cost_ratio`` unlearned subsets; LDS of each on the K held-out subsets,
   with bootstrap intervals. Optionally a gradient-based baseline (TRAK with the D-TRAK output
   function, ``cdm.attribution.trak``) on the same held-out subsets.

Every model starts from the same seed (the same LoRA initialisation, the same per-step noise and
timesteps), so gamma differs between subsets only through the data they keep. The training loop is
a plain loop over ``cdm.attribution.unlearning.unlearn_by_finetuning`` with the shard job's own loss
(``ShardTraining.denoising_loss``) and optimiser (AdamW with ``optim``'s settings), not a Lightning
``Trainer``: hundreds of fine-tunes of a few steps each would pay the trainer's per-fit set-up,
which would distort the very cost ratio this experiment measures.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from cdm.attribution.composition import Attribution, AttributionContext
from cdm.attribution.datamodels import Units, fit_datamodel, sample_subsets
from cdm.attribution.lds import LDSResult, lds_difference, linear_datamodeling_score
from cdm.attribution.properties import FrechetDistanceProperty
from cdm.attribution.unlearning import magnitude_prune, sparsity, unlearn_by_finetuning
from cdm.core.hashing import sha256_bytes
from cdm.core.logging import get_logger
from cdm.core.names import ShardId
from cdm.core.sampling import sample as run_sampler
from cdm.data.sharding import epoch_order, id_hash
from cdm.jobs.context import load_backbone_for_shards, load_data, select_manifest, split_data
from cdm.jobs.evaluate import reference_rows
from cdm.jobs.pipeline import build_sampler, cycle_labels, sampling_device
from cdm.jobs.sample import batch_generator
from cdm.models.backbone import build_scheduler, predict_epsilon
from cdm.store.io import append_json_line, read_json_lines
from cdm.training.jobs import ShardTraining

log = get_logger(__name__)

FIG1_FILE = "lds-vs-compute.png"
# method settings that are not in the records file's fingerprint: the TRAK baseline and the name
# (no gamma depends on them), budgets and subset counts (prefix-stable draws), and what only some
# models depend on (``RemovalExperiment.variant``)
VARIANT_KEYS = ("trak", "name", "budgets", "heldout_subsets", "heldout_seeds", "cost_ratio",
                "pruning_ratio", "pruning_scope", "unlearn_order")  # fmt: skip
ORDERS = ("shuffled", "keyed")  # SubsetTrainer.order


# ---- units -----------------------------------------------------------------------------------


def class_groups(ids: Sequence[str], labels: Sequence[int], n_groups: int, seed: int) -> Units:
    """About ``n_groups`` groups, each inside one class: a class with n_c of the N ids gets
    max(1, round(n_groups n_c / N)) groups; its ids are dealt to them in the order of a keyed hash
    of (seed, id), so a group is a random subset of its class that does not move when other ids
    are removed. Group names are ``c<label>-g<k>``."""
    if n_groups < 2:
        raise ValueError(f"units.n_groups must be >= 2, got {n_groups}")
    by_class: dict[int, list[str]] = {}
    for sample_id, label in zip(ids, labels, strict=True):
        by_class.setdefault(int(label), []).append(str(sample_id))
    total = len(ids)
    groups: list[str] = []
    members: list[str] = []
    for label in sorted(by_class):
        class_ids = sorted(by_class[label], key=lambda i: id_hash(seed, "attribution-group", i))
        count = min(len(class_ids), max(1, round(n_groups * len(class_ids) / total)))
        for position, sample_id in enumerate(class_ids):
            members.append(sample_id)
            groups.append(f"c{label}-g{position * count // len(class_ids):02d}")
    return Units.from_groups(members, groups)


def groups_from_file(path: str | Path, ids: Sequence[str]) -> Units:
    """Units from a CSV file of ``id,group`` lines (a header line ``id,group`` is allowed); only
    the attributed model's training ids are kept, and every one of them must have a group."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"attribution.method.units.path={str(path)!r} is not a file: give a CSV of id,group lines"
        )
    rows = [r for r in csv.reader(io.StringIO(file.read_text())) if r and r != ["id", "group"]]
    bad = [r for r in rows if len(r) != 2]
    if bad:
        raise ValueError(f"{path}: every line must be 'id,group'; got {bad[0]!r}")
    group_of = {r[0].strip(): r[1].strip() for r in rows}
    missing = [i for i in ids if i not in group_of]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} training ids of the attributed model have no group (e.g. "
            f"{missing[0]!r}); give every id a group"
        )
    return Units.from_groups(list(ids), [group_of[i] for i in ids])


def build_units(
    spec: Mapping[str, Any], ids: Sequence[str], labels: Sequence[int], seed: int
) -> Units:
    """``units.kind``: class_groups (``n_groups``) | samples | file (``path``)."""
    kind = str(spec["kind"])
    if kind == "class_groups":
        return class_groups(ids, labels, int(spec["n_groups"]), seed)
    if kind == "samples":
        return Units.from_samples(list(ids))
    if kind == "file":
        return groups_from_file(spec["path"], ids)
    raise ValueError(
        f"attribution.method.units.kind={kind!r}: choose class_groups, samples or file"
    )


# ---- training on a subset ----------------------------------------------------------------------


@dataclass
class SubsetTrainer:
    """Trains the attributed model on the images of some units: from scratch (``fresh``) or from
    a given model (a pruned copy), always with the shard job's loss and optimiser settings."""

    backbone: torch.nn.Module
    alphas_cumprod: torch.Tensor
    adapter: dict[str, Any]
    images: torch.Tensor  # [N, C, H, W] of the attributed model's training ids, in id order
    labels: torch.Tensor  # [N]
    optim: dict[str, Any]
    conditional: bool
    seed: int
    position: dict[str, int] = field(default_factory=dict)  # id -> row of images
    order: str = "shuffled"  # shuffled | keyed: how each epoch orders the kept ids (``batches``)

    def fresh(self) -> ShardTraining:
        """A new adapter on the frozen backbone, initialised from ``seed`` (the same every time)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            module = ShardTraining(
                copy.deepcopy(self.backbone), self.alphas_cumprod, self.adapter,
                dataset_size=len(self.images), lr=float(self.optim["lr"]),
                weight_decay=float(self.optim["weight_decay"]),
                cond_drop_prob=float(self.optim.get("cond_drop_prob", 0.0)),
                conditional=self.conditional, seed=self.seed,
            )  # fmt: skip
        return module

    def epoch_rows(self, ids: Sequence[str], epoch: int) -> torch.Tensor:
        """Rows of ``images`` in epoch ``epoch``'s order. ``shuffled``: a permutation seeded by
        (seed, epoch), so two subsets that share most ids get unrelated orders. ``keyed``: sorted by
        a keyed hash of (seed, epoch, id) (``cdm.data.sharding.epoch_order``), so removing ids keeps
        the others' relative order (common random numbers: the model is a smoother function of
        the subset)."""
        rows = torch.as_tensor([self.position[i] for i in ids], dtype=torch.long)
        if self.order == "keyed":
            return rows[torch.as_tensor(epoch_order(ids, self.seed, epoch), dtype=torch.long)]
        if self.order != "shuffled":
            raise ValueError(f"SubsetTrainer.order={self.order!r}: choose one of {ORDERS}")
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return rows[torch.randperm(len(rows), generator=generator)]

    def batches(self, ids: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches of ``optim.batch_size`` over ``ids``, epoch e in ``epoch_rows(ids, e)``
        (the last incomplete batch of an epoch is dropped): the order depends on the subset, the
        seed and ``order`` only."""
        size = min(int(self.optim["batch_size"]), len(ids))
        epoch = 0
        while True:
            order = self.epoch_rows(ids, epoch)
            for start in range(0, len(order) - size + 1, size):
                take = order[start : start + size]
                yield {"image": self.images[take], "label": self.labels[take]}
            epoch += 1

    def fit(self, module: ShardTraining, ids: Sequence[str], steps: int) -> float:
        """``steps`` optimiser steps of the denoising objective on ``ids``; returns seconds."""
        counter = iter(range(steps))
        batches = self.batches(ids)

        def loss(model: ShardTraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model.denoising_loss(batch, next(counter))

        def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            betas = tuple(self.optim.get("betas", (0.9, 0.999)))
            return torch.optim.AdamW(params, lr=float(self.optim["lr"]),
                                     weight_decay=float(self.optim["weight_decay"]), betas=betas)  # fmt: skip

        started = time.perf_counter()
        unlearn_by_finetuning(module, (next(batches) for _ in range(steps)), loss, steps=steps,
                              optimizer=adamw, seed=self.seed)  # fmt: skip
        return time.perf_counter() - started


# ---- the experiment ----------------------------------------------------------------------------


def unlearned_subsets(n_units: int, count: int, alpha: float, seed: int) -> np.ndarray:
    """The subsets of the unlearned models (not stored in values.json: redrawn from the seed)."""
    return sample_subsets(n_units, count, alpha=alpha, seed=seed + 1)


@dataclass
class ModelRecord:
    """One model of the experiment: its subset (row of the indicator matrix), gamma, seconds."""

    kind: str
    mask: np.ndarray
    seed_gammas: tuple[float, ...]  # one per training seed
    train_s: float  # mean over the seeds

    @property
    def gamma(self) -> float:
        """The mean over training seeds (D-TRAK's held-out protocol)."""
        return float(np.mean(self.seed_gammas))


@dataclass
class DatamodelMethod:
    """Retraining-based vs unlearning-based datamodels at equal compute, scored by LDS."""

    target: str = "paragon"
    units: Any = None
    alpha: float = 0.5
    retrain_steps: int = 400
    cost_ratio: int = 64
    pruning_ratio: float = 0.3
    pruning_scope: str = "layer"
    heldout_subsets: int = 12
    heldout_seeds: int = 1
    budgets: Sequence[int] = (2, 4, 8)
    trak: Any = None
    unlearn_order: str = "shuffled"

    def __post_init__(self) -> None:
        if self.unlearn_order not in ORDERS:
            raise ValueError(
                f"attribution.method.unlearn_order={self.unlearn_order!r}: choose one of {ORDERS}"
            )
        if self.retrain_steps < self.cost_ratio:
            raise ValueError(
                f"attribution.method: retrain_steps={self.retrain_steps} < cost_ratio="
                f"{self.cost_ratio} leaves no unlearning step; raise retrain_steps or lower cost_ratio"
            )
        if not self.budgets or min(int(b) for b in self.budgets) < 2:
            raise ValueError(
                f"attribution.method.budgets={list(self.budgets)}: each budget must be >= 2 "
                "retrainings (a datamodel needs at least two subsets)"
            )
        if self.heldout_subsets < 3:
            raise ValueError(
                f"attribution.method.heldout_subsets must be >= 3, got {self.heldout_subsets}"
            )

    @property
    def unlearn_steps(self) -> int:
        """Fine-tuning steps of one unlearned model: retrain_steps / cost_ratio."""
        return self.retrain_steps // self.cost_ratio

    def run(self, ctx: AttributionContext) -> Attribution:
        """The whole experiment; values, the LDS table and the Fig. 1 plot."""
        exp = RemovalExperiment(self, ctx)
        return exp.run()


class RemovalExperiment:
    """State of one ``DatamodelMethod.run``: data, trainer, gamma, the models measured so far."""

    def __init__(self, method: DatamodelMethod, ctx: AttributionContext) -> None:
        self.method, self.ctx, self.cfg = method, ctx, ctx.cfg
        cfg = ctx.cfg
        dataset = load_data(cfg)
        split = split_data(cfg, dataset)
        stage, index = (
            ("paragon", 0) if method.target == "paragon" else ("shard", self.shard_index())
        )
        manifest = select_manifest(stage, split, index)
        rows = [dataset.id_to_index[i] for i in manifest.ids]
        self.ids = list(manifest.ids)
        self.manifest_name = manifest.name
        labels = dataset.labels[rows]
        self.units = build_units(method.units, self.ids, labels.tolist(), int(cfg.seed))
        unet, bcard = load_backbone_for_shards(cfg, ctx.store, split)
        self.backbone_parent = {
            "kind": "backbone",
            "name": cfg.backbone.id,
            "hash": bcard["backbone_hash"],
        }
        schedule = OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
        self.scheduler = build_sampler(cfg.sampler, schedule)
        self.device = sampling_device(cfg)
        images = torch.stack([dataset.image(r) for r in rows]).float().to(self.device)
        self.trainer = SubsetTrainer(
            backbone=unet.eval().to(self.device), alphas_cumprod=build_scheduler(schedule).alphas_cumprod,
            adapter=OmegaConf.to_container(cfg.adapter, resolve=True), images=images,
            labels=labels.to(self.device), optim=OmegaConf.to_container(cfg.optim, resolve=True),
            conditional=bool(cfg.data.conditional), seed=int(cfg.seed),
            position={i: k for k, i in enumerate(self.ids)},
        )  # fmt: skip
        self.label_pool = torch.unique(labels) if cfg.data.conditional else None
        self.records: list[ModelRecord] = []
        self.records_path = ctx.store.attribution_records_path(
            str(cfg.experiment_name),
            self.fingerprint(manifest.hash, reference_rows(cfg, ctx.store, dataset)[1]),
        )
        done = read_json_lines(self.records_path) if self.records_path.is_file() else []
        self.measured = {(r["kind"], r["index"], r.get("variant", "")): r for r in done}

    def shard_index(self) -> int:
        """KK of ``target=shard-KK``."""
        try:
            return ShardId.parse(str(self.method.target)).index
        except ValueError as err:
            raise ValueError(
                f"attribution.method.target={self.method.target!r}: use paragon or shard-KK "
                "(e.g. shard-00)"
            ) from err

    # ---- measuring gamma ----
    @torch.no_grad()
    def gamma(self, module: ShardTraining) -> float:
        """The property of ``num_samples`` samples of ``module`` from the run's fixed x_T (the
        same noise and labels for every model)."""
        cfg = self.cfg
        model = module.model.eval()
        labels = self.sample_labels()
        images = []
        for start, x_T, generator in self.batches_of_noise():
            y = None if labels is None else labels[start : start + len(x_T)]

            def denoise(x: torch.Tensor, t: torch.Tensor, y=y) -> torch.Tensor:
                return predict_epsilon(model, x, t.expand(x.shape[0]).to(self.device), y)

            images.append(
                run_sampler(denoise, self.scheduler, x_T, int(cfg.steps), generator=generator)
                .clamp(-1, 1)
                .cpu()
            )
        model.train()
        return float(self.ctx.prop(torch.cat(images), None))

    def fingerprint(self, manifest_hash: str, reference_hash: str) -> str:
        """What every measured gamma depends on: the method's units, alpha and retraining steps,
        the property, the sampling, the seed, the training settings, the backbone, the attributed
        data and, when it is other data, the reference set's ids (so a reference whose data
        changed, e.g. after ``cdm-forget`` in another shard, never reuses gammas). Budgets and
        subset counts are left out (subsets are prefix-stable draws: more of them keep the first
        ones), and so are the settings only some models depend on (``variant``)."""
        cfg = self.cfg
        method = {k: v for k, v in OmegaConf.to_container(cfg.attribution.method, resolve=True).items()
                  if k not in VARIANT_KEYS}  # fmt: skip
        keys = {
            "method": method, "manifest": manifest_hash, "backbone": self.backbone_parent["hash"],
            **{k: OmegaConf.to_container(cfg[k], resolve=True)
               for k in ("optim", "adapter", "sampler")},
            "property": OmegaConf.to_container(cfg.attribution.property, resolve=True),
            "sampling": [int(cfg.num_samples), int(cfg.steps), int(cfg.batch_size), int(cfg.seed)],
        }  # fmt: skip
        if reference_hash != manifest_hash:  # the attributed data itself adds nothing
            keys["reference"] = reference_hash
        return sha256_bytes(json.dumps(keys, sort_keys=True, default=str).encode())

    def variant(self, kind: str, seed_offset: int = 0) -> str:
        """The settings a model of ``kind`` depends on beyond the fingerprint: the pruning of the
        pruned and unlearned models, the unlearning steps and batch order (``unlearn_order``), the
        training seed of a held-out model (one record per seed, so ``heldout_seeds=3`` reuses the
        models of a run with fewer seeds)."""
        m = self.method
        prune = f"prune={m.pruning_ratio},{m.pruning_scope}"
        # shuffled (the first order) adds nothing, so models stored before the option stay valid
        order = "" if m.unlearn_order == "shuffled" else f";order={m.unlearn_order}"
        # the first seed keeps the key of the records written before per-seed records
        heldout = "seeds=1" + (f";seed+{seed_offset}" if seed_offset else "")
        return {"pruned": prune, "unlearn": f"{prune};steps={m.unlearn_steps}{order}",
                "heldout": heldout}.get(kind, "")  # fmt: skip

    def measure(
        self,
        kind: str,
        index: int,
        mask: np.ndarray,
        train: Callable[[int], tuple[ShardTraining, float]],
        seeds: int = 1,
    ) -> None:
        """Record the gamma of the model ``train(offset)`` returns for each training seed
        ``seed + offset`` (offset < ``seeds``), and their mean gamma and training seconds (D-TRAK's
        held-out protocol averages over seeds); a model the records file holds is read back."""
        gammas, seconds = [], []
        for offset in range(seeds):
            variant = self.variant(kind, offset)
            done = self.measured.get((kind, index, variant))
            if done is None:
                module, train_s = train(offset)
                done = {
                    "kind": kind,
                    "index": index,
                    "variant": variant,
                    "gamma": self.gamma(module),
                    "train_s": float(train_s),
                }
                append_json_line(self.records_path, done)
                self.measured[(kind, index, variant)] = done
            gammas.append(float(done["gamma"]))
            seconds.append(float(done["train_s"]))
        self.records.append(ModelRecord(kind, mask, tuple(gammas), float(np.mean(seconds))))

    def retained(self, mask: np.ndarray) -> list[str]:
        return self.units.retained_ids(mask)

    def run(self) -> Attribution:
        m, cfg = self.method, self.cfg
        n = len(self.units)
        seed = int(cfg.seed)
        top = max(int(b) for b in m.budgets)
        started = time.perf_counter()
        log.info(
            "datamodels on %s (%s): %d ids in %d units; retrain %d steps, unlearn %d steps (x%d), "
            "%d retrained + %d held-out + %d unlearned models",
            m.target, self.manifest_name, len(self.ids), n, m.retrain_steps, m.unlearn_steps,
            m.cost_ratio, top, m.heldout_subsets, top * m.cost_ratio,
        )  # fmt: skip
        everything = np.ones(n, dtype=bool)
        full = self.trainer.fresh()
        full_s = self.trainer.fit(full, self.ids, m.retrain_steps)
        self.measure("full", 0, everything, lambda _: (full, full_s))
        pruned = copy.deepcopy(full)
        magnitude_prune(pruned.model, ratio=m.pruning_ratio, scope=m.pruning_scope)
        self.measure("pruned", 0, everything, lambda _: (pruned, 0.0))
        unlearn_masks = unlearned_subsets(n, top * m.cost_ratio, m.alpha, seed)
        retrain_masks = sample_subsets(n, top, alpha=m.alpha, seed=seed + 2)
        heldout_masks = sample_subsets(n, m.heldout_subsets, alpha=m.alpha, seed=seed + 3)
        jobs = [("heldout", i, mask, m.heldout_seeds) for i, mask in enumerate(heldout_masks)]
        jobs += [("retrain", i, mask, 1) for i, mask in enumerate(retrain_masks)]
        jobs += [("unlearn", i, mask, 1) for i, mask in enumerate(unlearn_masks)]
        if self.measured:
            log.info(
                "datamodels: %d models read back from %s", len(self.measured), self.records_path
            )
        bar = tqdm(jobs, desc="datamodels", unit="model", disable=not bool(cfg.get("progress")))
        for kind, index, mask, seeds in bar:

            def train(offset: int, kind=kind, mask=mask) -> tuple[ShardTraining, float]:
                trainer = dataclasses.replace(self.trainer, seed=seed + offset)
                if kind == "unlearn":
                    module, steps = copy.deepcopy(pruned), m.unlearn_steps
                    trainer = dataclasses.replace(trainer, order=m.unlearn_order)
                else:
                    module, steps = trainer.fresh(), m.retrain_steps
                return module, trainer.fit(module, self.retained(mask), steps)

            self.measure(kind, index, mask, train, seeds)
            bar.set_postfix_str(f"{kind} gamma {self.records[-1].gamma:.4g}")
        log.info(
            "datamodels: %d models measured in %.0f s",
            len(self.records),
            time.perf_counter() - started,
        )
        values = self.summarise(sparsity(pruned.model), time.perf_counter() - started)
        if m.trak and m.trak.get("enabled"):
            values["trak"] = self.trak_baseline(full)
        return Attribution(values, lds_table(values), {FIG1_FILE: fig1_plot(values)},
                           parents=[self.backbone_parent])  # fmt: skip

    def by_kind(self, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = [r for r in self.records if r.kind == kind]
        return (np.stack([r.mask for r in rows]), np.array([r.gamma for r in rows]),
                np.array([r.train_s for r in rows]))  # fmt: skip

    def summarise(self, pruned_sparsity: float, wall_s: float) -> dict[str, Any]:
        """LDS of both datamodels at every budget, costs, gammas."""
        m = self.method
        h_masks, h_gamma, h_s = self.by_kind("heldout")
        r_masks, r_gamma, r_s = self.by_kind("retrain")
        u_masks, u_gamma, u_s = self.by_kind("unlearn")
        seconds_per_retrain = float(np.mean(np.concatenate([h_s, r_s])))
        seconds_per_unlearn = float(np.mean(u_s))
        rows = []
        seed = int(self.cfg.seed)
        for b in sorted(int(x) for x in m.budgets):
            baseline_tau = None
            for method, masks, gammas, count in (
                ("retraining", r_masks, r_gamma, b),
                ("sparsified unlearning", u_masks, u_gamma, b * m.cost_ratio),
            ):
                dm = fit_datamodel(masks[:count], gammas[:count])
                lds = linear_datamodeling_score(h_masks, h_gamma, dm.tau, seed=seed)
                # compute in optimizer steps (one retraining = 1), independent of the machine's
                # load while each model trained; the measured seconds are reported beside it
                steps = m.retrain_steps if method == "retraining" else m.unlearn_steps
                row = {"method": method, "budget": b, "subsets": count,
                       "compute_retrain_units": count * steps / m.retrain_steps,
                       "lds": lds_json(lds), "ridge_alpha": dm.alpha}  # fmt: skip
                if baseline_tau is None:
                    baseline_tau = dm.tau
                else:  # the goal's test: unlearning's LDS minus retraining's at equal compute
                    diff = lds_difference(h_masks, h_gamma, dm.tau, baseline_tau, seed=seed)
                    row["lds_minus_retraining"] = lds_json(diff)
                rows.append(row)
        full, pruned = (
            next(r.gamma for r in self.records if r.kind == k) for k in ("full", "pruned")
        )
        per_seed = np.array([r.seed_gammas for r in self.records if r.kind == "heldout"])
        return {
            **seed_agreement(per_seed),
            "property": self.ctx.prop.name,
            "target": m.target,
            "manifest": self.manifest_name,
            "n_ids": len(self.ids),
            "n_units": len(self.units),
            "units": dict(zip(self.units.names, (len(x) for x in self.units.members), strict=True)),
            "alpha": m.alpha,
            "retrain_steps": m.retrain_steps,
            "unlearn_steps": m.unlearn_steps,
            "step_ratio": m.retrain_steps / m.unlearn_steps,
            "seconds_per_retrain": seconds_per_retrain,
            "seconds_per_unlearn": seconds_per_unlearn,
            "measured_cost_ratio": seconds_per_retrain / seconds_per_unlearn,
            "pruning_ratio": m.pruning_ratio,
            "pruned_sparsity": pruned_sparsity,
            "gamma_full": full,
            "gamma_pruned": pruned,
            "gamma_heldout": h_gamma.tolist(),
            "gamma_retrain": r_gamma.tolist(),
            "gamma_unlearn": u_gamma.tolist(),
            "gamma_unlearn_mean": float(u_gamma.mean()),
            "gamma_unlearn_std": float(u_gamma.std()),
            "gamma_heldout_std": float(h_gamma.std()),
            "lds": rows,
            "seed": int(self.cfg.seed),  # unlearned subsets: unlearned_subsets(..., seed)
            "subsets": {
                "heldout": h_masks.astype(int).tolist(),
                "retrain": r_masks.astype(int).tolist(),
            },
            "wall_time_s": wall_s,
        }

    def batches_of_noise(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, x_T of the batch, its generator, which then serves the sampler's noise) of each
        batch of ``batch_size``: the same for every model (``cdm-sample``'s seeding)."""
        cfg = self.cfg
        n, size = int(cfg.num_samples), int(cfg.batch_size)
        shape = (int(cfg.data.channels), int(cfg.data.resolution), int(cfg.data.resolution))
        for start in range(0, n, size):
            generator = batch_generator(int(cfg.seed), start)
            x_T = torch.randn((min(size, n - start), *shape), generator=generator)
            yield start, x_T.to(self.device), generator

    def sample_labels(self) -> torch.Tensor | None:
        """The class labels of every gamma's samples (cycling through the target's classes)."""
        if self.label_pool is None:
            return None
        return cycle_labels(self.label_pool, int(self.cfg.num_samples)).to(self.device)

    def fixed_noise(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x_T [num_samples, C, H, W] and labels of every gamma (on the run's device)."""
        return torch.cat([x for _, x, _ in self.batches_of_noise()]), self.sample_labels()

    def trak_baseline(self, full: ShardTraining) -> list[dict[str, Any]]:
        """TRAK scores of every unit on the full model and their LDS on the held-out subsets:
        training features from each output function (D-TRAK's ||eps||^2, the training loss),
        the target d gamma / d theta through differentiable DDIM sampling from the same x_T as
        every gamma, one random projection for both (``cdm.attribution.trak``)."""
        from cdm.attribution import trak  # noqa: PLC0415 (only this baseline needs it)

        spec, cfg = self.method.trak, self.cfg
        prop = self.ctx.prop
        if not isinstance(prop, FrechetDistanceProperty):
            raise ValueError(
                f"the TRAK baseline needs a differentiable property: attribution/property=fd with "
                f"space=domain, not {prop.name}; or set attribution.method.trak.enabled=false"
            )
        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(
                "the TRAK baseline differentiates through DDIM sampling: use sampler=ddim, or set "
                "attribution.method.trak.enabled=false"
            )
        started = time.perf_counter()
        model, seed = full.model, int(cfg.seed)
        x_T, labels = self.fixed_noise()
        gamma_fn = trak.frechet_property_fn(
            trak.differentiable_features(prop.feature_space), prop.reference
        )
        sample_fn = trak.ddim_sample_fn(self.scheduler, x_T, int(cfg.steps), labels)
        target = trak.property_gradient(model, sample_fn, gamma_fn)
        projector = trak.Projector(target.numel(), int(spec["projection_dim"]), seed)
        target_feature = projector(target[None].float())[0]
        target_s = time.perf_counter() - started
        h_masks, h_gamma, _ = self.by_kind("heldout")
        members = [[self.trainer.position[i] for i in ids] for ids in self.units.members]
        seconds_per_retrain = float(np.mean(self.by_kind("retrain")[2]))
        results = []
        for output in spec["outputs"]:
            started = time.perf_counter()
            features = trak.per_sample_gradients(
                model, self.trainer.images, self.trainer.labels if cfg.data.conditional else None,
                alphas_cumprod=self.trainer.alphas_cumprod, output=str(output),
                num_timesteps=int(spec["num_timesteps"]), seed=seed, projector=projector,
            )  # fmt: skip
            tau = trak.trak_scores(features, target_feature, damping=float(spec["damping"]))
            units_tau = trak.group_scores(tau, members).cpu().numpy()
            lds = linear_datamodeling_score(h_masks, h_gamma, units_tau, seed=seed)
            seconds = time.perf_counter() - started + target_s
            results.append({
                "output": str(output), "lds": lds_json(lds), "seconds": seconds,
                "compute_retrain_units": seconds / seconds_per_retrain, "tau": units_tau.tolist(),
            })  # fmt: skip
            log.info("TRAK (%s output): LDS %.3f in %.0f s", output, lds.value, seconds)
        return results


def seed_agreement(per_seed: np.ndarray) -> dict[str, Any]:
    """How much of the held-out gamma is a function of the subset: the mean Spearman correlation,
    over pairs of training seeds, of the K held-out gammas of one seed with another's, and the
    Spearman-Brown reliability of their mean over S seeds, S r / (1 + (S - 1) r). An LDS against
    that mean cannot exceed about the square root of its reliability. Empty for one seed."""
    seeds = per_seed.shape[1]
    if seeds < 2:
        return {}
    pairs = [(a, b) for a in range(seeds) for b in range(a + 1, seeds)]
    r = float(np.mean([spearmanr(per_seed[:, a], per_seed[:, b]).statistic for a, b in pairs]))
    return {
        "gamma_heldout_seeds": per_seed.tolist(),
        "heldout_seed_spearman": r,
        "heldout_mean_reliability": seeds * r / (1 + (seeds - 1) * r),
    }


def lds_json(lds: LDSResult) -> dict[str, float]:
    return {"value": lds.value, "low": lds.low, "high": lds.high, "k": lds.n_subsets}


def _signed_interval(lds: dict[str, float]) -> str:
    return f"{lds['value']:+.3f} [{lds['low']:+.3f}, {lds['high']:+.3f}]"


def lds_table(values: dict[str, Any]) -> str:
    """Markdown: LDS per method and budget, with the compute spent in retrainings."""
    lines = [
        "| method | budget (retrainings) | subsets | compute (retrainings, in steps) | LDS | 95% interval "
        "| LDS - retraining's (paired 95% interval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in values["lds"]:
        lds, diff = row["lds"], row.get("lds_minus_retraining")
        versus = "-" if diff is None else _signed_interval(diff)
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['subsets']} | "
            f"{row['compute_retrain_units']:.2f} | {lds['value']:.3f} | "
            f"[{lds['low']:.3f}, {lds['high']:.3f}] | {versus} |"
        )
    for row in values.get("trak", []):
        lds = row["lds"]
        name = (
            "TRAK, D-TRAK output" if row["output"] == "dtrak" else f"TRAK, {row['output']} output"
        )
        lines.append(
            f"| {name} | - | - | {row['compute_retrain_units']:.2f} | {lds['value']:.3f} | "
            f"[{lds['low']:.3f}, {lds['high']:.3f}] | - |"
        )
    lines.append(
        f"\n{values['property']} of {values['target']} ({values['n_ids']} ids in {values['n_units']} "
        f"units, alpha {values['alpha']}); LDS on {values['lds'][0]['lds']['k']} held-out subsets "
        f"retrained from scratch. Retraining {values['retrain_steps']} steps, "
        f"{values['seconds_per_retrain']:.2f} s; unlearning {values['unlearn_steps']} steps after "
        f"pruning {values['pruned_sparsity']:.0%}, {values['seconds_per_unlearn']:.3f} s: cost ratio "
        f"{values['measured_cost_ratio']:.1f}x measured ({values['step_ratio']:.0f}x in steps). "
        f"gamma: full {values['gamma_full']:.4g}, pruned {values['gamma_pruned']:.4g}, held-out "
        f"retrained sd {values['gamma_heldout_std']:.3g}, unlearned sd {values['gamma_unlearn_std']:.3g}. "
        "Compute: optimizer steps over one retraining's; for TRAK, its seconds over one "
        "retraining's (measured seconds depend on the machine's load at the time)."
    )
    if "heldout_seed_spearman" in values:
        seeds = len(values["gamma_heldout_seeds"][0])
        lines.append(
            f"\nHeld-out gamma: the mean over {seeds} training seeds. Between two seeds the held-out "
            f"gammas agree with Spearman {values['heldout_seed_spearman']:.3f}; the reliability of "
            f"their mean is {values['heldout_mean_reliability']:.3f}, so an LDS above about "
            f"{max(values['heldout_mean_reliability'], 0.0) ** 0.5:.2f} is not expected here."
        )
    return "\n".join(lines)


def spaced_ticks(positions: Iterable[float], min_ratio: float = 1.3) -> list[float]:
    """Tick positions for a log axis, rounded to 2 decimals, each at least ``min_ratio`` times the
    previous one (TRAK's two output functions cost about the same: one label, not two on top of
    each other)."""
    ticks: list[float] = []
    for t in sorted({round(p, 2) for p in positions if p > 0}):
        if not ticks or t >= ticks[-1] * min_ratio:
            ticks.append(t)
    return ticks


def fig1_plot(values: dict[str, Any]) -> bytes:
    """LDS (%) against compute in retraining units, one line per method (the paper's Fig. 1)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for method, marker in (("retraining", "o"), ("sparsified unlearning", "s")):
        rows = [r for r in values["lds"] if r["method"] == method]
        x = [r["compute_retrain_units"] for r in rows]
        y = np.array([100 * r["lds"]["value"] for r in rows])
        low = y - np.array([100 * r["lds"]["low"] for r in rows])
        high = np.array([100 * r["lds"]["high"] for r in rows]) - y
        ax.errorbar(x, y, yerr=[low, high], marker=marker, capsize=3, label=method)
    for k, row in enumerate(values.get("trak", [])):  # colours after the two lines' C0, C1
        ax.scatter([row["compute_retrain_units"]], [100 * row["lds"]["value"]], marker="^",
                   color=f"C{2 + k}", label=f"TRAK ({row['output']})")  # fmt: skip
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    # ticks at the budgets and at TRAK's cost (a log axis alone labels only the decades)
    ticks = spaced_ticks(
        float(r["compute_retrain_units"]) for r in [*values["lds"], *values.get("trak", [])]
    )
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("compute (retrainings; TRAK: in seconds)")
    ax.set_ylabel("LDS (%)")
    ax.set_title(
        f"{values['property']} of {values['target']}: {values['n_units']} units, "
        f"unlearning x{values['step_ratio']:.0f}",
        fontsize=10,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
