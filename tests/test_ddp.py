"""A shard trained on 2 CPU processes (ddp_spawn, gloo): each rank a disjoint part of the shard."""

from __future__ import annotations

from cdm.data.datamodule import SliceSampler
from cdm.store import ArtifactStore, read_card


def test_rank_parts_are_disjoint_and_cover_the_slice():
    indices = list(range(100, 203))  # 103 samples: not divisible by 2 ranks
    parts = [SliceSampler(indices, seed=3, epoch=1, rank=r, world_size=2).indices for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 52
    assert set(parts[0]) | set(parts[1]) == set(indices)
    # the only overlap is the one padding sample, repeated from the same shard
    assert len(set(parts[0]) & set(parts[1])) <= 1


def test_shard_trains_on_two_cpu_processes(tmp_path, cli, train):
    args = ["experiment=digits_2split", "debug=tiny"]
    train(*args, "stage=backbone", artifacts=tmp_path)  # in process: only the shard needs DDP
    cli(*args, "stage=shard", "shard.index=1", "trainer=ddp_cpu", artifacts=tmp_path)
    store = ArtifactStore(tmp_path)
    card = read_card(store.adapter_dir("digits_2split", "shard-01"))
    manifest = store.load_manifest("digits_2split", "shard-01")
    assert card["world_size"] == 2
    # the ids gathered from both ranks are exactly the shard's
    assert card["manifest_hash"] == manifest["hash"]
    assert card["n_samples_fed"] == len(manifest["ids"])
