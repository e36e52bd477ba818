"""cdm-sample end to end on a tiny store: files, trace, card, access rights, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cdm.store import ArtifactStore, CorruptArtifactError, read_card

TINY = ["experiment=digits_2split", "debug=tiny"]
SAMPLE = [*TINY, "num_samples=6", "batch_size=4", "steps=4", "progress=false"]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("sample-store")
    for stage in (
        "stage=backbone",
        "stage=shard shard.index=0",
        "stage=shard shard.index=1",
        "stage=router",
        "stage=knn",
    ):
        run_inprocess(*TINY, *stage.split(), artifacts=root)
    return root


@pytest.mark.parametrize(
    "composition", ["classifier", "knn", "average", "random", "topk", "weight_merge"]
)
def test_sample_writes_grid_samples_trace_and_card(store_root, train, composition):
    card = train(*SAMPLE, f"composition={composition}", artifacts=store_root, config="sample")
    directory = read_card(card["path"])["path"]
    files = {
        f: open(f"{directory}/{f}", "rb").read()
        for f in ("grid.png", "samples.npz", "trace.npz", "weights.png")
    }
    assert Image.open(io.BytesIO(files["grid.png"])).size[0] > 0
    samples = np.load(io.BytesIO(files["samples.npz"]))
    assert samples["images"].shape == (6, 1, 8, 8) and samples["images"].dtype == np.uint8
    assert samples["labels"].shape == (6,)
    trace = np.load(io.BytesIO(files["trace.npz"]))
    assert trace["weights"].shape == (6, 4, 1 if composition == "weight_merge" else 2)
    np.testing.assert_allclose(trace["weights"].sum(-1), 1.0, rtol=1e-5)
    store = ArtifactStore(store_root)
    kinds = [p["kind"] for p in card["parents"]]
    assert kinds[:3] == ["backbone", "adapter", "adapter"]
    for k, parent in enumerate(card["parents"][1:3]):
        assert (
            parent["manifest_hash"]
            == store.load_manifest("digits_2split", f"shard-{k:02d}")["hash"]
        )
    assert ("router" in kinds) == (composition in ("classifier", "topk"))
    assert kinds.count("knn_centroids") == (2 if composition == "knn" else 0)
    if composition == "random":  # one shard per sample and step
        assert set(np.unique(trace["weights"])) <= {0.0, 1.0}


def test_a_user_sees_only_the_shards_they_may_use(store_root, train):
    # shard 0's weights are corrupted: a request for shard 1 alone never reads them
    path = (
        ArtifactStore(store_root).adapter_dir("digits_2split", "shard-00")
        / "adapter_model.safetensors"
    )
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\\x00" * 8)
    try:
        card = train(
            *SAMPLE,
            "composition=classifier",
            "shards=[1]",
            "name=only-1",
            artifacts=store_root,
            config="sample",
        )
        trace = np.load(f"{card['path']}/trace.npz")
        assert card["shards"] == [1] and trace["weights"].shape == (6, 4, 1)
        assert [p["name"] for p in card["parents"] if p["kind"] == "adapter"] == ["shard-01"]
        with pytest.raises(CorruptArtifactError, match="corrupt"):
            train(
                *SAMPLE, "composition=average", "name=both", artifacts=store_root, config="sample"
            )
    finally:
        path.write_bytes(original)


def test_unknown_shard_and_missing_router_are_clear_errors(store_root, train, tmp_path):
    with pytest.raises(ValueError, match="this experiment has shards"):
        train(*SAMPLE, "composition=average", "shards=[5]", artifacts=store_root, config="sample")
    with pytest.raises(ValueError, match="stage=router"):
        train(
            *SAMPLE,
            "composition=classifier",
            "router_name=nope",
            artifacts=store_root,
            config="sample",
        )


@pytest.mark.parametrize("graph", ["true", "compiled"])
def test_cuda_graph_needs_cuda(store_root, train, graph):
    with pytest.raises(ValueError, match=f"cuda_graph={graph} needs device=cuda"):
        train(*SAMPLE, f"cuda_graph={graph}", "name=graph", artifacts=store_root, config="sample")


def test_cuda_graph_takes_true_false_or_compiled(store_root, train):
    with pytest.raises(ValueError, match="cuda_graph=fast: use true, false or compiled"):
        train(*SAMPLE, "cuda_graph=fast", "name=graph", artifacts=store_root, config="sample")


def test_a_missing_cuda_device_is_a_clear_error(store_root, train):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device on this machine; use device=cpu"):
        train(*SAMPLE, "device=cuda", "name=cuda", artifacts=store_root, config="sample")


def test_cards_name_the_device_the_job_ran_on(monkeypatch):
    """A CPU job on a machine with a GPU is a CPU job on its card (it used to say cuda:<GPU>)."""
    import torch
    from omegaconf import OmegaConf

    from cdm.jobs.context import device_description, trainer_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
    assert device_description("cpu").startswith("cpu:")
    assert device_description("cuda") == device_description("cuda:0") == "cuda:FakeGPU"
    for accelerator, device in (("cpu", "cpu"), ("gpu", "cuda"), ("auto", "cuda")):
        cfg = OmegaConf.create({"trainer": {"accelerator": accelerator}})
        assert trainer_device(cfg) == device


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("composition", "graph"),
    [
        ("classifier", False),
        ("average", False),
        ("random", False),
        ("classifier", True),
        ("average", True),
        ("topk", True),
        ("random", True),
        ("average", "compiled"),
        ("topk", "compiled"),
    ],
)
def test_cuda_sampling_matches_cpu(store_root, train, composition, graph):
    """Same seed, same x_T (drawn on the CPU): the CUDA samples (eager, or every step as one CUDA
    graph replay: cuda_graph=true; topk and random as k pairs per sample; cuda_graph=compiled:
    the replay of the inductor-compiled step) equal the CPU ones to float tolerance."""
    cards = {
        d: train(
            *SAMPLE,
            f"composition={composition}",
            f"device={d}",
            "sampler=ddim",
            f"name={composition}-{d}-{graph}",
            *([f"cuda_graph={graph}"] if d == "cuda" else []),
            artifacts=store_root,
            config="sample",
        )  # fmt: skip
        for d in ("cpu", "cuda")
    }
    images = {
        d: np.load(f"{c['path']}/samples.npz")["images"].astype(int) for d, c in cards.items()
    }
    assert np.abs(images["cpu"] - images["cuda"]).max() <= 2  # uint8 steps after 4 DDIM steps


def test_knn_router_on_the_domain_feature_net(store_root, train):
    """k-NN over the features of a network trained on the domain: its centroids and samples name
    the feature net as a parent, and a second request reuses the samples."""
    train(*TINY, "stage=feature_net", artifacts=store_root)
    cards = train(*TINY, "stage=knn", "knn=feature_net", artifacts=store_root)
    assert len(cards) == 2 and all(c["parents"][0]["kind"] == "feature_net" for c in cards)
    card = train(*SAMPLE, "composition=knn", "knn=feature_net", "name=knn-fn", artifacts=store_root, config="sample")  # fmt: skip
    kinds = [p["kind"] for p in card["parents"]]
    assert kinds.count("knn_centroids") == 2 and "feature_net" in kinds
    trace = np.load(f"{card['path']}/trace.npz")["weights"]
    np.testing.assert_allclose(trace.sum(-1), 1.0, rtol=1e-5)
    again = train(*SAMPLE, "composition=knn", "knn=feature_net", "name=knn-fn", artifacts=store_root, config="sample")  # fmt: skip
    assert again["created"] == card["created"]


def test_other_settings_never_replace_stored_samples_silently(store_root, train):
    """Issue 11 item 2: a run with other settings under a stored name is refused (one line naming
    name=... and overwrite=true) and leaves the stored set alone; overwrite=true replaces it, and
    cdm-list then shows the old set's evaluation as stale, not current."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir
    from cdm.jobs.evaluate import run_evaluation
    from cdm.store.listing import format_table

    first = train(*SAMPLE, "composition=average", "name=kept", artifacts=store_root, config="sample")  # fmt: skip
    stored = (ArtifactStore(store_root).samples_dir("digits_2split", "kept") / "samples.npz").read_bytes()  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            *SAMPLE, "evaluate.samples=[kept]", "evaluate.feature_spaces=[pixels]",
            "evaluate.kid_subset_size=6", f"paths.artifacts={store_root}"])  # fmt: skip
    run_evaluation(cfg)

    def status(artifact: str) -> str:
        entries = ArtifactStore(store_root).list_artifacts("digits_2split")
        (entry,) = [e for e in entries if e["artifact"] == artifact and e["name"] == "kept"]
        return entry["status"]

    assert status("samples") == status("evaluation") == "current"
    other = [*SAMPLE, "composition=average", "name=kept", "shards=[1]", "num_samples=4"]
    with pytest.raises(ValueError, match=r"name=\.\.\..*overwrite=true") as refused:
        train(*other, artifacts=store_root, config="sample")
    message = str(refused.value)
    assert (
        "\n" not in message
        and "shards: null -> [1]" in message
        and "num_samples: 6 -> 4" in message
    )
    directory = ArtifactStore(store_root).samples_dir("digits_2split", "kept")
    assert (directory / "samples.npz").read_bytes() == stored
    # the same settings again: reused as before (no refusal, nothing redrawn)
    again = train(*SAMPLE, "composition=average", "name=kept", artifacts=store_root, config="sample")  # fmt: skip
    assert again["files"] == first["files"]
    replaced = train(*other, "overwrite=true", artifacts=store_root, config="sample")
    assert replaced["shards"] == [1] and (directory / "samples.npz").read_bytes() != stored
    assert status("samples") == "current"
    assert status("evaluation") == "stale (samples kept was redrawn since)"
    assert "stale (samples kept was redrawn since)" in format_table(
        ArtifactStore(store_root).list_artifacts("digits_2split")
    )


