"""CDMPipeline: a diffusers pipeline over the store, bit for bit what cdm-sample stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from cdm.jobs.config import register_resolvers
from cdm.jobs.pipeline import CDMPipeline, CDMPipelineOutput, instantiate_option, sample_config

TINY = ["experiment=digits_2split", "debug=tiny"]
SAMPLE = [*TINY, "num_samples=6", "batch_size=4", "steps=4", "progress=false"]
SEED = 0


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("pipeline-store")
    for stage in ("stage=backbone", "stage=shard shard.index=0", "stage=shard shard.index=1",
                  "stage=router"):  # fmt: skip
        run_inprocess(*TINY, *stage.split(), artifacts=root)
    return root


def pipeline(store_root, composition: str, **kwargs) -> CDMPipeline:
    register_resolvers()
    pipe = CDMPipeline.from_store(
        store_root, "digits_2split", composition=composition, overrides=["debug=tiny"], **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(start: int) -> torch.Generator:
    """The generator cdm-sample uses for its batch at ``start``."""
    return torch.Generator().manual_seed(SEED * 1_000_003 + start)


@pytest.mark.parametrize("composition", ["classifier", "average"])
def test_pipeline_equals_cdm_sample_bit_for_bit(store_root, train, composition):
    card = train(*SAMPLE, f"composition={composition}", artifacts=store_root, config="sample")
    stored = np.load(f"{card['path']}/samples.npz")
    trace = np.load(f"{card['path']}/trace.npz")["weights"]
    pipe = pipeline(store_root, composition)
    first = pipe(batch_size=4, num_inference_steps=4, generator=generator(0), output_type="pil")
    assert isinstance(first, CDMPipelineOutput) and len(first.images) == 4
    pixels = np.stack([np.array(im) for im in first.images])[:, None]  # [B, 1, H, W]
    assert np.array_equal(pixels, stored["images"][:4])
    assert np.array_equal(first.weights.numpy(), trace[:4])
    rest = pipe(batch_size=2, class_labels=stored["labels"][4:].tolist(), num_inference_steps=4,
                generator=generator(4), output_type="latent")  # fmt: skip
    as_uint8 = ((rest.images + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(as_uint8, stored["images"][4:])
    assert np.array_equal(rest.weights.numpy(), trace[4:])
    assert [p["hash"] for p in pipe.parents] == [p["hash"] for p in card["parents"]]


def test_tuple_and_dataclass_outputs_agree_and_output_types(store_root):
    pipe = pipeline(store_root, "average")
    call = {"batch_size": 3, "num_inference_steps": 3}
    out = pipe(**call, generator=generator(7), output_type="pt")
    images, weights = pipe(**call, generator=generator(7), output_type="pt", return_dict=False)
    assert torch.equal(out.images, images) and torch.equal(out.weights, weights)
    assert images.shape == (3, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert weights.shape == (3, 3, 2)
    array = pipe(**call, generator=generator(7), output_type="np").images
    assert array.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(array, images.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="output_type='png'"):
        pipe(**call, output_type="png")


def test_shard_subsets(store_root, train):
    """from_store(shards=...) is cdm-sample shards=[...]; a call's shards mask the loaded ones."""
    card = train(*SAMPLE, "composition=average", "shards=[1]", "name=only-1", artifacts=store_root, config="sample")  # fmt: skip
    only = pipeline(store_root, "average", shards=[1])
    assert only.shards == [1] and [p["name"] for p in only.parents][1:] == ["shard-01"]
    one = only(batch_size=4, num_inference_steps=4, generator=generator(0), output_type="latent")
    stored = np.load(f"{card['path']}/samples.npz")["images"][:4]
    assert np.array_equal(((one.images + 1) * 127.5).round().to(torch.uint8).numpy(), stored)
    both = pipeline(store_root, "average")  # its default labels cycle through both shards' classes
    labels = only.label_pool[torch.arange(4) % len(only.label_pool)]
    masked = both(batch_size=4, class_labels=labels, num_inference_steps=4, generator=generator(0),
                  output_type="latent", shards=[1])  # fmt: skip
    assert (masked.weights[..., 0] == 0).all() and (masked.weights[..., 1] == 1).all()
    torch.testing.assert_close(masked.images, one.images, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="this pipeline composes shards"):
        both(batch_size=1, num_inference_steps=1, shards=[5])


def test_sampler_and_composition_are_config_groups():
    """sampler=... builds the diffusers scheduler on the backbone's schedule; a misspelt
    composition fails when the config is composed, listing the choices."""
    cfg = sample_config([*TINY, "sampler=dpm++", "composition=topk", "topk.k=1"])
    schedule = dict(cfg.backbone.scheduler)
    dpm = instantiate_option(cfg.sampler, **schedule)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.beta_schedule == schedule["beta_schedule"]
    topk = instantiate_option(cfg.composition)
    assert (topk.name, topk.k, topk.router) == ("topk", 1, "classifier") and cfg.name == "topk"
    ddim = instantiate_option(sample_config(TINY).sampler, **schedule)
    assert dict(ddim.config) == dict(DDIMScheduler(**schedule).config)
    with pytest.raises(Exception, match=r"(?s)composition/avrage.*average.*weight_merge"):
        sample_config([*TINY, "composition=avrage"])
    with pytest.raises(Exception, match=r"(?s)sampler/euler-ish.*dpm\+\+"):
        sample_config([*TINY, "sampler=euler-ish"])
