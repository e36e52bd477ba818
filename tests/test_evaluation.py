"""cdm-eval and cdm-table1 on a tiny store: metrics that can fail, cached reference statistics,
samples that are redrawn only when stale, the paragon, and Table 1's layout."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cdm.eval.memorization import memorization_summary, nearest_neighbours
from cdm.store import ArtifactStore, read_card
from cdm.store.samples import save_samples

TINY = ["experiment=digits_2split", "debug=tiny"]
SAMPLE = [*TINY, "num_samples=40", "batch_size=20", "steps=4", "progress=false"]


def compose_cfg(config: str, overrides: list[str], root):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config, overrides=[*overrides, f"paths.artifacts={root}"])


def evaluate(root, *overrides: str) -> list[dict]:
    from cdm.jobs.evaluate import run_evaluation

    return run_evaluation(compose_cfg("eval", [*SAMPLE, *overrides], root))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("eval-store")
    for stage in ("backbone", "shard shard.index=0", "shard shard.index=1", "paragon", "router",
                  "feature_net"):  # fmt: skip
        run_inprocess(*TINY, *f"stage={stage}".split(), artifacts=root)
    for composition in ("classifier", "average", "paragon"):
        run_inprocess(*SAMPLE, f"composition={composition}", artifacts=root, config="sample")
    return root


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    gen, train = rng.normal(size=(30, 5)), rng.normal(size=(50, 5))
    d1, d2, idx = nearest_neighbours(gen, train, chunk=7)
    full = np.sqrt(((gen[:, None] - train[None]) ** 2).sum(-1))
    order = np.sort(full, axis=1)
    np.testing.assert_allclose(d1, order[:, 0], rtol=1e-12)
    np.testing.assert_allclose(d2, order[:, 1], rtol=1e-12)
    np.testing.assert_array_equal(idx, full.argmin(1))
    copies = train[:10] + 1e-9
    summary = memorization_summary(*nearest_neighbours(copies, train)[:2])
    assert summary["memorized_share"] == 1.0 and summary["nn_distance_mean"] < 1e-6
    assert memorization_summary(d1, d2)["memorized_share"] < 0.5
    with pytest.raises(ValueError, match="second-nearest"):
        nearest_neighbours(gen, train[:1])


def test_eval_card_has_named_metrics_and_parents(store_root):
    cards = evaluate(store_root, "evaluate.samples=[classifier,average,paragon]")
    assert [c["name"] for c in cards] == ["classifier", "average", "paragon"]
    for card in cards:
        m = card["metrics"]
        assert m["n_samples"] == 40
        assert np.isfinite(m["FD_digits"]) and m["FD_digits"] > 0
        assert "FID" not in m  # only the Inception protocol may be called FID
        assert 0 <= m["label_accuracy"] <= 1
        assert m["mem_feature_space"] == "pixels" and m["mem_nn_distance_mean"] > 0
        # pixels is the memorization space only: no FD there unless feature_spaces names it
        assert "FD_pixels" not in m and set(card["metric_names"]) == {"domain"}
        kinds = [p["kind"] for p in card["parents"]]
        assert kinds[0] == "samples" and kinds.count("ref_stats") == 2
    assert read_card(cards[2]["path"])["composition"] == "paragon"
    both = evaluate(
        store_root, "evaluate.samples=[average]", "evaluate.feature_spaces=[domain,pixels]"
    )
    m = both[0]["metrics"]
    assert np.isfinite(m["FD_pixels"]) and m["FD_pixels"] > 0
    assert m["FD_digits"] == cards[1]["metrics"]["FD_digits"]


def _store_as_samples(root, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    save_samples(ArtifactStore(root), "digits_2split", name, {"samples.npz": buffer.getvalue()},
                 {"kind": "samples", "name": name, "composition": "copy"})  # fmt: skip


def test_training_images_as_samples_score_zero_and_are_all_memorized(store_root):
    """The metrics can fail: the reference set itself has FD 0 and every image is a copy;
    uniform noise is far away and copies nothing."""
    from cdm.eval.features import to_uint8
    from cdm.jobs.context import load_data

    store = ArtifactStore(store_root)
    dataset = load_data(compose_cfg("eval", SAMPLE, store_root))
    ids = store.load_manifest("digits_2split", "private")["ids"]
    rows = [dataset.id_to_index[i] for i in ids]
    import torch

    images = to_uint8(torch.stack([dataset.image(i) for i in rows])).numpy()
    labels = dataset.labels[rows].numpy()
    _store_as_samples(store_root, "copies", images, labels)
    noise = np.random.default_rng(0).integers(0, 256, size=(len(rows), 1, 8, 8), dtype=np.uint8)
    _store_as_samples(store_root, "noise", noise, labels)
    copies, random = evaluate(store_root, "evaluate.samples=[copies,noise]")
    assert abs(copies["metrics"]["FD_digits"]) < 1e-6
    assert copies["metrics"]["mem_memorized_share"] == 1.0
    assert copies["metrics"]["label_accuracy"] > 0.5  # the tiny feature net, on its own data
    (paragon,) = evaluate(store_root, "evaluate.samples=[paragon]")
    assert random["metrics"]["FD_digits"] > paragon["metrics"]["FD_digits"] > 0
    assert random["metrics"]["mem_memorized_share"] == 0.0


def test_reference_features_are_cached_once(store_root):
    store = ArtifactStore(store_root)
    evaluate(store_root, "evaluate.samples=[average]")
    dirs = sorted((store.root / "stats").rglob("card.json"))
    assert len(dirs) == 2  # digits_net and pixels over the private split
    before = [read_card(d)["created"] for d in dirs]
    evaluate(store_root, "evaluate.samples=[classifier]")
    assert [read_card(d)["created"] for d in dirs] == before
    # a corrupted cache is refused with the fix in the message
    card = read_card(dirs[0])
    path = dirs[0].parent / card["weights_file"]
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    from cdm.store import CorruptArtifactError

    with pytest.raises(CorruptArtifactError, match="delete"):
        evaluate(store_root, "evaluate.samples=[average]")
    import shutil

    shutil.rmtree(dirs[0].parent)
    assert not store.stats_dir(card["feature_space"], card["name"]).exists()


def test_samples_are_redrawn_only_when_stale(store_root):
    import os

    from tests.conftest import run_inprocess

    def written(card: dict) -> int:  # ns resolution: cards' "created" has whole seconds only
        return os.stat(f"{card['path']}/samples.npz").st_mtime_ns

    first = run_inprocess(
        *SAMPLE, "composition=average", "name=cache", artifacts=store_root, config="sample"
    )
    stamp = written(first)
    again = run_inprocess(
        *SAMPLE, "composition=average", "name=cache", artifacts=store_root, config="sample"
    )
    assert again["created"] == first["created"] and written(again) == stamp
    with pytest.raises(ValueError, match="steps: 4 -> 3.*overwrite=true"):  # never silently
        run_inprocess(*SAMPLE, "composition=average", "name=cache", "steps=3", artifacts=store_root, config="sample")  # fmt: skip
    assert written(again) == stamp
    other = run_inprocess(*SAMPLE, "composition=average", "name=cache", "steps=3", "overwrite=true", artifacts=store_root, config="sample")  # fmt: skip
    assert written(other) != stamp and other["signature"] != first["signature"]
    stamp = written(other)
    forced = run_inprocess(*SAMPLE, "composition=average", "name=cache", "steps=3", "resample=true", artifacts=store_root, config="sample")  # fmt: skip
    assert written(forced) != stamp


def test_missing_samples_name_the_command(store_root):
    from cdm.store import MissingArtifactError

    with pytest.raises(MissingArtifactError, match="cdm-sample experiment=digits_2split"):
        evaluate(store_root, "evaluate.samples=[nope]")


def test_table1_format_is_the_papers_layout():
    from cdm.paper.table1 import format_table

    cells = [
        {"dataset": "digits", "n": n, "method": m, "value": v, "metric_name": "FD_digits"}
        for n, m, v in [
            (0, "paragon", 1.0),
            (1, "average", 1.5),
            (2, "classifier", 2.0),
            (2, "average", 3.0),
        ]
    ]
    markdown, rows = format_table(cells, [1, 2], ["classifier", "average"])
    assert rows[0] == [
        "Dataset",
        "No split: Paragon",
        "1 shard",
        "2-Splits: Classifier",
        "2-Splits: Naive Avg",
    ]
    assert rows[1] == ["digits", "1.000", "1.500", "2.000", "3.000"]
    assert "| digits | 1.000 | 1.500 | 2.000 | 3.000 |" in markdown
    assert markdown.startswith("FD_digits")


def test_table1_end_to_end_trains_only_what_is_missing(tmp_path):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.paper.table1 import run_table1

    register_resolvers()
    overrides = [
        "debug=tiny",
        "num_samples=20",
        "batch_size=20",
        "steps=3",
        f"paths.artifacts={tmp_path}",
    ]
    table = ["table1.splits=[1,2]", "table1.compositions=[classifier,average]", "table1.n_jobs=1"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="table1", overrides=[*overrides, *table])
        card = run_table1(cfg, overrides)
        md = open(f"{card['path']}/table.md").read()
        rows = list(__import__("csv").reader(open(f"{card['path']}/table.csv")))
        assert rows[0][:3] == ["Dataset", "No split: Paragon", "1 shard"] and len(rows[1]) == 5
        cells = {(c["n"], c["method"]): c["metrics"]["FD_digits"] for c in card["cells"]}
        assert rows[1][4] == f"{cells[(2, 'average')]:.3f}" and rows[1][4] in md
        store = ArtifactStore(tmp_path)
        shard = store.read_adapter_card("digits_2split", "shard-00")["created"]
        # everything is in the store: nothing is retrained or redrawn; this time W&B (offline) logs it
        cfg = compose(config_name="table1", overrides=[*overrides, *table, "logger=wandb"])
        again = run_table1(cfg, [*overrides, "logger=wandb"])
        assert store.read_adapter_card("digits_2split", "shard-00")["created"] == shard
        assert [c["value"] for c in again["cells"]] == [c["value"] for c in card["cells"]]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 3  # digits_1split, digits_2split (grids, router weights) and the table
    split2 = [r for r in runs if (r / "files" / "media" / "images" / "router_weights").is_dir()]
    assert len(split2) == 1  # only the 2-split experiment has a router
    grids = sorted(
        p.name.split("_")[0] for p in (split2[0] / "files/media/images/samples").iterdir()
    )
    assert grids == ["average", "classifier"]
    tables = [t for r in runs for t in (r / "files" / "media").rglob("table1_*.table.json")]
    assert len(tables) == 1 and "No split: Paragon" in tables[0].read_text()
