"""cdm-attribute on a tiny store: shard values by composition and eq. 6 credit, wired to the
pipeline (issue 13, sections 3 and 4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.attribution.credit import weighted_score
from cdm.attribution.divergence import exact_divergence, hutchinson_divergence

# unconditional, so the router's weights depend on x_t (by-class labels would fix them)
TINY = ["experiment=digits_2split", "debug=tiny", "data.conditional=false"]
RUN = [*TINY, "num_samples=6", "batch_size=4", "steps=3", "attribution.credit_samples=2"]
PIXELS = "attribution.property.space=pixels"  # FD without training the domain feature net


def compose_attribute(root, *overrides: str):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="attribute", overrides=[*overrides, f"paths.artifacts={root}"])


def attribute(root, *overrides: str) -> dict:
    from cdm.attribution.composition import run_attribution

    fd = not any(o.startswith("attribution/property=") for o in overrides)
    return run_attribution(compose_attribute(root, *RUN, *([PIXELS] if fd else []), *overrides))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """Backbone, two shards and a router; experiment ``copies``: shard-00 twice (a copy of its
    manifest and adapter as shard-01)."""
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("attribute-store")
    for stage in ("backbone", "shard shard.index=0", "shard shard.index=1", "router"):
        run_inprocess(*TINY, *f"stage={stage}".split(), artifacts=root)
    source, copies = root / "experiments" / "digits_2split", root / "experiments" / "copies"
    (copies / "manifests").mkdir(parents=True)
    for name in ("safe", "private"):
        shutil.copy(source / "manifests" / f"{name}.json", copies / "manifests")
    for k in ("00", "01"):
        shutil.copy(source / "manifests" / "shard-00.json", copies / "manifests" / f"shard-{k}.json")  # fmt: skip
        shutil.copytree(source / "shards" / "shard-00", copies / "shards" / f"shard-{k}")
    return root


def test_shapley_efficiency_on_the_composed_property_with_the_same_noise(store_root, train):
    card = attribute(store_root)
    values = json.loads((store_root / card["path"] / "values.json").read_text())
    shapley = values["shapley"]["values"]
    # efficiency: the values share out v(all) - v(empty: the safe backbone)
    assert sum(shapley.values()) == pytest.approx(values["v_all"] - values["v_empty"], abs=1e-9)
    assert values["v_all"] != values["v_empty"]
    # v(S) is the property of exactly what cdm-sample shards=S draws with the same seed
    from cdm.attribution.composition import PropertyContext, fd_property
    from cdm.store import ArtifactStore

    cfg = compose_attribute(store_root, *RUN, PIXELS)
    prop = fd_property(PropertyContext(cfg, ArtifactStore(store_root)), space="pixels")
    for shards, key in (("[0,1]", "shard-00,shard-01"), ("[1]", "shard-01")):
        sampled = train(*TINY, "num_samples=6", "batch_size=4", "steps=3", f"shards={shards}",
                        f"name=s{len(key)}", artifacts=store_root, config="sample")  # fmt: skip
        images = np.load(f"{sampled['path']}/samples.npz")["images"]
        assert prop(images) == pytest.approx(values["coalitions"][key], rel=1e-9)
    # leave-one-out is v(all) - v(all without i), from the same memoised coalitions
    loo = values["leave_one_out"]["values"]
    assert loo["shard-00"] == pytest.approx(values["v_all"] - values["coalitions"]["shard-01"])
    # eq. 6 credit sums to one per sample; the table and plot are written
    assert sum(values["eq6"]["credit"].values()) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(np.sum(values["eq6"]["credit_per_step"], axis=1), 1.0)
    assert "| shard-00 |" in (store_root / card["path"] / "table.md").read_text()
    # the card names every adapter (and the router) it composed, by the hash the store holds
    from cdm.store import read_card

    adapters = {p["name"]: p["hash"] for p in card["parents"] if p["kind"] == "adapter"}
    for job in ("shard-00", "shard-01"):
        stored = read_card(store_root / "experiments" / "digits_2split" / "shards" / job)
        assert adapters[job] == stored["weights_sha256"]
    assert {p["kind"] for p in card["parents"]} == {"backbone", "adapter", "router"}
    assert card["seeds"]["seed"] == 0 and card["wall_time_s"] > 0


def test_identical_shards_get_equal_values(store_root):
    card = attribute(store_root, "experiment_name=copies", "composition=average",
                     "attribution.method.credit=false")  # fmt: skip
    values = json.loads((store_root / card["path"] / "values.json").read_text())
    for method in ("shapley", "banzhaf", "leave_one_out"):
        a, b = values[method]["values"]["shard-00"], values[method]["values"]["shard-01"]
        assert a == pytest.approx(b, abs=1e-12)
    assert values["coalitions"]["shard-00"] == values["coalitions"]["shard-01"]


def test_router_weight_property_by_shard_index(store_root):
    card = attribute(store_root, "attribution/property=router_weight",
                     "attribution.property.shard=1", "attribution.method.credit=false")  # fmt: skip
    values = json.loads((store_root / card["path"] / "values.json").read_text())
    coalitions = values["coalitions"]
    assert coalitions["{}"] == 0.0 and coalitions["shard-00"] == 0.0
    assert coalitions["shard-01"] == pytest.approx(1.0)
    assert coalitions["shard-00,shard-01"] == pytest.approx(values["router_weight"]["shard-01"])
    assert 0.0 < values["router_weight"]["shard-01"] < 1.0


def test_sampled_estimators_beyond_max_exact_shards(store_root):
    card = attribute(store_root, "attribution.method.max_exact_shards=1",
                     "attribution.method.n_permutations=4", "attribution.method.msr_samples=12",
                     "attribution.method.credit=false", "attribution.name=sampled")  # fmt: skip
    values = json.loads((store_root / card["path"] / "values.json").read_text())
    assert "shapley_permutation" in values and "banzhaf_msr" in values
    # every permutation's marginals sum to v(all) - v(empty): efficiency holds exactly
    total = sum(values["shapley_permutation"]["values"].values())
    assert total == pytest.approx(values["v_all"] - values["v_empty"], abs=1e-9)


def test_eq6_grad_path_and_exact_vs_hutchinson(store_root):
    """The router weights are differentiable in x (div(w_i s_i) != w_i div(s_i)), and the
    Hutchinson estimate of div(w_i s_i) agrees with the exact trace within its error."""
    from cdm.attribution.composition import AttributionContext, composed_fields
    from cdm.attribution.divergence import ExactDivergence
    from cdm.store import ArtifactStore

    cfg = compose_attribute(store_root, *RUN)
    ctx = AttributionContext(cfg, ArtifactStore(store_root), divergence=ExactDivergence())
    weights, scores = composed_fields(ctx.full, None)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 500.0)
    field = weighted_score(weights, scores[0], 0, t)
    exact = exact_divergence(field, x)
    w = weights(x, t)[:, 0].detach()
    frozen = w * exact_divergence(lambda z: scores[0](z, t), x)
    assert not torch.allclose(exact, frozen, rtol=1e-4, atol=1e-6)  # grad w_i . s_i counts
    gen = torch.Generator().manual_seed(0)
    probes = torch.stack([hutchinson_divergence(field, x, generator=gen) for _ in range(48)])
    mean, err = probes.mean(0), probes.std(0) / 48**0.5
    assert torch.all((mean - exact).abs() <= 4 * err + 1e-4 * exact.abs())


def test_credit_method_needs_no_property(store_root):
    """attribution/method=credit with the default property (FD in the domain space, whose feature
    net this store lacks): only eq. 6 credit is computed, per step, with the Fig. 3 plot."""
    from cdm.attribution.composition import run_attribution

    card = run_attribution(compose_attribute(store_root, *RUN, "attribution/method=credit"))
    values = json.loads((store_root / card["path"] / "values.json").read_text())
    assert set(values) == {"players", "eq6"} and card["property"] is None
    assert np.allclose(np.sum(values["eq6"]["credit_per_step"], axis=1), 1.0)
    assert len(values["eq6"]["weights_per_step"]) == 3 and "credit.png" in card["files"]
    per_sample = np.array(values["eq6"]["per_sample"])
    assert per_sample.shape == (2, 2) and np.allclose(per_sample.sum(1), 1.0)
    assert values["eq6"]["mean_max_credit"] == pytest.approx(per_sample.max(1).mean())
    assert "credit-sample0.png" in card["files"]


def test_bad_choices_are_one_line_exit_2(store_root):
    base = [sys.executable, "-m", "cdm.cli.attribute", *TINY, f"paths.artifacts={store_root}",
            f"hydra.run.dir={store_root}/hydra-run"]  # fmt: skip
    for bad, needle in (("attribution/property=nope", "attribution/property=nope"),
                        ("sampler=ddpm", "sampler=ddpm"),
                        ("attribution.property.space=clip", "attribution.property.space=clip"),
                        ("composition=paragon", "composition=paragon")):  # fmt: skip
        proc = subprocess.run([*base, bad], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cdm-attribute:") and needle in lines[0]


def test_every_attribution_option_composes_with_an_importable_target(tmp_path):
    from hydra.utils import get_object

    from cdm.attribution.divergence import MAX_EXACT_DIM
    from cdm.cli.checks import EXACT_DIM
    from cdm.jobs.config import config_dir

    assert EXACT_DIM == MAX_EXACT_DIM
    for group in ("method", "property", "divergence"):
        options = sorted(
            p.stem for p in (Path(config_dir()) / "attribution" / group).glob("*.yaml")
        )
        assert options, group
        for option in options:
            cfg = compose_attribute(tmp_path, f"attribution/{group}={option}")
            assert callable(get_object(cfg.attribution[group]._target_))
            assert cfg.attribution[group].name == option


@pytest.mark.slow
def test_wandb_table_offline(store_root):
    card = attribute(store_root, "logger=wandb", "attribution.method.credit=false",
                     "attribution.name=wandb")  # fmt: skip
    tables = sorted((store_root / "wandb").glob("offline-run-*/files/media/table/*.table.json"))
    assert tables, "no W&B table written"
    table = json.loads(tables[-1].read_text())
    assert table["columns"][0] == "shard" and [r[0] for r in table["data"]] == [
        "shard-00",
        "shard-01",
    ]
    assert card["name"] == "wandb"
