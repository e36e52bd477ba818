"""Every training stage converges by one rule (issue 11, item 10): slices join on their schedule,
then training goes on until the held-out denoising loss stops improving, within a step budget
that does not depend on the shard's size. Steps and the final held-out loss are on the card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdm.store import ArtifactStore, read_card

TINY = ["experiment=digits_4split", "debug=tiny"]


@pytest.fixture(scope="module")
def store_root(tiny_digits_backbone) -> Path:
    """A store holding a tiny safe backbone for digits (trained once for this module)."""
    return tiny_digits_backbone


def budget(min_steps: int, max_steps: int, **extra: object) -> list[str]:
    rule = {"min_steps": min_steps, "max_steps": max_steps, **extra}
    return [f"optim.convergence.{k}={v}" for k, v in rule.items()]


def card_of(root: Path, experiment: str, job: str) -> dict:
    return read_card(ArtifactStore(root).adapter_dir(experiment, job))


def test_step_budget_does_not_depend_on_shard_size(store_root, train):
    # no check can stop it before max_steps: a shard (~300 samples) and the paragon (all private
    # data, ~4x larger) get the same number of optimizer steps (a fixed schedule gave ~5 vs ~15)
    rule = budget(40, 40, check_every_steps=1000)
    train(*TINY, "stage=shard", "shard.index=0", "experiment_name=budget", *rule, artifacts=store_root)  # fmt: skip
    train(*TINY, "stage=paragon", "experiment_name=budget", *rule, artifacts=store_root)
    for job in ("shard-00", "paragon"):
        card = card_of(store_root, "budget", job)
        assert card["optimizer_steps"] == 40 == card["metrics"]["global_step"], job
        assert card["convergence"]["stopped_by"] == "max_steps"
        assert card["convergence"]["heldout_loss"] > 0  # evaluated as it stopped
    # the slice checkpoints are the SISA ones only: epochs after the last slice write last.ckpt
    ckpts = ArtifactStore(store_root).checkpoint_dir("budget", "shard-00")
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == [
        "last.ckpt", "slice-00.ckpt", "slice-01.ckpt"
    ]  # fmt: skip


def test_training_stops_when_the_heldout_loss_stops_improving(store_root, train):
    # no check improves the best loss by 100%: the rule stops at the first epoch end past
    # min_steps with `patience` checks behind it, long before max_steps
    rule = budget(8, 500, patience=2, check_every_steps=1, min_improvement=1.0)
    train(*TINY, "stage=shard", "shard.index=1", "experiment_name=patience", *rule, artifacts=store_root)  # fmt: skip
    card = card_of(store_root, "patience", "shard-01")
    rule = card["convergence"]
    assert rule["stopped_by"] == "patience"
    assert 8 <= card["optimizer_steps"] < 20 and rule["checks"] >= 3
    assert rule["heldout_loss"] == pytest.approx(card["metrics"]["heldout_loss"], rel=1e-5)
    assert rule["heldout_samples"] > 0


def test_fixed_schedule_without_a_rule(store_root, train):
    train(*TINY, "stage=shard", "shard.index=1", "experiment_name=fixed",
          "optim.convergence=null", artifacts=store_root)  # fmt: skip
    card = card_of(store_root, "fixed", "shard-01")
    assert card["convergence"] is None and card["metrics"]["epochs"] == 2  # 2 slices x 1 epoch


def test_router_and_feature_net_stop_by_their_rule(store_root, train):
    # the router and the feature net stop when their validation loss stalls (Lightning early
    # stopping, issue 11 item 10: every stage): an improvement of 100 is never reached, so each
    # stops `patience` epochs after its first, far inside a budget of 30 epochs
    stall = ["convergence.patience=1", "convergence.min_delta=100", "epochs=30"]
    root = ArtifactStore(store_root)
    train(*TINY, "stage=router", "experiment_name=rule",
          *(f"router.{o}" for o in stall), artifacts=store_root)  # fmt: skip
    card = read_card(root.router_dir("rule"))
    assert card["convergence"]["stopped_by"] == "patience"
    assert card["convergence"]["epochs"] == 2 == card["metrics"]["epochs"]
    assert card["convergence"]["val_loss_best"] == pytest.approx(
        card["metrics"]["router/val_loss"], rel=0.5
    )
    train(*TINY, "stage=feature_net", "experiment_name=rule", "feature_net.id=rule",
          *(f"feature_net.{o}" for o in stall), artifacts=store_root)  # fmt: skip
    card = read_card(root.feature_net_dir("rule"))
    assert card["convergence"]["stopped_by"] == "patience" and card["metrics"]["epochs"] == 2
    # without the rule: exactly the budget
    train(*TINY, "stage=router", "experiment_name=rule_off", "router.convergence=null",
          "router.epochs=3", artifacts=store_root)  # fmt: skip
    card = read_card(root.router_dir("rule_off"))
    assert card["convergence"] is None and card["metrics"]["epochs"] == 3


def test_heldout_set_is_test_data_of_the_jobs_classes():
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.jobs.context import load_data, select_manifest, split_data
    from cdm.jobs.train import heldout_indices, job_schedule

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, "stage=shard", "shard.index=2"])
    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    manifest = select_manifest("shard", split, 2)
    slices, _, _ = job_schedule(cfg, dataset, manifest)
    rows = heldout_indices(cfg, dataset, split, slices, 10_000)
    trained = {i for s in slices for i in s}
    private = {dataset.id_to_index[i] for i in split.private.ids}
    assert rows and not set(rows) & (trained | private)
    assert {dataset.splits[i] for i in rows} == {"test"}
    assert {int(dataset.labels[i]) for i in rows} == {int(dataset.labels[i]) for i in trained}


def test_killed_while_converging_resumes_bit_identical(store_root, cli, train):
    # killed after several held-out checks: the rule's state is in last.ckpt, so the resumed run
    # stops at the same step with the same weights
    args = (*TINY, "stage=shard", "shard.index=3",
            *budget(14, 60, patience=3, check_every_steps=1, min_improvement=0.05))  # fmt: skip
    train(*args, "experiment_name=conv-ref", artifacts=store_root)
    killed = cli(*args, "experiment_name=conv-res", "kill_at_step=10", artifacts=store_root,
                 check=False)  # fmt: skip
    assert killed.returncode == 17, killed.stderr[-2000:]
    cli(*args, "experiment_name=conv-res", artifacts=store_root)
    ref, res = (
        card_of(store_root, "conv-ref", "shard-03"),
        card_of(store_root, "conv-res", "shard-03"),
    )
    assert ref["convergence"]["checks"] >= 3
    assert ref["convergence"] == res["convergence"]
    assert ref["optimizer_steps"] == res["optimizer_steps"]
    store = ArtifactStore(store_root)
    a, b = (load_file(store.adapter_dir(e, "shard-03") / "adapter_model.safetensors")
            for e in ("conv-ref", "conv-res"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
