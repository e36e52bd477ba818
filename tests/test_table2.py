"""Table 2 (issue 14, section 6): TIFA-domain of stored samples from their prompts, the table's
layout and numbers, the cached VQA, the base model (``composition=base``), and the whole sweep."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from cdm.data.captioned import load_captioned
from cdm.eval.tifa import ChoiceMatcher, domain_vqa_accuracy, train_domain_vqa
from cdm.jobs.pipeline import to_uint8
from cdm.paper import table2 as T
from cdm.store import ArtifactStore, make_card
from cdm.store.samples import save_samples

EXPERIMENT = "captioned_test"


@pytest.fixture(scope="module")
def captioned():
    return load_captioned(n_train=160, n_test=24, kinds=["digits"])


@pytest.fixture(scope="module")
def vqa(captioned):
    return train_domain_vqa(captioned, epochs=3, seed=0, width=8)


def test_subsets_and_plan():
    assert T.shard_subsets([0, 1, 2]) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    cells = T.plan("t2", [0, 1, 2], ["classifier", "average"], base=True, paragon=True)
    rows = [(c["row"], c["method"], c["composition"], c["samples"]) for c in cells]
    assert rows[:3] == [("base", "one model", "base", "t2-base"),
                        ("paragon", "one model", "paragon", "t2-paragon"),
                        ("shard-00", "one model", "average", "t2-s0")]  # fmt: skip
    assert ("shard-00 + shard-02", "classifier", "classifier", "t2-classifier-s02") in rows
    assert len(cells) == 2 + 3 + 4 * 2  # base, paragon, 3 single shards, 4 subsets x 2 methods
    assert len({c["samples"] for c in cells}) == len(cells)


def real_samples(store, captioned, name, rows, extra_prompts=()):
    """A samples artifact whose images are the real test canvases ``rows`` (a perfect model),
    with the prompts.json cdm-sample writes for text data."""
    test = [i for i, s in enumerate(captioned.splits) if s == "test"]
    canvases = [*rows, *[0] * len(extra_prompts)]  # any image for a free prompt (not scored)
    images = to_uint8(torch.stack([captioned.image(test[r]) for r in canvases]))
    prompts = [{"caption": captioned.captions[test[r]], "test_row": r} for r in rows]
    prompts += [{"caption": p, "test_row": None} for p in extra_prompts]
    buffer = io.BytesIO()
    np.savez(buffer, images=images.numpy(), labels=np.array([]))
    files = {"samples.npz": buffer.getvalue(), "prompts.json": json.dumps(prompts).encode()}
    save_samples(store, EXPERIMENT, name, files, make_card(kind="samples", name=name))


def test_tifa_of_real_canvases_equals_the_vqa_ceiling(tmp_path, captioned, vqa):
    """Real test canvases stand in for a perfect model: their TIFA-domain read from a samples
    artifact is the VQA's accuracy on the test split, computed directly with tifa_score."""
    store = ArtifactStore(tmp_path)
    n_test = sum(s == "test" for s in captioned.splits)
    real_samples(store, captioned, "real", list(range(n_test)), ["a pink elephant"])
    got = T.samples_tifa(store, EXPERIMENT, "real", captioned, vqa, ChoiceMatcher())
    direct = domain_vqa_accuracy(vqa, captioned, "test")
    assert got.metric == "TIFA-domain" and got.n_questions == direct.n_questions
    assert got.score == pytest.approx(direct.score)
    assert got.per_element_type == pytest.approx(direct.per_element_type)
    assert set(got.per_element_type) == {"object", "color", "counting", "spatial"}
    # sample j is asked about its own prompt's canvas (prompts cycle, so rows repeat)
    test = [i for i, s in enumerate(captioned.splits) if s == "test"]
    rows = [3, 0, 3]
    prompts = [{"caption": captioned.captions[test[r]], "test_row": r} for r in rows]
    scored, questions = T.sample_questions(captioned, prompts)
    assert scored == [0, 1, 2]
    for j, r in enumerate(rows):
        mine = [q for q in questions if q.caption_id == f"{j:06d}"]
        truth = captioned.attributes[test[r]]["objects"]
        assert len(mine) == 4 * len(truth) and mine[0].caption == captioned.captions[test[r]]
        assert {q.answer for q in mine if q.element_type == "color"} == {g["color"] for g in truth}


