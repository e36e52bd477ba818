"""Removal-based attribution (issue 13, section 2): units, the retraining vs sparsified-unlearning
datamodel experiment through cdm-attribute, and its LDS recomputed from what it stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cdm.attribution.datamodels import fit_datamodel, sample_subsets
from cdm.attribution.removal import class_groups, groups_from_file

TINY = ["experiment=digits_4split", "debug=tiny"]
SMALL_RUN = [
    "attribution/method=datamodels", "attribution.property.space=pixels", "num_samples=8",
    "batch_size=8", "steps=3", "attribution.method.units.n_groups=8",
    "attribution.method.retrain_steps=8", "attribution.method.cost_ratio=4",
    "attribution.method.budgets=[2,3]", "attribution.method.heldout_subsets=4",
    "attribution.method.trak.enabled=false",
]  # fmt: skip


def test_class_groups_stay_inside_a_class_and_do_not_move_when_ids_are_removed():
    ids = [f"s{i:03d}" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    units = class_groups(ids, labels, n_groups=6, seed=0)
    assert len(units) == 6
    label_of = dict(zip(ids, labels, strict=True))
    for name, members in zip(units.names, units.members, strict=True):
        assert {label_of[i] for i in members} == {int(name[1])}
    assert sorted(i for m in units.members for i in m) == ids
    # removing some ids leaves every other id in its group (keyed hash order, not positions)
    group_of = {i: n for n, m in zip(units.names, units.members, strict=True) for i in m}
    kept = [i for i in ids if i not in {"s000", "s007", "s031"}]
    again = class_groups(kept, [label_of[i] for i in kept], n_groups=6, seed=0)
    moved = {
        i for n, m in zip(again.names, again.members, strict=True) for i in m if group_of[i] != n
    }
    assert len(moved) <= 6  # only ids at the boundary of a shrunk class's chunks move
    # another seed deals other groups
    other = class_groups(ids, labels, n_groups=6, seed=1)
    assert other.members != units.members


def test_fig1_ticks_do_not_overlap_on_the_log_axis():
    from cdm.attribution.removal import spaced_ticks

    # budgets 2, 4, 8 and TRAK's two output functions at 0.31 and 0.32 retrainings
    assert spaced_ticks([2, 4, 8, 0.314, 0.318, 2.0, 0.0]) == [0.31, 2, 4, 8]
    assert spaced_ticks([0.2, 1.0]) == [0.2, 1.0]


def test_grouping_file_needs_every_training_id(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text("id,group\na,x\nb,y\n")
    units = groups_from_file(path, ["a", "b"])
    assert units.names == ("x", "y")
    with pytest.raises(ValueError, match="no group"):
        groups_from_file(path, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not a file"):
        groups_from_file(tmp_path / "missing.csv", ["a"])


@pytest.fixture(scope="module")
def experiment(tiny_digits_backbone):
    """One small run of the datamodel experiment on a tiny backbone (FD in pixel space)."""
    from cdm.attribution.composition import run_attribution
    from tests.test_attribute_cli import compose_attribute

    cfg = compose_attribute(tiny_digits_backbone, *TINY, *SMALL_RUN)
    card = run_attribution(cfg)
    values = json.loads(open(f"{card['path']}/values.json").read())
    return card, values


def test_the_experiment_reports_lds_of_both_datamodels_at_every_budget(experiment):
    card, values = experiment
    rows = values["lds"]
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("retraining", 2), ("sparsified unlearning", 2),
        ("retraining", 3), ("sparsified unlearning", 3),
    ]  # fmt: skip
    # unlearning gets cost_ratio times the subsets of retraining at each budget
    assert [r["subsets"] for r in rows] == [2, 8, 3, 12]
    assert [r["compute_retrain_units"] for r in rows] == [2, 2, 3, 3]  # equal compute, in steps
    assert values["unlearn_steps"] == 2 and values["step_ratio"] == 4
    assert values["pruned_sparsity"] == pytest.approx(0.3, abs=0.02)
    assert card["parents"][0]["kind"] == "backbone"
    png = open(f"{card['path']}/lds-vs-compute.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_stored_lds_is_the_spearman_correlation_of_the_stored_gammas(experiment):
    _, values = experiment
    n = values["n_units"]
    heldout = np.array(values["subsets"]["heldout"], dtype=bool)
    retrain = np.array(values["subsets"]["retrain"], dtype=bool)
    unlearn = sample_subsets(n, len(values["gamma_unlearn"]), alpha=0.5, seed=values["seed"] + 1)
    for row in values["lds"]:
        masks, gammas = (
            (retrain, values["gamma_retrain"]) if row["method"] == "retraining"
            else (unlearn, values["gamma_unlearn"])
        )  # fmt: skip
        tau = fit_datamodel(masks[: row["subsets"]], gammas[: row["subsets"]]).tau
        rho = spearmanr(values["gamma_heldout"], heldout @ tau).statistic
        assert row["lds"]["value"] == pytest.approx(rho, abs=1e-12)
    # the goal's paired comparison: unlearning's LDS minus retraining's at the same budget
    by_budget = {(r["method"], r["budget"]): r["lds"]["value"] for r in values["lds"]}
    for row in values["lds"]:
        if row["method"] == "retraining":
            assert "lds_minus_retraining" not in row
            continue
        diff = row["lds_minus_retraining"]
        assert diff["value"] == pytest.approx(
            by_budget[row["method"], row["budget"]] - by_budget["retraining", row["budget"]]
        )
        assert diff["low"] <= diff["value"] <= diff["high"]


def test_a_subset_retrained_twice_gives_the_same_gamma(tiny_digits_backbone):
    """Every model starts from the same seed: gamma depends on the kept data only."""
    from cdm.attribution.composition import AttributionContext
    from cdm.attribution.removal import DatamodelMethod, RemovalExperiment
    from cdm.jobs.pipeline import instantiate_option
    from cdm.store import ArtifactStore
    from tests.test_attribute_cli import compose_attribute

    cfg = compose_attribute(tiny_digits_backbone, *TINY, *SMALL_RUN)
    method = instantiate_option(cfg.attribution.method)
    assert isinstance(method, DatamodelMethod)
    ctx = AttributionContext(cfg, ArtifactStore(tiny_digits_backbone), None)
    exp = RemovalExperiment(method, ctx)
    mask = sample_subsets(len(exp.units), 1, seed=5)[0]
    gammas, weights = [], []
    for _ in range(2):
        module = exp.trainer.fresh()
        exp.trainer.fit(module, exp.retained(mask), 4)
        gammas.append(exp.gamma(module))
        weights.append(
            torch.cat([p.detach().flatten() for p in module.parameters() if p.requires_grad])
        )
    assert gammas[0] == gammas[1]
    assert torch.equal(weights[0], weights[1])
    other = exp.trainer.fresh()
    exp.trainer.fit(other, exp.retained(~mask), 4)
    assert exp.gamma(other) != gammas[0]


def test_bad_settings_fail_with_one_line(tiny_digits_backbone):
    from cdm.attribution.removal import DatamodelMethod

    with pytest.raises(ValueError, match="no unlearning step"):
        DatamodelMethod(retrain_steps=8, cost_ratio=64)
    with pytest.raises(ValueError, match="budgets"):
        DatamodelMethod(budgets=[1, 2])


def test_a_rerun_reads_the_measured_models_back(experiment, tiny_digits_backbone, monkeypatch):
    """An interrupted or repeated run does not train again what it measured (records file)."""
    from pathlib import Path

    from cdm.attribution.composition import run_attribution
    from cdm.attribution.removal import SubsetTrainer
    from tests.test_attribute_cli import compose_attribute

    card, values = experiment
    (records,) = (Path(card["path"]).parent / ".records").glob("*.jsonl")
    assert len(records.read_text().splitlines()) == 2 + 4 + 3 + 12  # full, pruned, K, R, U
    fits = []
    original = SubsetTrainer.fit

    def counted(self, module, ids, steps):
        fits.append(steps)
        return original(self, module, ids, steps)

    monkeypatch.setattr(SubsetTrainer, "fit", counted)
    again = run_attribution(compose_attribute(tiny_digits_backbone, *TINY, *SMALL_RUN))
    assert fits == [8]  # the full model only (pruning and TRAK need its weights)
    rerun = json.loads(open(f"{again['path']}/values.json").read())
    for key in ("gamma_heldout", "gamma_retrain", "gamma_unlearn", "lds", "gamma_full"):
        assert rerun[key] == values[key]
    # other unlearning settings: only the unlearned models are new (the retrained ones are kept)
    fits.clear()
    other = compose_attribute(
        tiny_digits_backbone, *TINY, *SMALL_RUN, "attribution.method.cost_ratio=2"
    )
    changed = json.loads(open(f"{run_attribution(other)['path']}/values.json").read())
    assert fits == [8] + [4] * 6  # the full model, then 3 x 2 unlearned models of 8 / 2 steps
    assert changed["gamma_heldout"] == values["gamma_heldout"]
    assert changed["gamma_retrain"] == values["gamma_retrain"][:3]
    assert len(changed["gamma_unlearn"]) == 6
    # a second training seed for the held-out subsets: only the 4 new models train, and each
    # held-out gamma is the mean of its two seeds' records (the first seed's read back)
    fits.clear()
    seeded = compose_attribute(
        tiny_digits_backbone, *TINY, *SMALL_RUN, "attribution.method.heldout_seeds=2"
    )
    averaged = json.loads(open(f"{run_attribution(seeded)['path']}/values.json").read())
    assert fits == [8] + [8] * 4
    second = {
        r["index"]: r["gamma"]
        for r in map(json.loads, records.read_text().splitlines())
        if r["kind"] == "heldout" and r["variant"] == "seeds=1;seed+1"
    }
    assert sorted(second) == [0, 1, 2, 3]
    expected = [(g + second[i]) / 2 for i, g in enumerate(values["gamma_heldout"])]
    assert averaged["gamma_heldout"] == pytest.approx(expected, rel=1e-12)
    assert averaged["gamma_heldout"] != values["gamma_heldout"]
    # how far the target is a function of the subset: the two seeds' gammas, rank-correlated
    pair = [values["gamma_heldout"], [second[i] for i in range(4)]]
    assert averaged["gamma_heldout_seeds"] == [list(x) for x in zip(*pair, strict=True)]
    r = spearmanr(*pair).statistic
    assert averaged["heldout_seed_spearman"] == pytest.approx(r)
    assert averaged["heldout_mean_reliability"] == pytest.approx(2 * r / (1 + r))
    assert "heldout_seed_spearman" not in values  # one seed: nothing to compare


@pytest.mark.slow  # 16 s: trains the domain feature net; cdm.attribution.trak's math is in test_trak.py
def test_trak_baseline_scores_units_on_the_same_heldout_subsets(tiny_digits_backbone):
    """TRAK (D-TRAK and loss output functions) against FD in the domain feature net's space."""
    from scipy.stats import spearmanr as rho

    from cdm.attribution.composition import run_attribution
    from tests.conftest import run_inprocess
    from tests.test_attribute_cli import compose_attribute

    run_inprocess(*TINY, "stage=feature_net", artifacts=tiny_digits_backbone)
    overrides = [
        o
        for o in SMALL_RUN
        if not o.startswith(("attribution.property.space", "attribution.method.trak"))
    ]
    overrides += ["attribution.method.trak.projection_dim=64", "attribution.method.budgets=[2]",
                  "attribution.name=with-trak"]  # fmt: skip
    card = run_attribution(compose_attribute(tiny_digits_backbone, *TINY, *overrides))
    values = json.loads(open(f"{card['path']}/values.json").read())
    assert values["property"].startswith("FD_")
    rows = {r["output"]: r for r in values["trak"]}
    assert set(rows) == {"dtrak", "loss"}
    heldout = np.array(values["subsets"]["heldout"], dtype=bool)
    for row in rows.values():
        tau = np.array(row["tau"])
        assert tau.shape == (values["n_units"],) and np.isfinite(tau).all() and np.ptp(tau) > 0
        expected = rho(values["gamma_heldout"], heldout @ tau).statistic
        assert row["lds"]["value"] == pytest.approx(expected, abs=1e-12)
    assert not np.allclose(rows["dtrak"]["tau"], rows["loss"]["tau"])
    table = open(f"{card['path']}/table.md").read()
    assert "TRAK, D-TRAK output" in table


