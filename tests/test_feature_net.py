"""The domain feature net (stage=feature_net): network, store artifact, job, and its FeatureSpace."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cdm.core.hashing import hash_ids
from cdm.models.feature_net import (
    DomainFeatures,
    FeatureNet,
    downsample_steps,
    feature_net_from_config,
)
from cdm.store import (
    ArtifactStore,
    CorruptArtifactError,
    InvalidNameError,
    MissingArtifactError,
    StoreError,
    read_card,
    sha256_file,
)
from cdm.store.feature_nets import (
    feature_net_key,
    list_feature_nets,
)

KEY = "digits-r8-seed0"
# debug=tiny plus a short feature-net schedule: a few seconds on one CPU thread
TINY = ["experiment=digits_4split", "debug=tiny", "stage=feature_net", "feature_net.epochs=4"]


def digits():
    from cdm.data.loaders import load_digits_dataset

    return load_digits_dataset(resolution=8, channels=1)


def uint8_images(dataset, indices) -> torch.Tensor:
    """The dataset's stored uint8 pixels as [N, 1, 8, 8]."""
    return torch.from_numpy(dataset.raw[list(indices)]).unsqueeze(1)


# ---------------------------------------------------------------------------------- network


@pytest.mark.parametrize(("resolution", "channels"), [(8, 1), (16, 3), (28, 1), (32, 3), (64, 1)])
def test_feature_net_shapes_at_every_resolution(resolution, channels):
    torch.manual_seed(0)
    net = FeatureNet(channels=channels, resolution=resolution, n_classes=7, feature_dim=24)
    x = torch.rand(3, channels, resolution, resolution) * 2 - 1
    assert net(x).shape == (3, 7)
    assert net.features(x).shape == (3, 24)
    # the stride-2 stages end at ~4x4
    assert net.body(x).shape[-1] <= 4
    assert torch.equal(net.head(net.features(x)), net(x))
    # eval and train mode compute the same function (GroupNorm, no dropout)
    assert torch.equal(net.train()(x), net.eval()(x))
    rebuilt = feature_net_from_config(json.loads(json.dumps(net.config())))
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(x), net(x))
    with pytest.raises(ValueError, match="images"):
        net(torch.zeros(2, channels + 1, resolution, resolution))


def test_batch_norm_net_is_a_fixed_function_in_eval_mode_and_rebuilds_from_its_config():
    """feature_net.model.norm=batch (captioned_3band): features use the running statistics, so one image's features
    do not depend on the rest of its batch, and the stored config + state rebuild it exactly."""
    torch.manual_seed(0)
    net = FeatureNet(channels=3, resolution=32, n_classes=5, feature_dim=16, norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    net.train()(x)  # moves the running statistics off their initial values
    net.eval()
    torch.testing.assert_close(net.features(x[:2]), net.features(x)[:2], rtol=1e-5, atol=1e-6)
    rebuilt = feature_net_from_config(json.loads(json.dumps(net.config())))
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt.eval()(x), net(x))
    with pytest.raises(ValueError, match="norm='layer'"):
        FeatureNet(channels=1, resolution=8, n_classes=2, norm="layer")


def test_downsample_steps():
    assert [downsample_steps(r) for r in (4, 8, 16, 28, 32, 64)] == [0, 1, 2, 3, 3, 4]


def test_feature_net_key_and_names():
    assert feature_net_key("digits", 8, 0) == KEY
    assert feature_net_key("digits", 8, 0, "{dataset}-c{channels}-r{resolution}", channels=3) == (
        "digits-c3-r8"
    )
    with pytest.raises(InvalidNameError, match="unknown field"):
        feature_net_key("digits", 8, 0, "{datset}-r{resolution}")
    with pytest.raises(InvalidNameError):
        feature_net_key("../digits", 8, 0)
    net = FeatureNet(channels=1, resolution=8, n_classes=10, feature_dim=16)
    space = DomainFeatures(net, "digits")
    assert (space.name, space.metric_name, space.dim) == ("digits_net", "FD_digits", 16)


def test_default_config_id_is_the_default_key():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "cdm" / "conf"
    cfg = OmegaConf.load(conf / "feature_net" / "default.yaml")
    assert cfg.id.format(dataset="digits", resolution=8, seed=0, channels=1) == KEY
    stage = OmegaConf.to_container(OmegaConf.load(conf / "stage" / "feature_net.yaml"))
    assert {"/feature_net": "default"} in stage["defaults"]  # stage=feature_net pulls it in