def test_a_prompt_that_is_not_its_test_caption_is_refused(tmp_path, captioned):
    prompts = [{"caption": "three blue 9s at the top", "test_row": 0}]
    if (
        captioned.captions[[i for i, s in enumerate(captioned.splits) if s == "test"][0]]
        == (prompts[0]["caption"])
    ):
        prompts[0]["caption"] = "a red 1 in the center"
    with pytest.raises(ValueError, match="is not test caption 0"):
        T.sample_questions(captioned, prompts)
    store = ArtifactStore(tmp_path)
    real_samples(store, captioned, "free", [], ["a pink elephant"])
    with pytest.raises(ValueError, match="no prompt is a test caption"):
        T.samples_tifa(store, EXPERIMENT, "free", captioned, None)


def test_the_vqa_is_trained_once_and_kept_in_the_store(tmp_path, captioned, monkeypatch):
    from omegaconf import OmegaConf

    store = ArtifactStore(tmp_path)
    spec = OmegaConf.create({"epochs": 1, "width": 8, "seed": 0})
    first, card = T.domain_vqa(store, captioned, spec)
    assert card["kind"] == "domain_vqa" and card["metric"] == "TIFA-domain"

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the store holds it")

    monkeypatch.setattr(T, "train_domain_vqa", no_training)
    again, card2 = T.domain_vqa(store, captioned, spec)
    assert card2["name"] == card["name"]
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    with pytest.raises(AssertionError, match="trained again"):  # other settings: another VQA
        T.domain_vqa(store, captioned, OmegaConf.create({"epochs": 2, "width": 8, "seed": 0}))


def fake_cells():
    cells = T.plan("t", [0, 1], ["classifier", "average"], base=True, paragon=True)
    values = {"t-base": 0.4, "t-paragon": 0.7, "t-s0": 0.5, "t-s1": 0.6,
              "t-classifier-s01": 0.75, "t-average-s01": 0.65}  # fmt: skip
    for c in cells:
        c["label"] = c["row"]
        c["value"], c["fd"], c["n_questions"] = values[c["samples"]], 10 * values[c["samples"]], 8
        c["per_element_type"] = {"color": values[c["samples"]] / 2, "object": 1.0}
        c["per_caption"] = per_caption(c["value"], spread=0.01)
    return cells


def per_caption(mean: float, spread: float, n: int = 24) -> dict[str, float]:
    """n caption scores with this mean, alternating +/- spread around it."""
    return {f"{j:06d}": mean + (spread if j % 2 else -spread) for j in range(n)}


def test_format_table2_holds_each_cells_numbers():
    cells = fake_cells()
    ceiling = {"score": 0.95, "per_element_type": {"color": 0.9, "object": 1.0}}
    markdown, rows = T.format_table2(cells, ["classifier", "average"], "TIFA-domain", "FD_x",
                                     ceiling, 24)  # fmt: skip
    assert "| shard-00 + shard-01 | - | 0.750 | 0.650 |" in markdown
    assert "| paragon | 0.700 | - | - |" in markdown and "| base | 4.000 | - | - |" in markdown
    assert "0.950" in markdown and "not TIFA with its published" in markdown
    assert "0.750 vs the paragon's 0.700" in markdown and "holds here" in markdown
    parsed = list(csv.reader(io.StringIO("\n".join(",".join(r) for r in rows))))
    header = parsed[0]
    assert header[:5] == ["model", "shards", "method", "samples", "TIFA-domain"]
    by_samples = {r[3]: r for r in parsed[1:]}
    for c in cells:
        r = by_samples[c["samples"]]
        assert float(r[4]) == pytest.approx(c["value"])
        assert float(r[header.index("TIFA-domain color")]) == pytest.approx(c["value"] / 2)
        assert float(r[header.index("FD_x")]) == pytest.approx(c["fd"])
    for c in cells:  # the paragon above every CDM: the verdict says so
        if len(c["shards"]) > 1:
            c["value"], c["per_caption"] = 0.1, per_caption(0.1, spread=0.01)
    assert "does not hold" in T.verdict(cells, "TIFA-domain")
    for c in cells:  # above on average, but per caption the difference is noise: no claim
        if len(c["shards"]) > 1:
            c["value"], c["per_caption"] = 0.75, per_caption(0.75, spread=0.5)
    assert "cannot be told apart" in T.verdict(cells, "TIFA-domain")
    assert T.paired_difference({"a": 1.0, "b": 0.5}, {"a": 0.5, "b": 0.5}) == pytest.approx(
        (0.25, 0.25)
    )
    png = T.plot_png(cells, ["classifier", "average"], "TIFA-domain", 0.95, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_base_composition_is_the_bare_backbone(tiny_digits_backbone):
    """composition=base: the safe backbone alone, no adapter read (Table 2's base model)."""
    from cdm.jobs.pipeline import CDMPipeline
    from cdm.models.backbone import UNET_CLASSES, predict_epsilon

    pipe = CDMPipeline.from_store(
        tiny_digits_backbone, "digits_4split", composition="base", overrides=["debug=tiny"]
    )
    assert pipe.shards == [] and pipe.adapter_names == ["backbone"]
    assert [p["kind"] for p in pipe.parents] == ["backbone"]
    bare, _ = ArtifactStore(tiny_digits_backbone).load_backbone(
        pipe.parents[0]["name"], UNET_CLASSES["unet2d"]
    )
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])
    eps = pipe.model(x, t, labels, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(eps, predict_epsilon(bare.eval(), x, t, labels), atol=1e-6)
    out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="latent")  # fmt: skip
    assert out.images.shape == (2, 1, 8, 8) and out.weights.shape[-1] == 1


