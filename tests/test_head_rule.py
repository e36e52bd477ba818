"""The compartmental router's heads stop by a rule too (issue 11 item 10, issue 12): once the last
slice joined, the head's logistic loss on held-out shard vs safe images decides, as the held-out
denoising loss does for adapters. The held-out pairs are test images only: no shard's training
id and no safe id, so a SISA restart runs the same rule as training from scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdm.store import ArtifactStore

TINY = ["experiment=digits_4split", "debug=tiny", "stage=head"]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """A store holding a tiny safe backbone for digits (trained once for this module)."""
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("artifacts")
    run_inprocess("experiment=digits_4split", "debug=tiny", "stage=backbone", artifacts=root)
    return root


def rule(**settings: object) -> list[str]:
    return [f"router.convergence.{k}={v}" for k, v in settings.items()]


def head_card(root: Path, experiment: str, shard: str = "shard-00") -> dict:
    return ArtifactStore(root).read_head_card(experiment, shard)


def test_the_rule_stops_a_head_by_patience_and_records_it(store_root, train):
    # no check improves the best loss by 100%: the head stops `patience` checks after its first,
    # far inside max_steps; without the rule it runs exactly its slices' epochs
    train(*TINY, "experiment_name=head-patience",
          *rule(min_steps=0, max_steps=500, patience=2, check_every_steps=1, min_improvement=1.0),
          artifacts=store_root)  # fmt: skip
    card = head_card(store_root, "head-patience")
    summary = card["convergence"]
    assert summary["stopped_by"] == "patience" and summary["checks"] == 3
    assert summary["heldout_samples"] > 0 and summary["heldout_loss"] > 0
    assert summary["heldout_loss"] == pytest.approx(card["metrics"]["heldout_loss"], rel=1e-5)
    assert card["optimizer_steps"] == card["metrics"]["global_step"] < 500
    assert card["metrics"]["epochs"] == 2 + 2  # 2 slices x 1 epoch, then one per further check

    train(*TINY, "experiment_name=head-fixed", "router.convergence=null", artifacts=store_root)
    fixed = head_card(store_root, "head-fixed")
    assert fixed["convergence"] is None and fixed["metrics"]["epochs"] == 2
    assert fixed["optimizer_steps"] < card["optimizer_steps"]


def test_heldout_pairs_hold_no_training_or_safe_id():
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.jobs.context import load_data, select_manifest, split_data
    from cdm.jobs.train import heldout_indices, heldout_negatives, job_schedule

    register_resolvers()
    for experiment, safe_classes in (("digits_4split", None), ("digits_4split_private", {0, 1})):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=[f"experiment={experiment}", "debug=tiny", "stage=head", "shard.index=1"],
            )
        dataset = load_data(cfg)
        split = split_data(cfg, dataset)
        slices, _, _ = job_schedule(cfg, dataset, select_manifest("head", split, 1))
        positives = heldout_indices(cfg, dataset, split, slices, 10_000)
        negatives = heldout_negatives(cfg, dataset, 10_000)
        assert positives and negatives
        held_out = {dataset.ids[i] for i in positives + negatives}
        trained = set(split.safe.ids).union(*(m.ids for m in split.shards))
        assert not held_out & trained, experiment  # no shard's training id, no safe id
        assert {dataset.splits[i] for i in positives + negatives} == {"test"}
        shard_classes = {int(dataset.labels[i]) for s in slices for i in s}
        assert {int(dataset.labels[i]) for i in positives} == shard_classes
        neg_classes = {int(dataset.labels[i]) for i in negatives}
        assert neg_classes == (safe_classes or set(range(10))), experiment
        assert heldout_negatives(cfg, dataset, 7) == negatives[:7]  # a fixed, seeded draw


def test_heldout_head_loss_is_deterministic_and_keeps_modes():
    from cdm.eval.head_loss import heldout_head_loss

    torch.manual_seed(0)
    data = [{"image": torch.randn(1, 4, 4), "label": torch.tensor(i % 3)} for i in range(12)]

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = torch.nn.Dropout(0.5).eval()  # a frozen part left in eval mode
            self.lin = torch.nn.Linear(16 + 1, 1)

        def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.cat([x_t.flatten(1), timesteps[:, None] / 100], 1))

    head = Head()
    alphas = torch.linspace(0.99, 0.01, 100)
    kwargs = dict(positives=range(6), negatives=range(6, 12), alphas_cumprod=alphas, repeats=2,
                  seed=3, batch_size=4)  # fmt: skip
    first = heldout_head_loss(head, data, **kwargs)
    assert heldout_head_loss(head, data, **kwargs) == first  # fixed noise: checks compare exactly
    assert head.training and not head.frozen.training
    with torch.no_grad():
        head.lin.bias += 5.0  # calls everything a positive: the loss moves
    assert heldout_head_loss(head, data, **kwargs) != first


@pytest.mark.slow  # two cdm-train processes: ~25 s
def test_killed_while_converging_head_resumes_bit_identical(store_root, cli, train):
    # killed after a few held-out checks: the rule's state is in last.ckpt, so the resumed head
    # stops at the same step with the same weights
    args = (*TINY, *rule(min_steps=10, max_steps=40, patience=3, check_every_steps=1,
                         min_improvement=0.05))  # fmt: skip
    train(*args, "experiment_name=head-ref", artifacts=store_root)
    killed = cli(*args, "experiment_name=head-res", "kill_at_step=8", artifacts=store_root,
                 check=False)  # fmt: skip
    assert killed.returncode == 17, killed.stderr[-2000:]
    cli(*args, "experiment_name=head-res", artifacts=store_root)
    ref, res = head_card(store_root, "head-ref"), head_card(store_root, "head-res")
    assert ref["convergence"]["checks"] >= 2 and ref["optimizer_steps"] > 8
    assert ref["convergence"] == res["convergence"]
    assert ref["optimizer_steps"] == res["optimizer_steps"]
    store = ArtifactStore(store_root)
    a, b = (load_file(store.head_dir(e, "shard-00") / "router.safetensors")
            for e in ("head-ref", "head-res"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_quality_band_heads_positives_are_held_out_images_of_its_band(tmp_path):
    """sharding=by_score: every band holds every class, so positives by class alone would be the
    safe distribution itself; they are the test images whose score lies in the shard's band."""
    import numpy as np
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.jobs.context import load_data, select_manifest, split_data
    from cdm.jobs.train import heldout_indices, job_schedule

    rng = np.random.default_rng(0)
    n = 240
    np.savez(
        tmp_path / "scored.npz",
        images=rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8),
        labels=np.arange(n) % 3,
        scores=rng.permutation(n).astype(float),
        split=np.where(np.arange(n) % 4 == 0, "test", "train"),
    )
    register_resolvers()
    overrides = ["experiment=digits_4split", "debug=tiny", "data=npz", f"data.root={tmp_path / 'scored.npz'}",
                 "data.num_classes=3", "data.channels=1", "data.resolution=8", "sharding=by_score",
                 "sharding.n_shards=3", "stage=head"]  # fmt: skip
    bands = []
    for index in range(3):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*overrides, f"shard.index={index}"])
        dataset = load_data(cfg)
        split = split_data(cfg, dataset)
        manifest = select_manifest("head", split, index)
        slices, _, _ = job_schedule(cfg, dataset, manifest)
        positives = heldout_indices(cfg, dataset, split, slices, 10_000, manifest.meta)
        low, high = manifest.meta["score_min"], manifest.meta["score_max"]
        assert positives and all(low <= float(dataset.scores[i]) <= high for i in positives)
        assert {dataset.splits[i] for i in positives} == {"test"}
        everything = heldout_indices(cfg, dataset, split, slices, 10_000)
        assert len(positives) < len(everything)  # without the band: every test image
        bands.append(set(positives))
    assert not (bands[0] & bands[1]) and not (bands[1] & bands[2])