# ---------------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A feature net trained on digits' train split in-process, and its weights at that time."""
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("feature-net-artifacts")
    card = run_inprocess(*TINY, artifacts=root)
    weights = load_file(ArtifactStore(root).feature_net_dir(KEY) / "feature_net.safetensors")
    return root, card, weights


def test_job_writes_a_checked_artifact_with_a_card(trained):
    root, card, _ = trained
    store = ArtifactStore(root)
    directory = store.feature_net_dir(KEY)
    assert directory == root / "feature_nets" / KEY  # per dataset and resolution, not experiment
    assert read_card(directory) == card
    assert card["kind"] == "feature_net" and card["name"] == KEY
    assert (card["dataset"], card["resolution"], card["channels"]) == ("digits", 8, 1)
    assert card["feature_space"] == "digits_net" and card["metric_name"] == "FD_digits"
    assert card["weights_sha256"] == sha256_file(directory / "feature_net.safetensors")
    assert card["config"]["feature_net"]["epochs"] == 4 and card["wall_time_s"] > 0
    assert card["code_version"] and card["made_by_experiment"] == "digits_4split"
    assert not store.feature_net_checkpoint_dir(KEY).exists()  # nothing else left on disk
    assert [e["name"] for e in list_feature_nets(store)] == [KEY]
    assert not (root / "experiments").exists()  # no experiment artifacts: the net is shared


def test_card_records_the_hash_of_every_train_id(trained):
    """The hash equals one computed here from the dataset's train split (all of it: private too)."""
    _, card, _ = trained
    ds = digits()
    train = [i for i, s in enumerate(ds.splits) if s == "train"]
    expected = hash_ids([ds.ids[i] for i in train], [ds.content_hashes[i] for i in train])
    assert card["train_ids_hash"] == expected == card["manifest_hash"]
    assert card["n_samples_fed"] == card["n_train"] == len(train) == 1438
    test = [i for i, s in enumerate(ds.splits) if s == "test"]
    assert card["test_ids_hash"] == hash_ids(
        [ds.ids[i] for i in test], [ds.content_hashes[i] for i in test]
    )
    assert card["train_ids_hash"] != card["test_ids_hash"]


def test_accuracy_is_well_above_chance_and_that_of_the_saved_net(trained):
    from cdm.jobs.feature_net import load_feature_net_model

    root, card, _ = trained
    net, _ = load_feature_net_model(ArtifactStore(root), KEY)
    ds = digits()
    test = [i for i, s in enumerate(ds.splits) if s == "test"]
    with torch.no_grad():
        pred = net(torch.stack([ds.image(i) for i in test])).argmax(1)
    acc = (pred == ds.labels[test]).double().mean().item()
    print("feature net test accuracy:", acc)
    assert acc > 0.8  # chance is 0.1
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-9)
    assert card["metrics"]["feature_net/val_acc"] == pytest.approx(acc, abs=1e-6)


def test_rerun_is_a_no_op(trained, caplog):
    from tests.conftest import run_inprocess

    root, card, _ = trained
    path = ArtifactStore(root).feature_net_dir(KEY) / "feature_net.safetensors"
    mtime = path.stat().st_mtime_ns
    # another experiment on the same dataset and resolution shares the net
    caplog.set_level(logging.INFO, logger="cdm")
    again = run_inprocess(*TINY, "experiment=digits_2split", artifacts=root)
    assert again == card and "already trained" in caplog.text
    assert path.stat().st_mtime_ns == mtime


def test_retrain_with_the_same_seed_is_bit_identical(trained):
    from tests.conftest import run_inprocess

    root, card, weights = trained
    again = run_inprocess(*TINY, "retrain=true", artifacts=root)
    assert again["created"] >= card["created"]
    redone = load_file(ArtifactStore(root).feature_net_dir(KEY) / "feature_net.safetensors")
    assert redone.keys() == weights.keys()
    assert all(torch.equal(redone[k], weights[k]) for k in weights)
    assert again["weights_sha256"] == card["weights_sha256"]
    assert again["test_accuracy"] == card["test_accuracy"]


def test_a_stored_net_trained_on_other_data_is_refused(trained, tmp_path):
    from tests.conftest import run_inprocess

    root, _, _ = trained
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    card_path = ArtifactStore(copy).feature_net_dir(KEY) / "card.json"
    card = json.loads(card_path.read_text())
    card["train_ids_hash"] = "0" * 64
    card_path.write_text(json.dumps(card))
    with pytest.raises(StoreError, match="data changed"):
        run_inprocess(*TINY, artifacts=copy)


# ---------------------------------------------------------------------------------- features


