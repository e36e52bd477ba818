"""Table 1 and Fig. 2 on a user's own data with one command (issue 11, item 9): the shard count is
an override of the config's data (no experiment file per split), and the user's config
directories (``--config-dir``, ``hydra.searchpath``) reach every inner compose."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from cdm.jobs.config import config_dir, register_resolvers
from cdm.store import ArtifactStore, read_card

REPO = Path(__file__).resolve().parents[1]
USER_EXPERIMENT = """# @package _global_
experiment_name: mine_2split
sharding:
  n_shards: 2
  strategy: random
"""


def make_npz(path: Path, n: int = 240, classes: int = 4) -> Path:
    """8x8 grayscale images, no ``split`` array (as a user's file would often be)."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = (rng.random((n, 8, 8)) * 60 + labels[:, None, None] * 45).astype(np.uint8)
    np.savez(path, images=images, labels=labels)
    return path


def user_config_dir(root: Path) -> Path:
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "mine_2split.yaml").write_text(USER_EXPERIMENT)
    return root


@pytest.fixture
def composed(tmp_path):
    """``experiment_config`` as it runs inside ``cdm-table1 hydra.searchpath=[<user dir>]``."""
    from cdm.paper.table1 import experiment_config

    register_resolvers()
    user = user_config_dir(tmp_path / "conf")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        outer = compose(
            config_name="table1",
            overrides=[f"hydra.searchpath=[file://{user}]"],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(outer)
        try:
            yield experiment_config
        finally:
            HydraConfig.instance().cfg = None


def test_hydra_searchpath_reaches_the_inner_compose(composed):
    cfg = composed("mine_2split", [], ["stage=shard"])
    assert cfg.sharding.strategy == "random" and cfg.experiment_name == "mine_2split"


def test_an_experiment_without_a_file_shards_the_configs_data(composed, tmp_path):
    data = ["data=npz", f"data.root={tmp_path / 'mine.npz'}", "data.num_classes=3"]
    cfg = composed("mine_8split", data, [])
    assert cfg.experiment_name == "mine_8split" and cfg.sharding.n_shards == 8
    assert cfg.data._target_.endswith("load_npz") and cfg.sharding.strategy == "by_class"
    shipped = composed("digits_4split", [], [])  # a shipped experiment is still used as it is
    assert shipped.data.name == "digits" and shipped.sharding.n_shards == 4
    with pytest.raises(ValueError, match="<dataset>_<n>split"):
        composed("mine", data, [])


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={cwd}/hydra-run"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_table1_and_fig2_on_a_users_npz_with_one_command(tmp_path):
    npz = make_npz(tmp_path / "mine.npz")
    user = user_config_dir(tmp_path / "conf")
    artifacts = tmp_path / "artifacts"
    common = [
        "data=npz", f"data.root={npz}", "data.num_classes=4", "data.resolution=8",
        "data.channels=1", "debug=tiny", "num_samples=12", "batch_size=12", "steps=2",
        f"paths.artifacts={artifacts}",
    ]  # fmt: skip
    run("cdm.cli.table1", "--config-dir", str(user), *common, "table1.splits=[1,2,4]",
        "table1.compositions=[classifier,average]", "table1.n_jobs=1", cwd=tmp_path)  # fmt: skip
    table = artifacts / "tables" / "table1"
    card = read_card(table)
    rows = list(csv.reader(open(table / "table.csv")))
    assert rows[0][:3] == ["Dataset", "No split: Paragon", "1 shard"] and len(rows[0]) == 7
    assert rows[1][0] == "mine" and "-" not in rows[1][1:]
    experiments = {c["experiment"] for c in card["cells"]}
    assert experiments == {"mine_1split", "mine_2split", "mine_4split"}
    # mine_2split is the user's file (random shards); the others shard the npz by class
    store = ArtifactStore(artifacts)
    shard = read_card(store.adapter_dir("mine_2split", "shard-00"))
    assert shard["config"]["sharding"]["strategy"] == "random"
    assert read_card(store.adapter_dir("mine_4split", "shard-00"))["config"]["sharding"] == {
        **shard["config"]["sharding"], "strategy": "by_class", "n_shards": 4
    }  # fmt: skip
    # every model behind a cell: its steps and final held-out loss, in the card and training.csv
    for cell in card["cells"]:
        assert cell["training"] and all(r["optimizer_steps"] >= 2 for r in cell["training"])
    training = list(csv.DictReader(open(table / "training.csv")))
    assert {r["job"] for r in training} >= {"paragon", "shard-00", "shard-03"}
    assert all(float(r["heldout_loss"]) > 0 for r in training)
    assert "Held-out loss" in (table / "table.md").read_text()
    # Fig. 2 on the same data and store: <the npz's name>_<fig2.shards>split, nothing retrained
    run("cdm.cli.fig2", "hydra.searchpath=[file://" + str(user) + "]", *common, "fig2.shards=2",
        "fig2.compositions=[average]", "fig2.own_reference=false", "fig2.n_jobs=1", cwd=tmp_path)  # fmt: skip
    fig = read_card(artifacts / "tables" / "fig2")
    assert fig["experiment"] == "mine_2split" and len(fig["points"]) == 2
    assert read_card(store.adapter_dir("mine_2split", "shard-00"))["created"] == shard["created"]