def test_trak_baseline_refuses_a_property_it_cannot_differentiate(tiny_digits_backbone):
    from cdm.attribution.composition import AttributionContext
    from cdm.attribution.removal import RemovalExperiment
    from cdm.jobs.pipeline import instantiate_option
    from cdm.store import ArtifactStore
    from tests.test_attribute_cli import compose_attribute

    cfg = compose_attribute(tiny_digits_backbone, *TINY, *SMALL_RUN)
    exp = RemovalExperiment(
        instantiate_option(cfg.attribution.method),
        AttributionContext(cfg, ArtifactStore(tiny_digits_backbone), None),
    )
    with pytest.raises(ValueError, match="no differentiable path"):
        exp.trak_baseline(exp.trainer.fresh())


def test_sweep_names_differ_per_job_and_are_valid_store_names():
    from cdm.cli.attribute import sweep_name
    from cdm.store.layout import validate_name

    common = ["experiment=digits_4split", "attribution/method=datamodels", "paths.artifacts=/x"]
    a = sweep_name("datamodels-fd", [*common, "attribution.method.pruning_ratio=0.2"])
    b = sweep_name("datamodels-fd", [*common, "attribution.method.pruning_ratio=0.5"])
    assert a == "datamodels-fd-method=datamodels_pruning_ratio=0.2" and a != b
    long = [*common, *(f"attribution.method.key{i}=value/{i}" for i in range(20))]
    names = {sweep_name("datamodels-fd", [*long, f"seed={s}"]) for s in range(3)}
    assert len(names) == 3 and all(validate_name(n) == n and len(n) <= 128 for n in names)


