"""Extending cdm from outside: a user's own package and config, no edit to cdm (README "Your own
dataset"). Each plugin kind has its own test functions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdm.store import ArtifactStore
from tests.conftest import REPO, run_inprocess

# ------------------------------------------------------------------------------ a dataset

DATASET_MODULE = '''
"""A user's dataset, outside cdm: stripes, horizontal (label 0) or vertical (label 1)."""
import numpy as np

from cdm.data.datasets import ArrayDataset


class Stripes(ArrayDataset):
    def __init__(self, resolution=8, channels=1, n_per_class=40, seed=0):
        rng = np.random.default_rng(seed)
        images, labels = [], []
        for label in (0, 1):
            for _ in range(n_per_class):
                im = np.zeros((8, 8), dtype=np.uint8)
                k = int(rng.integers(0, 8))
                if label == 0:
                    im[k, :] = 255
                else:
                    im[:, k] = 255
                images.append(im)
                labels.append(label)
        ids = [f"stripes/{i:04d}" for i in range(len(images))]
        super().__init__(
            np.stack(images), name="stripes", ids=ids, labels=np.array(labels),
            class_names=["horizontal", "vertical"], splits=["train"] * len(ids),
            resolution=resolution, channels=channels,
        )
'''

DATASET_CONFIG = """\
# conf/data/stripes.yaml in the user's own config dir
_target_: my_cdm_data.Stripes
name: stripes
root: null
resolution: 8
channels: 1
conditional: true
num_classes: 2
kwargs:
  n_per_class: 40
"""


@pytest.fixture
def user_dataset(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A package ``my_cdm_data`` on ``sys.path`` and a config dir with ``data/stripes.yaml``."""
    package = tmp_path / "site" / "my_cdm_data"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(DATASET_MODULE))
    conf = tmp_path / "user_conf"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "stripes.yaml").write_text(DATASET_CONFIG)
    monkeypatch.syspath_prepend(str(package.parent))
    sys.modules.pop("my_cdm_data", None)
    return package.parent, conf


def test_a_dataset_defined_outside_cdm_trains_a_backbone_through_config_only(
    user_dataset, tmp_path
):
    site, conf = user_dataset
    art = tmp_path / "art"
    card = run_inprocess(
        "data=stripes", f"hydra.searchpath=[file://{conf}]", "experiment_name=stripes_2split",
        "sharding.n_shards=2", "debug=tiny", "stage=backbone", artifacts=art,
    )  # fmt: skip
    import my_cdm_data

    assert Path(my_cdm_data.__file__).resolve().is_relative_to(site.resolve())
    assert not Path(my_cdm_data.__file__).resolve().is_relative_to(REPO / "cdm")
    assert card["kind"] == "backbone" and card["name"].startswith("stripes-r8-tiny-")
    assert card["config"]["data"]["_target_"] == "my_cdm_data.Stripes"
    store = ArtifactStore(art)
    manifests = {n: store.load_manifest("stripes_2split", n) for n in ("safe", "shard-00")}
    ids = [i for m in manifests.values() for i in m["ids"]]
    assert ids and all(i.startswith("stripes/") for i in ids)  # the user's samples, by their ids
    # the shards of the experiment train on the user's data too
    shard = run_inprocess(
        "data=stripes", f"hydra.searchpath=[file://{conf}]", "experiment_name=stripes_2split",
        "sharding.n_shards=2", "debug=tiny", "stage=shard", "shard.index=1", artifacts=art,
    )  # fmt: skip
    assert shard["kind"] == "shard" and shard["parents"][0]["name"] == card["name"]


def test_a_user_dataset_config_reaches_cdm_train_through_config_dir(user_dataset, tmp_path):
    site, conf = user_dataset
    cmd = [sys.executable, "-m", "cdm.cli.train", "--config-dir", str(conf), "data=stripes",
           "stage=backbone", f"paths.artifacts={tmp_path / 'art'}", "--cfg", "job"]  # fmt: skip
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_target_: my_cdm_data.Stripes" in proc.stdout and "name: stripes" in proc.stdout
    # a misspelled choice lists the user's option beside the shipped ones
    proc = subprocess.run(
        [*cmd[:5], "data=stripez", *cmd[6:]], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        "data=stripez does not exist" in proc.stderr and "stripes" in proc.stderr.split("choose")[1]
    )


# ------------------------------------------------------------------------------ a composition method
# (Reconstructed by the Hydra helper after it overwrote this file by mistake; the pipeline helper's
# README section "Your own composition method" is the specification.)

COMPOSITION_MODULE = '''
"""A user's composition method, outside cdm: w_i proportional to lambda_i ** power."""
from cdm.core.composition import Composition, normalize_priors


class Tempered(Composition):
    name = "tempered"
    router = None

    def __init__(self, power=1.0):
        self.power = power

    def weights(self, step):
        return normalize_priors(step.prior.double() ** self.power).float().expand(step.batch, -1)
'''

COMPOSITION_CONFIG = """\
# conf/composition/tempered.yaml in the user's own config dir
name: tempered
_target_: my_cdm_methods.Tempered
power: 3.0
"""


def test_a_composition_method_defined_outside_cdm_samples_through_config_only(
    tmp_path, monkeypatch
):
    import numpy as np
    import torch

    from cdm.core.composition import normalize_priors

    package = tmp_path / "site" / "my_cdm_methods"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(COMPOSITION_MODULE))
    conf = tmp_path / "user_conf"
    (conf / "composition").mkdir(parents=True)
    (conf / "composition" / "tempered.yaml").write_text(COMPOSITION_CONFIG)
    monkeypatch.syspath_prepend(str(package.parent))
    sys.modules.pop("my_cdm_methods", None)
    art = tmp_path / "art"
    tiny = ["experiment=digits_2split", "debug=tiny"]
    for stage in ("stage=backbone", "stage=shard shard.index=0", "stage=shard shard.index=1"):
        run_inprocess(*tiny, *stage.split(), artifacts=art)
    card = run_inprocess(
        *tiny, "composition=tempered", f"hydra.searchpath=[file://{conf}]", "num_samples=4",
        "batch_size=4", "steps=3", "progress=false", artifacts=art, config="sample",
    )  # fmt: skip
    assert Path(card["path"]).name == "tempered"
    store = ArtifactStore(art)
    sizes = [len(store.load_manifest("digits_2split", f"shard-0{k}")["ids"]) for k in (0, 1)]
    prior = normalize_priors(torch.tensor(sizes, dtype=torch.float64))
    expected = normalize_priors(prior**3.0).float()
    weights = torch.from_numpy(np.load(Path(card["path"]) / "trace.npz")["weights"])
    assert not torch.allclose(expected, prior.float())  # the user's method, not averaging
    torch.testing.assert_close(weights, expected.expand_as(weights))