def test_bad_table2_settings_are_refused_before_any_work(tmp_path):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for bad, message in (("table2.compositions=[classifier,mean]", "unknown \\['mean'\\]"),
                             ("table2.feature_space=pixels", "is not evaluated")):  # fmt: skip
            cfg = compose(config_name="table2", overrides=[bad, f"paths.artifacts={tmp_path}"])
            with pytest.raises(ValueError, match=message):
                T.run_table2(cfg, [])
    assert list(tmp_path.iterdir()) == []


# more samples (prompts cycle over the 12 test captions) and private images than the feature net's
# 128 dimensions: singular covariances make scipy's sqrtm (FD) crawl
TINY_TABLE2 = [
    "debug=tiny", "backbone=text_conditional", "data.kwargs.n_train=300", "data.kwargs.n_test=12",
    "num_samples=160", "batch_size=80", "steps=2", "evaluate.kid_subsets=2",
    "table2.vqa.epochs=1", "table2.vqa.width=8", "table2.n_jobs=1",
    "table2.compositions=[classifier,average]",
]  # fmt: skip


def run_table2_cli(root, *extra):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    cmd = [sys.executable, "-m", "cdm.cli.table2", *TINY_TABLE2, *extra, f"paths.artifacts={root}",
           f"hydra.run.dir={root}/hydra-run"]  # fmt: skip
    env = dict(os.environ)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 15 min on 2 busy cores: FD (scipy sqrtm) is slow in this process
def test_cdm_table2_end_to_end_on_tiny_captioned_shards(tmp_path):
    """cdm-table2 trains what is missing, samples every cell, and its table holds exactly the
    TIFA-domain of each stored samples set (recomputed here) and the FD of its evaluation card."""
    from omegaconf import OmegaConf

    from cdm.store import read_card

    run_table2_cli(tmp_path)
    store = ArtifactStore(tmp_path)
    table = store.table_dir("table2")
    card = read_card(table)
    assert card["metric"] == "TIFA-domain" and card["fd_metric"] == "FD_captioned"
    assert card["command"] and card["device"] and card["wall_time_s"] > 0
    cells = card["cells"]
    assert len(cells) == 2 + 3 + 4 * 2  # base, paragon, 3 shards, 4 subsets x 2 methods
    ceiling = card["vqa_ceiling"]["score"]
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="table2", overrides=[*TINY_TABLE2, f"paths.artifacts={tmp_path}"])
    dataset = T.captioned_dataset(cfg)
    spec = OmegaConf.create({"epochs": 1, "width": 8, "seed": 0})
    vqa, vqa_card = T.domain_vqa(store, dataset, spec)
    assert vqa_card["name"] == card["vqa"]
    assert ceiling == pytest.approx(domain_vqa_accuracy(vqa, dataset, "test").score)
    rows = list(csv.reader(io.StringIO((table / "table.csv").read_text())))
    by_samples = {r[3]: r for r in rows[1:]}
    for c in cells:
        again = T.samples_tifa(store, "captioned_3band", c["samples"], dataset, vqa)
        assert c["value"] == pytest.approx(again.score), c["samples"]
        assert float(by_samples[c["samples"]][4]) == pytest.approx(again.score, abs=1e-4)
        fd = read_card(store.evals_dir("captioned_3band", c["samples"]))["metrics"]["FD_captioned"]
        assert c["fd"] == pytest.approx(fd)
    assert (table / "table2.png").read_bytes()[:4] == b"\x89PNG"
    base = next(c for c in cells if c["row"] == "base")
    samples = read_card(store.samples_dir("captioned_3band", base["samples"]))
    assert samples["composition"] == "base" and samples["shards"] == []
