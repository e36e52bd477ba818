"""``benchmarks/forget_cost.py``: the forgotten ids follow a uniform draw over shards and slices."""

from __future__ import annotations

from benchmarks.forget_cost import draw_ids
from cdm.data.manifest import Manifest

SIZE, HALF = 124, 62  # a shard of 124 ids in 2 slices of 62


class _Store:
    """What ``draw_ids`` reads of an artifact store: the experiment's manifests."""

    def __init__(self, manifests: list[Manifest]) -> None:
        self.manifests = {m.name: m.to_json() for m in manifests}

    def list_manifests(self, experiment: str) -> list[str]:
        return list(self.manifests)

    def load_manifest(self, experiment: str, name: str) -> dict:
        return self.manifests[name]


def shard(k: int) -> Manifest:
    ids = [f"x/{k}-{i:03d}" for i in range(SIZE)]
    return Manifest.build(
        f"shard-{k:02d}", ids, ["0" * 64] * SIZE, [(0, HALF), (HALF, SIZE)], classes=[k]
    )


def test_stratified_draw_takes_one_id_of_every_shard_and_slice_at_random_places():
    shards = [shard(k) for k in range(4)]
    private = Manifest.build("private", [i for m in shards for i in m.ids], ["0" * 64] * 4 * SIZE,
                             [(0, 4 * SIZE)], classes=range(4))  # fmt: skip
    store = _Store([private, *shards])  # the private and safe manifests are not drawn from
    for seed in range(3):
        ids = draw_ids(store, "exp", 8, seed, "stratified")
        assert ids == draw_ids(store, "exp", 8, seed, "stratified")  # seeded
        places = [(k, int(i.split("-")[1])) for i in ids for k in [int(i[2])]]
        # 8 strata of 62 ids: exactly one id in each (shard, slice)
        assert sorted((k, p >= HALF) for k, p in places) == [
            (k, s) for k in range(4) for s in (False, True)
        ]
        # each stratum draws its own place (one offset for all would put every id at the same
        # place of its slice: a biased draw when shards are a multiple of the period)
        assert len({p % HALF for _, p in places}) > 4
    assert len(set(draw_ids(store, "exp", 8, 0, "random"))) == 8