@pytest.mark.slow
def test_a_multirun_sweep_writes_one_result_per_job(tiny_digits_backbone, tmp_path):
    """cdm-attribute -m: each job of a sweep gets its own folder (named by its overrides)."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "cdm.cli.attribute", "-m", *TINY, *SMALL_RUN,
            "attribution.method.pruning_ratio=0.2,0.5", f"paths.artifacts={tiny_digits_backbone}",
            f"hydra.sweep.dir={tmp_path}/sweep"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tiny_digits_backbone / "experiments" / "digits_4split" / "attribution"
    swept = [p for p in folder.iterdir() if p.name.startswith("datamodels-fd-")]
    assert len(swept) == 2
    sparsity = sorted(json.loads((p / "values.json").read_text())["pruned_sparsity"] for p in swept)
    assert sparsity == [pytest.approx(0.2, abs=0.02), pytest.approx(0.5, abs=0.02)]


def test_a_whole_model_is_pruned_and_unlearned_with_its_masks_kept(tiny_digits_backbone):
    """adapter=full: the attributed model is a whole UNet (the paragon as a full fine-tune)."""
    import copy

    from cdm.attribution.composition import AttributionContext
    from cdm.attribution.removal import RemovalExperiment
    from cdm.attribution.unlearning import magnitude_prune, sparsity
    from cdm.jobs.pipeline import instantiate_option
    from cdm.store import ArtifactStore
    from tests.test_attribute_cli import compose_attribute

    cfg = compose_attribute(tiny_digits_backbone, *TINY, *SMALL_RUN, "adapter=full")
    exp = RemovalExperiment(
        instantiate_option(cfg.attribution.method),
        AttributionContext(cfg, ArtifactStore(tiny_digits_backbone), None),
    )
    full = exp.trainer.fresh()
    backbone_params = sum(p.numel() for p in exp.trainer.backbone.parameters())
    assert sum(p.numel() for p in full.parameters() if p.requires_grad) == backbone_params
    exp.trainer.fit(full, exp.ids, 2)
    pruned = copy.deepcopy(full)
    magnitude_prune(pruned.model, ratio=0.3)
    assert sparsity(pruned.model) == pytest.approx(0.3, abs=0.01)
    mask = sample_subsets(len(exp.units), 1, seed=0)[0]
    exp.trainer.fit(pruned, exp.retained(mask), 3)
    for module_name, module in pruned.model.named_modules():
        for buffer_name, keep in module.named_buffers(recurse=False):
            if buffer_name.endswith("_mask"):
                weight = getattr(module, buffer_name[: -len("_mask")])
                assert torch.all(weight[keep == 0] == 0), module_name


def test_a_compartment_can_be_measured_against_its_own_data(tiny_digits_backbone):
    """``evaluate.reference=shard-KK``: gamma is FD to that shard's training images, the property
    says so, and its models are kept apart from those measured against all private data."""
    from cdm.attribution.composition import AttributionContext
    from cdm.attribution.removal import RemovalExperiment
    from cdm.eval.features import to_uint8
    from cdm.eval.frechet import frechet_distance, stats_from_features
    from cdm.jobs.context import load_data, select_manifest, split_data
    from cdm.jobs.pipeline import instantiate_option
    from cdm.store import ArtifactStore
    from tests.test_attribute_cli import compose_attribute

    store = ArtifactStore(tiny_digits_backbone)
    run = [*TINY, *SMALL_RUN, "attribution.method.target=shard-01"]
    experiments = {}
    for reference in ("private", "shard-01"):
        cfg = compose_attribute(tiny_digits_backbone, *run, f"evaluate.reference={reference}")
        ctx = AttributionContext(cfg, store, None)
        experiments[reference] = RemovalExperiment(instantiate_option(cfg.attribution.method), ctx)
    own = experiments["shard-01"]
    assert own.ctx.prop.name == "FD_pixels vs shard-01"
    assert experiments["private"].ctx.prop.name == "FD_pixels"
    assert own.records_path != experiments["private"].records_path
    # the reference statistics are those of shard 01's images, not of all private data
    dataset = load_data(own.cfg)
    shard = select_manifest("shard", split_data(own.cfg, dataset), 1)
    images = to_uint8(torch.stack([dataset.image(dataset.id_to_index[i]) for i in shard.ids]))
    mine = stats_from_features(own.ctx.prop.feature_space(images))
    np.testing.assert_allclose(own.ctx.prop.reference.mu, mine.mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(own.ctx.prop.reference.sigma, mine.sigma, rtol=0, atol=1e-12)
    assert frechet_distance(mine, experiments["private"].ctx.prop.reference) > 1e-2


def test_gammas_are_keyed_by_the_reference_sets_ids_not_its_name(tiny_digits_backbone, monkeypatch):
    """A reference whose data changed (same name, other ids: e.g. a forget in another shard)
    gets a new records file; the paragon's default reference is its own data and adds no key."""
    import cdm.attribution.removal as removal
    from cdm.attribution.composition import AttributionContext
    from cdm.jobs.context import load_data, select_manifest, split_data
    from cdm.jobs.evaluate import reference_rows
    from cdm.jobs.pipeline import instantiate_option
    from cdm.store import ArtifactStore
    from tests.test_attribute_cli import compose_attribute

    store = ArtifactStore(tiny_digits_backbone)
    cfg = compose_attribute(
        tiny_digits_backbone, *TINY, *SMALL_RUN, "attribution.method.target=shard-01"
    )

    def records_path() -> Path:
        ctx = AttributionContext(cfg, store, None)
        return removal.RemovalExperiment(
            instantiate_option(cfg.attribution.method), ctx
        ).records_path

    before = records_path()
    rows, ids_hash = reference_rows(cfg, store, load_data(cfg))
    monkeypatch.setattr(removal, "reference_rows", lambda *a: (rows[1:], "other-" + ids_hash))
    assert records_path() != before  # the private set lost an id: no gamma is reused
    monkeypatch.undo()
    assert records_path() == before
    paragon = compose_attribute(
        tiny_digits_backbone, *TINY, *SMALL_RUN, "attribution.method.target=paragon"
    )
    dataset = load_data(paragon)
    own = select_manifest("paragon", split_data(paragon, dataset), 0).hash
    assert reference_rows(paragon, store, dataset)[1] == own  # so paragon records stay valid
