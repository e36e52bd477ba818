"""Hydra multirun trains every shard, with the joblib and submitit_local launchers."""

from __future__ import annotations

import pytest

from cdm.store import ArtifactStore, read_card


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_multirun_trains_all_shards(tmp_path, cli, launcher):
    args = ["experiment=digits_2split", "debug=tiny"]
    cli(*args, "stage=backbone", artifacts=tmp_path)
    cli(
        "-m",
        *args,
        "stage=shard",
        "shard.index=0,1",
        f"hydra/launcher={launcher}",
        artifacts=tmp_path,
    )
    store = ArtifactStore(tmp_path)
    for k in range(2):
        card = read_card(store.adapter_dir("digits_2split", f"shard-{k:02d}"))
        assert (
            card["manifest_hash"] == store.load_manifest("digits_2split", f"shard-{k:02d}")["hash"]
        )
