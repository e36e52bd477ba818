"""Issue 14 leftovers: text models wherever a user takes them.

Every shipped sampler on the tiny Stable Diffusion pipeline (tests/test_stable_diffusion.py's
folder, loaded back through ``backbone=sd_local``); the classifier router trained on the noised
latents it sees at sampling time; the k-NN router embedding the *decoded* x0-hat and the domain
feature net staying on pixels; the k-NN embedder text data default to; a prompts file entering
the sample identity by its captions; forgetting a sample of a text experiment verified against
training from scratch; and captions sent to the HTTP service.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cdm.conf
from cdm.core.identity import job_identity
from cdm.data.captioned import load_captioned
from cdm.data.manifest import Manifest
from cdm.jobs.config import config_dir, register_resolvers
from cdm.store import ArtifactStore
from tests.conftest import run_inprocess
from tests.test_stable_diffusion import tiny_sd_pipeline

SAMPLERS = sorted(p.stem for p in Path(cdm.conf.__file__).parent.glob("sampler/*.yaml"))
EXP = "captioned_3band"
# the tiny text model of tests/test_text_conditioning.py (MiniLM captions, 32x32 canvases)
TINY_TEXT = [
    f"experiment={EXP}", "debug=tiny", "backbone=text_conditional", "data.kwargs.n_train=120",
    "data.kwargs.n_test=24", "backbone.unet.block_out_channels=[16,32]", "sharding.n_slices=3",
]  # fmt: skip


def compose_config(name: str, overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def sample(root: Path, common: list[str], *overrides: str, steps: int = 2) -> dict:
    """cdm-sample of 3 samples in this process; its card."""
    return run_inprocess(
        *common, "num_samples=3", "batch_size=3", f"steps={steps}", "progress=false", *overrides,
        artifacts=root, config="sample",
    )  # fmt: skip


# ----------------------------------------------------------------------------- Stable Diffusion


@pytest.fixture(scope="module")
def sd_store(tmp_path_factory) -> tuple[Path, list[str], object]:
    """(store, overrides, diffusers pipeline): the tiny SD folder imported as the backbone
    (16x16 RGB canvases -> 4x8x8 VAE latents) and two LoRA shards on it."""
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    root = tmp_path_factory.mktemp("sd-store")
    common = [
        f"experiment={EXP}", "debug=tiny", "backbone=sd_local", f"backbone.pretrained_path={folder}",
        "pretrain.epochs=0", "data.resolution=16", "data.kwargs.n_train=60", "data.kwargs.n_test=12",
    ]  # fmt: skip
    run_inprocess(*common, "stage=backbone", artifacts=root)
    for k in (0, 1):
        run_inprocess(*common, "stage=shard", f"shard.index={k}", "adapter=lora_sd", artifacts=root)
    return root, common, pipe


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_samples_the_tiny_sd_pipeline(sd_store, sampler):
    """Item 1: ``sampler=dpm++`` with ``backbone=sd_local`` raised a TypeError (``clip_sample``
    passed to DPM-Solver++). Each sampler now gets only the keys its class takes, carries SD's
    own schedule over as ``SchedulerClass.from_config(pipe.scheduler.config)`` does, and never
    clips latents (DPM-Solver++'s thresholding is off when the backbone says clip_sample false)."""
    root, common, pipe = sd_store
    card = sample(root, common, "composition=average", "shards=[0,1]", f"sampler={sampler}",
                  f"name={sampler}")  # fmt: skip
    images = np.load(Path(card["path"]) / "samples.npz")["images"]
    assert images.shape == (3, 3, 16, 16) and images.dtype == np.uint8

    from cdm.jobs.pipeline import build_sampler

    cfg = compose_config("sample", [*common, f"sampler={sampler}"])
    schedule = OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
    ours = build_sampler(cfg.sampler, schedule)
    theirs = type(ours).from_config(pipe.scheduler.config)  # diffusers' way to swap a scheduler
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    assert not ours.config.get("clip_sample", False) and not ours.config.get("thresholding", False)
    if sampler == "dpm++":  # pixel backbones keep x_0 clipped to [-1, 1] (tests/test_samplers.py)
        pixels = compose_config("sample", ["experiment=digits_4split", "sampler=dpm++"])
        kept = build_sampler(pixels.sampler, pixels.backbone.scheduler)
        assert kept.config.thresholding and kept.config.sample_max_value == 1.0


def test_the_classifier_router_trains_on_the_latents_it_routes(sd_store):
    """Item 2: at sampling the router sees latents x_t [4, 8, 8]; it was built for and trained on
    pixels [3, 16, 16] and failed there. Now it is trained on the codec's latents, noised."""
    root, common, _ = sd_store
    run_inprocess(*common, "stage=router", artifacts=root)
    stored = root / "experiments" / EXP / "router"
    config = json.loads((stored / "router_config.json").read_text())
    assert (config["channels"], config["resolution"]) == (4, 8)
    card = sample(root, common, "composition=classifier", "shards=[0,1]", "name=routed")
    weights = np.load(Path(card["path"]) / "trace.npz")["weights"]
    assert weights.shape == (3, 2, 2) and np.allclose(weights.sum(-1), 1.0)
    assert "router" in [p["kind"] for p in card["parents"]]


def test_knn_embeds_the_decoded_x0_hat_and_the_feature_net_stays_on_pixels(sd_store):
    """Item 2: stage=knn and stage=feature_net embed clean *pixels* (what a sample is once decoded,
    what FD and the TIFA-domain VQA see), which is right; the k-NN router fed them the latent
    x0-hat (clamped to [-1, 1] as if it were pixels). Now x0-hat is decoded by the VAE first."""
    from cdm.jobs.pipeline import CDMPipeline

    root, common, _ = sd_store
    run_inprocess(*common, "stage=feature_net", artifacts=root)
    run_inprocess(*common, "stage=knn", artifacts=root)  # text data: the domain embedder
    net = json.loads(next((root / "feature_nets").glob("*/card.json")).read_text())
    assert (net["channels"], net["resolution"]) == (3, 16)  # pixels, never latents
    card = sample(root, common, "composition=knn", "shards=[0,1]", "name=knn")
    weights = np.load(Path(card["path"]) / "trace.npz")["weights"]
    assert weights.shape == (3, 2, 2) and np.allclose(weights.sum(-1), 1.0)
    assert "feature_net" in json.dumps(card["parents"])

    pipe = CDMPipeline.from_store(root, EXP, composition="knn", shards=[0, 1], overrides=common[1:])
    router = pipe.denoiser.router
    seen = []
    router.embedder.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    logits = router(x_t, torch.tensor([500, 500]))
    assert logits.shape == (2, 2) and seen[0].shape == (2, 3, 16, 16)  # decoded to pixels
    assert seen[0].abs().max() <= 1.0


def test_prompt_labels_add_captions_after_the_pipelines_own(sd_store):
    """What the service uses for a request's prompts: the captions' rows follow the pipeline's
    table (its own prompts keep their labels, the null caption stays last) and draw exactly what
    a pipeline whose prompts are those captions draws."""
    from cdm.jobs.pipeline import CDMPipeline
    from cdm.models.text import conditioned_unets, contexts_of

    root, common, _ = sd_store
    pipe = CDMPipeline.from_store(root, EXP, composition="average", shards=[0, 1],
                                  overrides=common[1:])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    unet = conditioned_unets(pipe.denoiser.model)[0]
    own = contexts_of(unet).clone()
    n = len(pipe.prompts)
    rows = pipe.prompt_labels(["a red 7", "two blue bags"])
    assert rows.tolist() == [n, n + 1] and pipe.denoiser.null_label == n + 2
    table = contexts_of(unet)
    torch.testing.assert_close(table[:n], own[:-1], rtol=0, atol=0)
    torch.testing.assert_close(table[-1], own[-1], rtol=0, atol=0)  # the null caption
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def draw(labels: torch.Tensor) -> torch.Tensor:
        out = pipe(batch_size=2, class_labels=labels, num_inference_steps=2, latents=x_T,
                   generator=torch.Generator().manual_seed(1), output_type="latent")  # fmt: skip
        return out.images

    appended = draw(rows)
    pipe.set_prompts(["a red 7", "two blue bags"])
    torch.testing.assert_close(draw(torch.arange(2)), appended, rtol=0, atol=0)


# ----------------------------------------------------------------------------- configs


def test_knn_defaults_to_the_domain_embedder_for_text_data_only():
    """Item 3: text data (data.conditioning=text) default to the domain feature net; every other
    dataset keeps pixels, with the same config and identity as before (Table 1 does not move)."""
    for overrides in (
        [f"experiment={EXP}", "stage=knn"],
        ["data=captioned_folder", "data.root=/nowhere", "stage=knn"],
    ):
        cfg = compose_config("train", overrides)
        assert cfg.knn.name == "feature_net"
        assert cfg.knn.embedder._target_ == "cdm.models.knn_router.FeatureNetEmbedder"
    text = compose_config("sample", [f"experiment={EXP}", "composition=knn"])
    assert text.knn.name == "feature_net"
    chosen = compose_config("train", [f"experiment={EXP}", "stage=knn", "knn=clip",
                                      "knn.embedder.path=/clip"])  # fmt: skip
    assert chosen.knn.name == "clip"  # an explicit choice wins
    for experiment in ("digits_4split", "fashion_2split"):
        default = compose_config("train", [f"experiment={experiment}", "stage=knn"])
        pixels = compose_config("train", [f"experiment={experiment}", "stage=knn", "knn=pixels"])
        plain = [OmegaConf.to_container(c, resolve=True) for c in (default, pixels)]
        assert plain[0]["knn"] == plain[1]["knn"] and plain[0]["knn"]["name"] == "pixels"
        for stage in ("knn", "sample"):
            assert job_identity(plain[0], stage).hash == job_identity(plain[1], stage).hash


def test_a_prompts_file_enters_the_sample_identity_by_its_captions(tmp_path):
    """Item 4: two files with the same captions are one sample job, whatever their names and
    blank lines; editing a file makes another."""

    def identity(path: Path) -> str:
        cfg = compose_config("sample", [*TINY_TEXT, f"prompts={path}"])
        return job_identity(OmegaConf.to_container(cfg, resolve=True), "sample").hash

    first, second = tmp_path / "mine.txt", tmp_path / "copy" / "other-name.txt"
    second.parent.mkdir()
    first.write_text("two red 7s on the left\na blue 3 at the top\n")
    second.write_text("two red 7s on the left\n\n  a blue 3 at the top  \n")
    before = identity(first)
    assert identity(second) == before
    first.write_text("two red 7s on the left\na green 3 at the top\n")
    assert identity(first) != before


# ----------------------------------------------------------------------------- text lifecycle


@pytest.fixture(scope="module")
def text_store(tmp_path_factory) -> Path:
    """A tiny text_conditional experiment: backbone and shards 0 and 1 (3 SISA slices each)."""
    root = tmp_path_factory.mktemp("text-store")
    run_inprocess(*TINY_TEXT, "stage=backbone", artifacts=root)
    for k in (0, 1):
        run_inprocess(*TINY_TEXT, "stage=shard", f"shard.index={k}", artifacts=root)
    return root


@pytest.mark.slow
def test_forgetting_a_caption_sample_equals_training_from_scratch(text_store, tmp_path):
    """Item 5a: cdm-forget of samples in slices 1 and 2 of shard 0 of a text model retrains it
    from its slice-0 checkpoint; cdm-verify retrains it from scratch on the certified ids in a
    fresh store and every weight hash matches (tests/test_verify.py's check, on captions)."""
    from cdm.lifecycle.forget import run_forget
    from cdm.lifecycle.verify import run_verify

    root = tmp_path / "store"
    shutil.copytree(text_store, root)
    before = ArtifactStore(root).read_adapter_card(EXP, "shard-00")["weights_sha256"]
    shard0 = Manifest.from_json(ArtifactStore(root).load_manifest(EXP, "shard-00"))
    ids = [*shard0.slice_ids(1)[:2], shard0.slice_ids(2)[0]]
    cfg = compose_config("forget", [f"experiment={EXP}", f"forget.ids=[{','.join(ids)}]",
                                    f"paths.artifacts={root}"])  # fmt: skip
    cert = run_forget(cfg)
    retrained = cert["retrained"][0]
    assert retrained["restarted_from"]["kind"] == "slice_checkpoint"
    assert retrained["new_weights_sha256"] != before
    assert not set(ids) & set(ArtifactStore(root).load_manifest(EXP, "shard-00")["ids"])
    cfg = compose_config("verify", [f"verify.certificate={cert['path']}",
                                    f"paths.artifacts={tmp_path / 'fresh'}"])  # fmt: skip
    report = run_verify(cfg)
    assert report["all_match"], report["results"]
    assert [r["artifact"] for r in report["results"]][1:] == ["adapter shard-00"]
    assert report["results"][1]["actual"] == retrained["new_weights_sha256"]


def request_prompts(body: dict):
    """A request's checked fields (``cdm.lifecycle.service.parse_request``) on a text or a class
    model's settings; raises its ``RequestError``."""
    from cdm.lifecycle.service import Limits, ServiceSettings, parse_request

    def settings(text: bool) -> ServiceSettings:
        limits = Limits(8, 8, 4096, ("ddim",), ("average",), max_prompt_chars=40)
        defaults = {"experiment": EXP, "sources": None, "composition": "average",
                    "sampler": "ddim", "steps": 4, "num_samples": 4, "seed": 0, "format": "png",
                    "prompts": None}  # fmt: skip
        return ServiceSettings(EXP, "/store", "/policy", limits, defaults, text=text)

    text = body.pop("_text", True)
    return parse_request(json.dumps(body).encode(), settings(text))


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"prompts": "a red 7"}, 400, "list of captions"),
        ({"prompts": []}, 400, "list of captions"),
        ({"prompts": ["a red 7", 7]}, 400, "list of captions"),
        ({"prompts": ["a red 7"] * 9}, 422, "serve.limits.max_samples"),
        ({"prompts": ["x" * 41]}, 422, "serve.limits.max_prompt_chars"),
        ({"prompts": ["   "]}, 422, "serve.limits.max_prompt_chars"),
        ({"prompts": ["a red 7"], "_text": False}, 422, "not conditioned on captions"),
    ],
)
def test_request_prompts_are_validated_and_limited(body, status, reason):
    from cdm.lifecycle.service import RequestError

    with pytest.raises(RequestError) as err:
        request_prompts(dict(body))
    assert err.value.status == status and reason in str(err.value) and "\n" not in str(err.value)
    assert request_prompts({"prompts": ["a red 7"]})["prompts"] == ["a red 7"]
    assert request_prompts({})["prompts"] is None


