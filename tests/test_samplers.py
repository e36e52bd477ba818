"""Every shipped sampler (conf/sampler) on every noise schedule draws data, not saturated noise.

Issue 11, item 1: ``sampler=dpm++`` returned saturated noise (about 40% of pixels 255, 60% 0) on
squaredcos_cap_v2, because diffusers' DPM-Solver++ starts at t = 999 (alpha_bar = 2.4e-9 there,
so an error of eps is multiplied by ~2e4 in its x_0 prediction) and, unlike DDIM and DDPM, does
not clip x_0. The fast test reproduces that with an exact denoiser that has what a trained
network has: a small error, and outputs of the size it was trained on (eps ~ N(0, I), so it
cannot pull a blown-up x_t back); the slow test compares label accuracy on trained digits models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import cdm.conf
from cdm.core.sampling import sample
from cdm.jobs.pipeline import CDMPipeline, cycle_labels, instantiate_option, to_uint8

SAMPLERS = sorted(Path(cdm.conf.__file__).parent.glob("sampler/*.yaml"))
SCHEDULES = ["squaredcos_cap_v2", "linear", "scaled_linear"]
# a toy data distribution: 4 images of 1 x 4 x 4 pixels inside [-0.8, 0.8]
SHAPE = (1, 4, 4)
POINTS = torch.Generator().manual_seed(0)
DATA = torch.rand(4, 16, generator=POINTS, dtype=torch.float64) * 1.6 - 0.8
ERROR = 0.02  # a trained network's eps is off by about this much
EPS_RANGE = 4.0  # and never much larger than its N(0, I) training targets


def build_sampler(path: Path, beta_schedule: str):
    """The scheduler of a shipped sampler option on a backbone schedule, as CDMPipeline builds it."""
    schedule = {"num_train_timesteps": 1000, "beta_schedule": beta_schedule}
    return instantiate_option(OmegaConf.load(path), **schedule)


def toy_denoiser(scheduler):
    """eps of the image mixture DATA (E[x_0 | x_t] by Bayes) plus ERROR, within +-EPS_RANGE."""
    abars = scheduler.alphas_cumprod.to(torch.float64)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar, flat = abars[int(t)], x.flatten(1)
        d2 = ((flat[:, None] - abar.sqrt() * DATA[None]) ** 2).sum(-1)
        x0 = torch.softmax(-d2 / (2 * (1 - abar)), dim=1) @ DATA
        eps = (flat - abar.sqrt() * x0) / (1 - abar).sqrt() + ERROR
        return eps.clamp(-EPS_RANGE, EPS_RANGE).reshape(x.shape)

    return denoise


def saturated_share(x0: torch.Tensor) -> float:
    """Share of values that end outside the data's range (pixel 0 or 255 after clamping)."""
    return float((x0.abs() >= 1.0).double().mean())


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("path", SAMPLERS, ids=[p.stem for p in SAMPLERS])
def test_every_sampler_draws_the_data_on_every_schedule(path, beta_schedule):
    scheduler = build_sampler(path, beta_schedule)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(256, *SHAPE, generator=g, dtype=torch.float64)
    x0 = sample(toy_denoiser(scheduler), scheduler, x_T, 25, generator=g)
    assert saturated_share(x0) < 0.02, f"{path.stem} on {beta_schedule}: saturated samples"
    nearest = torch.cdist(x0.flatten(1), DATA).min(dim=1).values
    assert float(nearest.median()) < 0.5, f"{path.stem} on {beta_schedule}: far from the data"


DIGITS = ["experiment=digits_4split"]


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """The demo's models: a backbone, 4 LoRA shards and the domain classifier on digits."""
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("samplers-store")
    stages = ["stage=backbone", *(f"stage=shard shard.index={k}" for k in range(4)),
              "stage=feature_net"]  # fmt: skip
    for stage in stages:
        run_inprocess(*DIGITS, *stage.split(), "trainer.enable_progress_bar=false", artifacts=root)
    return root


def pixel_shares(images: torch.Tensor) -> tuple[float, float]:
    """(share of pixels 0, share of pixels 255) of images in [-1, 1] stored as uint8."""
    pixels = to_uint8(images)
    return float((pixels == 0).double().mean()), float((pixels == 255).double().mean())


@pytest.mark.slow
@pytest.mark.timeout(3600)  # trains the demo's models (about 2 min on a quiet 2-core machine)
def test_every_sampler_draws_digits_the_classifier_recognises_as_often_as_ddim(digits_store):
    """Label accuracy of the domain classifier (stage=feature_net) per sampler, against DDIM's."""
    from cdm.jobs.feature_net import load_domain_features
    from cdm.store import ArtifactStore

    classifier = load_domain_features(ArtifactStore(digits_store), "digits", 8, 0)
    results = {}
    for path in SAMPLERS:
        pipe = CDMPipeline.from_store(digits_store, "digits_4split", composition="average",
                                      sampler=path.stem)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        labels = cycle_labels(pipe.label_pool, 200)
        out = pipe(batch_size=200, class_labels=labels, num_inference_steps=25,
                   generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
        predicted = torch.as_tensor(classifier.predict(to_uint8(out.images)))
        results[path.stem] = (
            float((predicted == labels).double().mean()),
            *pixel_shares(out.images),
        )
    accuracy, black, white = results["ddim"]
    assert accuracy > 0.5, results  # the models draw digits at all
    for name, (acc, zeros, whites) in results.items():
        assert acc > accuracy - 0.15, f"{name}: label accuracy {acc:.2f}, DDIM {accuracy:.2f}"
        assert abs(zeros - black) < 0.25 and abs(whites - white) < 0.25, (name, results)
