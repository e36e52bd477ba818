"""The GPU-sized attribution protocol (issue 13, sec. 6: ``attribution/method=datamodels_gpu`` on
``experiment=cifar10_1split data.root=...``) runs on CIFAR-10's own binary layout from a local
path, with only its sizes shrunk: its 3 seeds per held-out subset, class-group units and both TRAK
outputs are the config's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import run_inprocess
from tests.test_attribute_cli import compose_attribute
from tests.test_configs import random_cifar10


def test_the_gpu_protocol_runs_unchanged_but_for_its_sizes(tmp_path):
    from cdm.attribution.composition import run_attribution

    data, store = random_cifar10(tmp_path / "cifar"), tmp_path / "store"
    experiment = [
        "experiment=cifar10_1split",
        f"data.root={data}",
        "debug=tiny",
        "data.resolution=8",
    ]
    run_inprocess(*experiment, "stage=backbone", artifacts=store)
    run_inprocess(*experiment, "stage=feature_net", artifacts=store)
    shrink = [
        "num_samples=8", "batch_size=8", "steps=3", "attribution.method.units.n_groups=10",
        "attribution.method.retrain_steps=8", "attribution.method.cost_ratio=4",
        "attribution.method.heldout_subsets=3", "attribution.method.budgets=[2]",
        "attribution.method.trak.projection_dim=64", "attribution.method.trak.num_timesteps=1",
    ]  # fmt: skip
    cfg = compose_attribute(store, *experiment, "attribution/method=datamodels_gpu", *shrink)
    assert cfg.attribution.method.heldout_seeds == 3  # the config's own D-TRAK protocol
    card = run_attribution(cfg)
    values = json.loads(Path(card["path"], "values.json").read_text())
    assert values["property"] == "FD_cifar10" and values["target"] == "paragon"
    # every private training id of the one shard, in one group per class
    assert values["n_units"] == 10 and sum(values["units"].values()) == values["n_ids"]
    assert {name.split("-")[0] for name in values["units"]} == {f"c{k}" for k in range(10)}
    assert values["step_ratio"] == 4 and values["unlearn_steps"] == 2
    seeds = np.array(values["gamma_heldout_seeds"])
    assert seeds.shape == (3, 3)  # 3 held-out subsets x the config's 3 seeds
    assert np.allclose(seeds.mean(axis=1), values["gamma_heldout"])
    assert len(np.unique(seeds)) == seeds.size  # another seed, another model
    assert [r["output"] for r in values["trak"]] == ["dtrak", "loss"]
    unlearning = [r for r in values["lds"] if r["method"] == "sparsified unlearning"]
    assert [r["subsets"] for r in unlearning] == [8] and "lds_minus_retraining" in unlearning[0]
    (records,) = (Path(card["path"]).parent / ".records").glob("*.jsonl")
    kinds = [json.loads(line)["kind"] for line in records.read_text().splitlines()]
    assert sorted(set(kinds)) == ["full", "heldout", "pruned", "retrain", "unlearn"]
    assert kinds.count("heldout") == 9 and kinds.count("unlearn") == 8