@pytest.mark.slow
def test_the_http_service_draws_a_requests_captions(text_store, tmp_path):
    """Item 5b: ``"prompts"`` in a request to cdm-serve's HTTP service: the samples of those
    captions (cycled), the same images cdm-sample draws with ``prompts=`` and the same seed;
    a request without prompts keeps the test captions."""
    from benchmarks.serve_load import running_service
    from cdm.lifecycle.serving import add_user

    policy = tmp_path / "policy.yaml"
    token = add_user(policy, "bob", ["shard-00", "shard-01"])  # the shards trained here
    served = ["composition=average", "serve.limits.samplers=[ddim]", "serve.limits.compositions=[average]",
              "serve.limits.max_samples=4", "serve.limits.max_steps=4", "steps=4",
              "num_samples=3", "progress=false"]  # fmt: skip
    args = [*TINY_TEXT, *served, f"serve.policy={policy}", f"paths.artifacts={text_store}",
            f"hydra.run.dir={tmp_path}/hydra"]  # fmt: skip
    captions = ["two red 7s on the left", "a purple unicorn"]
    headers = {"Authorization": f"Bearer {token}"}
    with running_service(args, tmp_path / "server.log") as url:
        client = httpx.Client(timeout=300)
        answer = client.post(url + "/sample", headers=headers, content=json.dumps(
            {"prompts": captions, "format": "npz", "num_samples": 3, "seed": 0}).encode())  # fmt: skip
        plain = client.post(url + "/sample", headers=headers,
                            content=json.dumps({"format": "npz", "num_samples": 3}).encode())  # fmt: skip
        long = client.post(url + "/sample", headers=headers,
                           content=json.dumps({"prompts": ["x" * 201]}).encode())  # fmt: skip
    assert answer.status_code == 200, answer.text
    with np.load(io.BytesIO(answer.content)) as data:
        got = dict(data)
    assert got["captions"].tolist() == [captions[0], captions[1], captions[0]]
    assert got["images"].shape == (3, 3, 32, 32) and got["shards"].tolist() == [0, 1]
    card = sample(text_store, TINY_TEXT, "composition=average", "shards=[0,1]", "name=http-prompts",
                  f"prompts=['{captions[0]}','{captions[1]}']", steps=4)  # fmt: skip
    with np.load(Path(card["path"]) / "samples.npz") as stored:
        np.testing.assert_array_equal(got["images"], stored["images"])
    assert plain.status_code == 200, plain.text
    with np.load(io.BytesIO(plain.content)) as data:
        default = data["captions"].tolist()
    data = load_captioned(n_train=120, n_test=24, kinds=["digits"])
    tests = [c for c, split in zip(data.captions, data.splits, strict=True) if split == "test"]
    assert default == tests[:3]  # without prompts: the test captions in order
    assert long.status_code == 422 and "max_prompt_chars" in long.json()["detail"]


def test_compartmental_heads_train_and_route_on_the_codecs_latents(sd_store):
    """Heads with a codec: built for pixels [3, 16, 16] with pixel negatives while the positives
    and the sampler's x_t are latents [4, 8, 8]. Now head, negatives and held-out pairs are all
    latents, and composition=compartmental samples."""
    root, common, _ = sd_store
    rule = [f"router.convergence.{k}={v}" for k, v in
            dict(min_steps=0, max_steps=20, patience=1, min_improvement=1.0).items()]  # fmt: skip
    for k in (0, 1):
        run_inprocess(*common, "stage=head", "router=compartmental", f"shard.index={k}", *rule,
                      artifacts=root)  # fmt: skip
    heads = sorted((root / "experiments" / EXP / "heads").glob("shard-*/router_config.json"))
    assert len(heads) == 2
    for path in heads:
        config = json.loads(path.read_text())
        assert (config["channels"], config["resolution"]) == (4, 8)
    card = sample(root, common, "composition=compartmental", "shards=[0,1]", "name=heads")
    weights = np.load(Path(card["path"]) / "trace.npz")["weights"]
    assert weights.shape == (3, 2, 2) and np.allclose(weights.sum(-1), 1.0)