def test_domain_features_is_a_feature_space(trained):
    from cdm.eval.features import FeatureSpace
    from cdm.jobs.feature_net import load_domain_features, load_feature_net_model

    root, card, _ = trained
    store = ArtifactStore(root)
    space = load_domain_features(store, "digits", 8, 0, train_ids_hash=card["train_ids_hash"])
    assert isinstance(space, FeatureSpace)
    assert (space.name, space.dim, space.metric_name) == ("digits_net", 128, "FD_digits")
    assert not space.net.training

    ds = digits()
    idx = list(range(40))
    images = uint8_images(ds, idx)
    feats = space(images)
    assert feats.shape == (40, 128) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std() > 0
    # numpy input, identical images -> identical features; a second call is identical
    doubled = space(np.concatenate([images.numpy(), images.numpy()]))
    assert np.array_equal(doubled[:40], doubled[40:])
    assert np.array_equal(space(images), feats)
    # uint8 -> x / 127.5 - 1 exactly as the dataset: same features as the dataset's own images
    net, _ = load_feature_net_model(store, KEY)
    with torch.inference_mode():
        direct = net.features(torch.stack([ds.image(i) for i in idx])).double().numpy()
    assert np.array_equal(feats, direct)
    # batching does not change the result beyond float rounding
    small = DomainFeatures(net, "digits", batch_size=7)
    assert np.allclose(small(images), feats, rtol=1e-5, atol=1e-6)
    # the features separate the classes: nearest class mean (train) classifies the test split
    train = [i for i, s in enumerate(ds.splits) if s == "train"]
    test = [i for i, s in enumerate(ds.splits) if s == "test"]
    ftrain, ftest = space(uint8_images(ds, train)), space(uint8_images(ds, test))
    labels = ds.labels.numpy()
    means = np.stack([ftrain[labels[train] == c].mean(0) for c in range(10)])
    pred = ((ftest[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[test]).mean() > 0.8


def test_domain_features_refuses_bad_input(trained):
    from cdm.jobs.feature_net import load_domain_features

    root, _, _ = trained
    space = load_domain_features(ArtifactStore(root), "digits", 8)
    with pytest.raises(ValueError, match="uint8"):
        space(torch.zeros(2, 1, 8, 8))  # float
    with pytest.raises(ValueError, match="uint8"):
        space(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))  # channels
    with pytest.raises(ValueError, match="uint8"):
        space(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))  # resolution


def test_missing_net_error_names_the_command(tmp_path):
    from cdm.jobs.feature_net import load_domain_features

    with pytest.raises(MissingArtifactError) as err:
        load_domain_features(ArtifactStore(tmp_path), "digits", 16, 3)
    message = str(err.value)
    assert "digits-r16-seed3" in message
    assert "cdm-train stage=feature_net data=digits data.resolution=16 seed=3" in message


def test_wrong_train_split_is_refused(trained):
    from cdm.jobs.feature_net import load_domain_features

    root, _, _ = trained
    with pytest.raises(StoreError, match="train split"):
        load_domain_features(ArtifactStore(root), "digits", 8, train_ids_hash="f" * 64)


@pytest.mark.parametrize("damage", ["flip", "truncate", "config"])
def test_corrupted_net_is_refused(trained, tmp_path, damage):
    from cdm.jobs.feature_net import load_domain_features

    root, _, _ = trained
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    directory = ArtifactStore(copy).feature_net_dir(KEY)
    if damage == "config":
        path = directory / "feature_net_config.json"
        path.write_text(path.read_text().replace('"feature_dim": 128', '"feature_dim": 64'))
    else:
        path = directory / "feature_net.safetensors"
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[-5] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="corrupt") as err:
        load_domain_features(ArtifactStore(copy), "digits", 8)
    assert "retrain=true" in str(err.value)


@pytest.mark.slow
def test_killed_feature_net_job_resumes_bit_identical(tmp_path):
    from tests.conftest import run_cli

    args = [*TINY, "trainer.enable_progress_bar=false"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = run_cli(*args, "kill_at_step=30", artifacts=killed, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    store = ArtifactStore(killed)
    assert (store.feature_net_checkpoint_dir(KEY) / "last.ckpt").is_file()
    assert not store.feature_net_dir(KEY).exists()
    assert "resuming" in run_cli(*args, artifacts=killed).stdout
    run_cli(*args, artifacts=straight)
    a = load_file(store.feature_net_dir(KEY) / "feature_net.safetensors")
    b = load_file(ArtifactStore(straight).feature_net_dir(KEY) / "feature_net.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        read_card(store.feature_net_dir(KEY))["test_accuracy"]
        == read_card(ArtifactStore(straight).feature_net_dir(KEY))["test_accuracy"]
    )
