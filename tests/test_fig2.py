"""cdm-fig2 (paper Fig. 2): relative FD change as shards are added one by one, on a tiny store."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from cdm.store import ArtifactStore, read_card

TINY = ["debug=tiny", "num_samples=20", "batch_size=20", "steps=3", "progress=false"]


def fig2(root, *overrides: str) -> dict:
    """Run the sweep in this process as ``cdm-fig2`` would (fig2.* keys are not job overrides)."""
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.paper.fig2 import run_fig2

    register_resolvers()
    overrides = (*TINY, *overrides, f"paths.artifacts={root}")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):  # run_fig2 composes
        cfg = compose(config_name="fig2", overrides=list(overrides))
        return run_fig2(cfg, [o for o in overrides if not o.startswith("fig2.")])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig2-store")
    return root, fig2(root, "fig2.experiment=digits_2split", "fig2.n_jobs=1")


def test_table_is_the_relative_change_of_the_evaluation_cards(swept):
    root, card = swept
    store = ArtifactStore(root)
    rows = list(csv.reader(open(f"{card['path']}/fig2.csv")))
    assert rows[0][:6] == [
        "k shards", "shards", "Classifier FD_digits", "Classifier change vs 1 shard",
        "Naive Avg FD_digits", "Naive Avg change vs 1 shard",
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["1", "2"] and [r[1] for r in rows[1:]] == ["0", "0 1"]
    fd = {}
    for p in card["points"]:
        eval_card = read_card(store.evals_dir("digits_2split", p["samples"]))
        fd[(p["k"], p["method"])] = eval_card["metrics"]["FD_digits"]
        assert eval_card["shards"] == list(range(p["k"]))
        assert p["value"] == fd[(p["k"], p["method"])]
    # k = 1: one shard alone, one samples artifact shared by both methods
    assert fd[(1, "classifier")] == fd[(1, "average")]
    assert rows[1][2] == rows[1][4] and rows[1][3] == rows[1][5] == "+0.0000"
    for column, method in ((3, "classifier"), (5, "average")):
        change = fd[(2, method)] / fd[(1, method)] - 1
        assert float(rows[2][column]) == pytest.approx(change, abs=5e-5)
    assert card["drop_one_of_n"]["classifier"] == pytest.approx(
        fd[(1, "classifier")] / fd[(2, "classifier")] - 1
    )
    # against the composed shards' own data, with the held-out test images as the floor
    assert rows[0][6:] == [
        "Classifier FD_digits vs own shards", "Classifier own change vs 1 shard",
        "Naive Avg FD_digits vs own shards", "Naive Avg own change vs 1 shard",
        "held-out test images FD_digits vs own shards", "held-out change vs 1 shard",
    ]  # fmt: skip
    k2 = {p["method"]: p for p in card["points"] if p["k"] == 2}
    assert k2["classifier"]["heldout_value"] == k2["average"]["heldout_value"] > 0
    assert rows[2][6] == f"{k2['classifier']['own_reference_value']:.4f}"
    assert rows[1][11] == "+0.0000" and float(rows[2][10]) == pytest.approx(
        k2["average"]["heldout_value"], abs=5e-5
    )
    md = open(f"{card['path']}/fig2.md").read()
    assert "restricted to those k shards" in md and "paper: FID up by at most 1%" in md
    assert f"{fd[(2, 'average')]:.4f}" in md
    # the classifier samples used the stored router, restricted to the composed shards
    classifier = read_card(store.samples_dir("digits_2split", "fig2-classifier-k2"))
    assert classifier["composition"] == "classifier" and classifier["shards"] == [0, 1]
    assert any(parent["kind"] == "router" for parent in classifier["parents"])


def test_one_shard_is_the_same_model_for_every_method(swept):
    """Sampling k = 1 once is exact: the classifier over one shard gives the same samples."""
    from tests.conftest import run_inprocess

    root, _ = swept
    run_inprocess(
        "experiment=digits_2split", *TINY, "composition=classifier", "shards=[0]", "name=one",
        artifacts=root, config="sample",
    )  # fmt: skip
    store = ArtifactStore(root)
    drawn = [
        np.load(io.BytesIO((store.samples_dir("digits_2split", n) / "samples.npz").read_bytes()))
        for n in ("one", "fig2-k1")
    ]
    np.testing.assert_array_equal(drawn[0]["images"], drawn[1]["images"])


def test_plot_is_a_png_of_the_expected_size(swept):
    from cdm.paper.fig2 import FIGURE_DPI, FIGURE_INCHES

    _, card = swept
    image = Image.open(f"{card['path']}/fig2.png")
    image.load()
    assert image.format == "PNG"
    # two panels: against all shards' data and against the composed shards' own data
    width, height = FIGURE_INCHES
    assert image.size == (round(2 * width * FIGURE_DPI), round(height * FIGURE_DPI))
    assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fig2.compositions=[classifier,median]"], r"unknown \['median'\]"),
        (["fig2.metric=IS"], "fig2.metric=IS"),
        (["fig2.feature_space=inception"], "not evaluated"),
        (["fig2.experiment=digits_1split"], "at least 2"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        fig2(tmp_path, *overrides)
    assert not (tmp_path / "backbones").exists()  # nothing was trained


def test_format_reports_drop_one_against_the_paper():
    from cdm.paper.fig2 import add_relative_change, format_fig2

    values = {1: 4.0, 2: 2.0, 3: 1.0}
    points = [
        {"k": k, "method": m, "shards": list(range(k)), "value": v * (1 if m == "classifier" else 1.5 if k > 1 else 1),
         "own_reference_value": None, "heldout_value": None}
        for k, v in values.items() for m in ("classifier", "average")
    ]  # fmt: skip
    add_relative_change(points, "value", "relative_change")
    add_relative_change(points, "own_reference_value", "own_reference_relative_change")
    markdown, rows = format_fig2(points, ["classifier", "average"], "FD_x", 3, 10, "x_3split")
    assert rows[3] == ["3", "0 1 2", "1.0000", "-0.7500", "1.5000", "-0.6250"]
    assert "| 3 | 0 1 2 | 1.0000 | -75.0% | 1.5000 | -62.5% |" in markdown
    assert "Classifier +100.0%, Naive Avg +100.0%" in markdown  # FD(2) / FD(3) - 1
    assert "vs own shards" not in markdown  # no own-reference values: no second table
