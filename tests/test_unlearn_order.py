"""The batch order of the unlearning fine-tunes (issue 13, sec. 2): ``unlearn_order=keyed`` sorts
the kept ids by a keyed hash of (seed, epoch, id), so removing units keeps the others' relative
order (common random numbers across subsets); ``shuffled`` is the seeded permutation it always was,
and only the unlearned models' records depend on the choice."""

from __future__ import annotations

import json

import pytest
import torch

from cdm.attribution.removal import DatamodelMethod, SubsetTrainer
from tests.test_removal import SMALL_RUN, TINY

IDS = [f"d{k:04d}" for k in range(40)]
FEWER = ["attribution.method.budgets=[2]", "attribution.method.heldout_subsets=3"]


def trainer(order: str, seed: int = 0, batch_size: int = 8) -> SubsetTrainer:
    """A trainer whose image k is the number k, so a batch shows which rows it took."""
    n = len(IDS)
    return SubsetTrainer(
        backbone=torch.nn.Identity(), alphas_cumprod=torch.ones(1), adapter={},
        images=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), labels=torch.zeros(n),
        optim={"batch_size": batch_size}, conditional=False, seed=seed,
        position={i: k for k, i in enumerate(IDS)}, order=order,
    )  # fmt: skip


def visited(t: SubsetTrainer, ids: list[str], n_batches: int) -> list[int]:
    batches = t.batches(ids)
    return [int(x) for _ in range(n_batches) for x in next(batches)["image"].flatten()]


def test_keyed_order_keeps_the_relative_order_of_the_ids_that_stay():
    t = trainer("keyed")
    kept = [i for k, i in enumerate(IDS) if k % 3 != 1]  # a subset, listed in id order
    for epoch in range(3):
        full = t.epoch_rows(IDS, epoch).tolist()
        rows = {t.position[i] for i in kept}
        assert t.epoch_rows(kept, epoch).tolist() == [r for r in full if r in rows]
        # a function of the ids, not of how they are listed
        assert t.epoch_rows(kept[::-1], epoch).tolist() == t.epoch_rows(kept, epoch).tolist()
    assert t.epoch_rows(IDS, 0).tolist() != t.epoch_rows(IDS, 1).tolist()  # a new order per epoch
    assert t.epoch_rows(IDS, 0).tolist() != trainer("keyed", seed=1).epoch_rows(IDS, 0).tolist()
    # the seeded shuffle does not keep it: the reason for the keyed order
    s = trainer("shuffled")
    rows = {s.position[i] for i in kept}
    assert s.epoch_rows(kept, 0).tolist() != [r for r in s.epoch_rows(IDS, 0).tolist() if r in rows]


@pytest.mark.parametrize("order", ["keyed", "shuffled"])
def test_every_kept_id_is_visited_once_per_epoch(order):
    t = trainer(order)
    kept = IDS[:32]  # 4 batches of 8 an epoch
    seen = visited(t, kept, 8)
    for epoch in (seen[:32], seen[32:]):
        assert sorted(epoch) == list(range(32))
    assert seen[:32] != seen[32:]
    # 30 ids: 3 full batches an epoch, the 6 left over are dropped, each id at most once an epoch
    odd = visited(t, IDS[:30], 3)
    assert len(set(odd)) == 24 and set(odd) <= set(range(30))


def test_shuffled_order_is_the_seeded_permutation_it_always_was():
    """The default path's batches are bit-identical to those of the code before the option."""
    t = trainer("shuffled", seed=3)
    kept = IDS[5:37]
    rows = torch.as_tensor([t.position[i] for i in kept], dtype=torch.long)
    before = []
    for epoch in range(2):  # the former SubsetTrainer.batches, verbatim
        order = rows[
            torch.randperm(len(rows), generator=torch.Generator().manual_seed(3 * 7919 + epoch))
        ]
        before += order.tolist()
    assert visited(t, kept, 8) == before
    assert SubsetTrainer.order == "shuffled" and DatamodelMethod.unlearn_order == "shuffled"


def test_an_unknown_order_fails_with_one_line():
    with pytest.raises(ValueError, match="unlearn_order='sorted'"):
        DatamodelMethod(retrain_steps=8, cost_ratio=4, unlearn_order="sorted")
    with pytest.raises(ValueError, match="order='sorted'"):
        next(trainer("sorted").batches(IDS))


def test_keyed_unlearning_reuses_every_stored_model_but_the_unlearned_ones(
    tiny_digits_backbone, monkeypatch
):
    """The order enters the unlearned models' records (stored shuffled ones are not reused for
    keyed) and not the records file's fingerprint (no retrained model is trained again)."""
    from pathlib import Path

    from cdm.attribution.composition import run_attribution
    from tests.test_attribute_cli import compose_attribute

    def run(*overrides: str) -> tuple[dict, list[tuple[int, str]]]:
        fits: list[tuple[int, str]] = []
        original = SubsetTrainer.fit

        def counted(self, module, ids, steps):
            fits.append((steps, self.order))
            return original(self, module, ids, steps)

        monkeypatch.setattr(SubsetTrainer, "fit", counted)
        cfg = compose_attribute(tiny_digits_backbone, *TINY, *SMALL_RUN, *FEWER, *overrides)
        card = run_attribution(cfg)
        return card, fits

    card, fits = run("attribution.name=shuffled")
    assert fits == [(8, "shuffled")] * (1 + 3 + 2) + [(2, "shuffled")] * 8
    shuffled = json.loads(Path(card["path"], "values.json").read_text())
    card, fits = run("attribution.method.unlearn_order=keyed", "attribution.name=keyed")
    assert fits == [(8, "shuffled")] + [(2, "keyed")] * 8  # the full model, then unlearned only
    keyed = json.loads(Path(card["path"], "values.json").read_text())
    assert keyed["gamma_heldout"] == shuffled["gamma_heldout"]
    assert keyed["gamma_retrain"] == shuffled["gamma_retrain"]
    assert keyed["gamma_unlearn"] != shuffled["gamma_unlearn"]
    (records,) = (Path(card["path"]).parent / ".records").glob("*.jsonl")
    variants = {json.loads(line)["variant"] for line in records.read_text().splitlines()}
    assert {"prune=0.3,layer;steps=2", "prune=0.3,layer;steps=2;order=keyed"} <= variants
    _, fits = run("attribution.method.unlearn_order=keyed", "attribution.name=keyed-again")
    assert fits == [(8, "shuffled")]  # keyed models are read back too