def test_cdm_list_shows_quarantined_and_stale_artifacts(store_root, train, tmp_path):
    """cdm-list's STATUS: what a forget request set aside is quarantined; an adapter trained on
    a manifest that changed since, and samples drawn from a retrained adapter, are stale."""
    import json
    import shutil

    from cdm.store.listing import artifact_status

    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    card = train(*SAMPLE, "composition=average", "name=moved", artifacts=root, config="sample")
    store = ArtifactStore(root)
    quarantine = store.quarantine_dir("digits_2split", "req-1") / "samples" / "moved"
    quarantine.parent.mkdir(parents=True)
    shutil.move(card["path"], quarantine)
    train(*SAMPLE, "composition=average", "name=drawn", artifacts=root, config="sample")
    manifest = store.manifest_path("digits_2split", "shard-00")
    record = json.loads(manifest.read_text())
    record["hash"] = "f" * 64  # as after cdm-forget rewrote the manifest
    manifest.write_text(json.dumps(record))
    adapter_card = store.adapter_dir("digits_2split", "shard-01") / "card.json"
    adapter = json.loads(adapter_card.read_text())
    adapter["weights_sha256"] = "0" * 64  # as after shard-01 was retrained
    adapter_card.write_text(json.dumps(adapter))
    entries = {(e["artifact"], e.get("job") or e.get("name")): e for e in store.list_artifacts()}
    assert entries[("samples", "moved")]["status"] == "quarantined (req-1)"
    assert entries[("adapter", "shard-00")]["status"].startswith("stale (manifest shard-00 was")
    assert entries[("samples", "drawn")]["status"] == "stale (adapter shard-01 was retrained since)"
    assert artifact_status(store, {"artifact": "backbone"}) == "current"
