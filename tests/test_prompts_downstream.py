"""The transformer family downstream: the router on DiT features (``router=dit_head``, paper:
"a linear layer plus an attention block on intermediate U-ViT features"), the compartmental
heads on the same features, and cdm-sample (k-NN too), cdm-add-source, cdm-forget, cdm-serve
and cdm-attribute on a dit_tiny + deep_prompt experiment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdm.models.backbone import build_unet, null_label, predict_epsilon
from cdm.models.compartmental import CompartmentalRouter
from cdm.models.prompts import PROMPTS_FILE, MultiShardPrompt
from cdm.models.router import BackboneHeadRouter, backbone_tokens, build_router, dit_block_features
from cdm.store import ArtifactStore, read_card, sha256_file
from tests.conftest import TINY_ATTN_UNET, run_cli, run_inprocess
from tests.test_sources import new_source

EXP = "digits_4split"
DIT = [f"experiment={EXP}", "debug=tiny", "backbone=dit_tiny", "sharding.n_shards=3",
       "sharding.n_slices=2"]  # fmt: skip
PROMPTS = [*DIT, "adapter=deep_prompt"]  # shard, sample, forget, add-source, serve
SAMPLES = ["num_samples=4", "batch_size=4", "steps=2", "progress=false"]
HEAD = {"_target_": "cdm.models.router.BackboneHeadRouter", "dim": 16, "heads": 2,
        "time_embed_dim": 16}  # fmt: skip


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}
    dit = build_unet("dit", spec, sample_size=8, channels=1, num_classes=10).eval()
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: make them matter
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


def inputs(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)


# ---- the features and the head, on a DiT -------------------------------------------------------


def test_dit_block_features_are_the_blocks_own_output_and_stop_the_forward():
    dit = tiny_dit()
    x, t = inputs()
    seen, ran = {}, []
    dit.transformer_blocks[1].register_forward_hook(lambda m, i, o: seen.update(out=o))
    dit.transformer_blocks[2].register_forward_hook(lambda m, i, o: ran.append(2))
    hooks = len(dit.transformer_blocks[1]._forward_hooks)
    labels = torch.full((6,), null_label(dit))
    with torch.no_grad():
        predict_epsilon(dit, x, t, labels)
        reference = seen["out"]
        ran.clear()
        ours = dit_block_features(dit, x, t)  # null label; default block: 3 // 2 = 1
        other = dit_block_features(dit, x, t, torch.arange(6))
    assert ours.shape == (6, 16, 16) and torch.equal(ours, reference)  # bit for bit
    assert ran == []  # block 2 never ran
    assert not torch.equal(ours, other)  # the class reaches the block through adaLN
    assert len(dit.transformer_blocks[1]._forward_hooks) == hooks  # its hook is removed again
    with pytest.raises(ValueError, match=r"block=3 but the backbone has 3 .*0\.\.2"):
        dit_block_features(dit, x, t, block=3)


def test_a_unet_refuses_a_transformer_block_with_the_fix():
    unet = build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10)
    x, t = inputs()
    assert backbone_tokens(unet, x, t).shape == (6, 16, 32)  # the 4x4 mid block as tokens
    with pytest.raises(ValueError, match="router.model.block=null"):
        backbone_tokens(unet, x, t, block=0)


def test_dit_head_router_trains_and_never_touches_the_backbone():
    dit = tiny_dit()
    dit.requires_grad_(True).train()  # the router must freeze it itself
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    router = build_router({"model": {**HEAD, "block": 0}}, n_shards=3, channels=1, resolution=8,
                          backbone=dit)  # fmt: skip
    assert isinstance(router, BackboneHeadRouter) and router.pos.shape == (1, 16, 16)
    assert not dit.training and not any(p.requires_grad for p in dit.parameters())
    assert not any(k.startswith("backbone") for k in router.state_dict())
    x, t = inputs()
    optim = torch.optim.AdamW(router.train().parameters(), lr=1e-2)
    first = router(x, t).detach()
    for _ in range(3):
        optim.zero_grad()
        torch.nn.functional.cross_entropy(router(x, t), torch.arange(6) % 3).backward()
        optim.step()
    assert not torch.equal(router(x, t), first)  # the head trained
    assert all(p.grad is None for p in dit.parameters())
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_compartmental_heads_on_one_dit_share_its_features_only_at_one_block():
    dit = tiny_dit()
    x, t = inputs()
    y = torch.arange(6) % 10
    spec = {**HEAD, "num_classes": 10}
    torch.manual_seed(0)
    same = [build_router({"model": spec}, n_shards=1, channels=1, resolution=8, backbone=dit)
            for _ in range(2)]  # fmt: skip
    other = build_router({"model": {**spec, "block": 0}}, n_shards=1, channels=1, resolution=8,
                         backbone=dit)  # fmt: skip
    for heads in (same, [*same, other]):
        with torch.no_grad():
            joint = CompartmentalRouter(heads)(x, t, y)
            alone = torch.stack([h(x, t, y)[:, 0] for h in heads], 1)
        torch.testing.assert_close(joint, alone, atol=1e-6, rtol=0)
    assert CompartmentalRouter(same)._shared_backbone() is dit
    assert CompartmentalRouter([*same, other])._shared_backbone() is None


# ---- the CLI on a dit_tiny + deep_prompt experiment --------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny 3-shard digits CDM on a DiT with deep prompts: backbone, prompts, a dit_head
    router trained by cdm-train (a fresh process, as a user runs it), and one head per shard."""
    root = tmp_path_factory.mktemp("dit-downstream")
    run_inprocess(*DIT, "stage=backbone", artifacts=root)
    for k in range(3):
        run_inprocess(*PROMPTS, "stage=shard", f"shard.index={k}", artifacts=root)
    (backbone_dir,) = (root / "backbones").iterdir()
    weights = {p.name: sha256_file(p) for p in sorted(backbone_dir.glob("*.safetensors"))}
    run_cli(*DIT, "stage=router", "router=dit_head", "router.epochs=1", artifacts=root)
    for k in range(3):
        run_inprocess(
            *DIT, "stage=head", "router=compartmental", f"shard.index={k}", artifacts=root
        )
    assert weights and weights == {  # router and heads trained: the backbone is bit-identical
        p.name: sha256_file(p) for p in sorted(backbone_dir.glob("*.safetensors"))
    }
    return root


@pytest.fixture
def root(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "artifacts"))


def test_dit_head_router_from_the_cli_and_classifier_sampling_with_prompts(trained):
    store = ArtifactStore(trained)
    card = read_card(store.router_dir(EXP))
    assert card["arch"] == "cdm.models.router.BackboneHeadRouter"
    assert card["config"]["router"]["model"]["block"] is None and card["n_shards"] == 3
    backbone_hash = store.read_adapter_card(EXP, "shard-00")["backbone_hash"]
    assert card["backbone_hash"] == backbone_hash
    assert all(store.read_head_card(EXP, f"shard-0{k}")["backbone_hash"] == backbone_hash
               for k in range(3))  # fmt: skip
    from cdm.jobs.pipeline import CDMPipeline

    pipe = CDMPipeline.from_store(trained, EXP, composition="classifier", overrides=PROMPTS[1:])
    assert isinstance(pipe.model, MultiShardPrompt) and pipe.model.n_shards == 3
    samples = run_inprocess(*PROMPTS, *SAMPLES, "composition=classifier", artifacts=trained,
                            config="sample")  # fmt: skip
    assert {p["kind"] for p in samples["parents"]} == {"backbone", "adapter", "router"}
    weights = np.load(Path(samples["path"]) / "trace.npz")["weights"]
    assert weights.shape[-1] == 3 and np.allclose(weights.sum(-1), 1, atol=1e-5)
    assert weights.std() > 0  # the router's weights depend on x_t


@pytest.mark.parametrize(
    "composition", ["composition=compartmental", "composition=classifier +router=compartmental"]
)
def test_compartmental_heads_on_dit_features_route_the_prompted_shards(trained, composition):
    name = composition.split()[-1].replace("+router=", "heads-").replace("composition=", "")
    samples = run_inprocess(*PROMPTS, *SAMPLES, *composition.split(), f"name={name}",
                            artifacts=trained, config="sample")  # fmt: skip
    heads = [p["name"] for p in samples["parents"] if p["kind"] == "head"]
    assert heads == ["shard-00", "shard-01", "shard-02"]
    weights = np.load(Path(samples["path"]) / "trace.npz")["weights"]
    assert weights.shape[-1] == 3 and np.allclose(weights.sum(-1), 1, atol=1e-5)


def prompt_hashes(root: Path) -> dict[str, str]:
    shards = ArtifactStore(root).experiment_dir(EXP) / "shards"
    return {p.name: sha256_file(p / PROMPTS_FILE) for p in sorted(shards.glob("shard-*"))}


def compose_and_run(config: str, root: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.lifecycle.add_source import run_add_source
    from cdm.lifecycle.forget import run_forget

    register_resolvers()
    every = [*PROMPTS, *overrides, f"paths.artifacts={root}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config, overrides=every)
        return run_forget(cfg) if config == "forget" else run_add_source(cfg, every)


def test_add_source_then_forget_source_with_deep_prompts(root, tmp_path):
    before = prompt_hashes(root)
    record = compose_and_run(
        "add_source", root, "source.name=batch5", f"source.path={new_source(tmp_path / 'b.npz')}",
        "add.num_samples=4", "add.steps=2",
    )  # fmt: skip
    assert record["job"] == "shard-03" and record["head_weights_sha256"]  # its own head
    after = prompt_hashes(root)
    assert {k: after[k] for k in before} == before and set(after) == {*before, "shard-03"}
    store = ArtifactStore(root)
    assert read_card(store.adapter_dir(EXP, "shard-03"))["adapter_kind"] == "deep_prompt"
    (router,) = record["routers"]  # the dit_head router, retrained on 4 shards
    assert router["new_weights_sha256"] != router["old_weights_sha256"]
    assert record["samples"]["composition"] == "compartmental"
    assert record["samples"]["shards"] == [0, 1, 2, 3]
    cert = compose_and_run("forget", root, "forget.source=batch5", "forget.retrain_router=false")
    assert not (store.experiment_dir(EXP) / "shards" / "shard-03").exists()
    assert prompt_hashes(root) == before  # the others' prompts byte-identical
    assert any(d["artifact"] == "source data batch5" for d in cert["deleted"])


def test_forgetting_a_prompted_shard_keeps_the_others_and_sampling_works(root):
    before = prompt_hashes(root)
    compose_and_run("forget", root, "forget.source=1", "forget.retrain_router=true")
    after = prompt_hashes(root)
    assert set(after) == {"shard-00", "shard-02"}
    assert after == {k: before[k] for k in after}
    args = [*PROMPTS, *SAMPLES, "composition=classifier", "name=after"]
    samples = run_inprocess(*args, artifacts=root, config="sample")
    adapters = [p["name"] for p in samples["parents"] if p["kind"] == "adapter"]
    assert adapters == ["shard-00", "shard-02"]


def test_cdm_serve_once_with_deep_prompts(root, tmp_path):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.lifecycle.serving import AccessDenied, serve

    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"users": {"alice": ["shard-01"], "bob": ["*"]}}))
    register_resolvers()

    def request(user: str, sources, *overrides: str) -> dict:
        args = [
            *PROMPTS,
            *SAMPLES,
            "serve.once=true",
            f"serve.user={user}",
            f"serve.policy={policy}",
        ]
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("serve", overrides=[*args, *overrides, f"paths.artifacts={root}"])
        return serve(cfg, user, sources)

    card = request("alice", None, "composition=average")
    assert [p["name"] for p in card["parents"] if p["kind"] == "adapter"] == ["shard-01"]
    card = request("alice", None, "composition=classifier", "+router=compartmental", "name=heads")
    assert [p["name"] for p in card["parents"] if p["kind"] == "head"] == ["shard-01"]
    card = request("bob", ["shard-00", "shard-02"], "composition=classifier", "name=bob")
    assert [p["name"] for p in card["parents"] if p["kind"] == "adapter"] == [
        "shard-00", "shard-02"]  # fmt: skip
    with pytest.raises(AccessDenied):
        request("alice", ["shard-00"], "composition=average", "name=refused")


def test_knn_centroids_then_knn_composition_with_deep_prompts(root):
    """stage=knn on the prompted experiment, then cdm-sample composition=knn: the k-NN weights
    (softmax over distances of the predicted x_0 to each shard's centroids) mix the prompts."""
    cards = run_inprocess(*DIT, "stage=knn", artifacts=root)
    assert [c["name"] for c in cards] == ["shard-00", "shard-01", "shard-02"]
    samples = run_inprocess(*PROMPTS, *SAMPLES, "composition=knn", artifacts=root,
                            config="sample")  # fmt: skip
    parents = {(p["kind"], p["name"]): p["hash"] for p in samples["parents"]}
    hashes = prompt_hashes(root)
    assert {k: parents[("adapter", k)] for k in hashes} == hashes  # the stored prompts
    assert {n for kind, n in parents if kind == "knn_centroids"} == {
        f"pixels/shard-0{k}" for k in range(3)
    }
    weights = np.load(Path(samples["path"]) / "trace.npz")["weights"]
    assert weights.shape[-1] == 3 and np.allclose(weights.sum(-1), 1, atol=1e-5)
    assert weights.std() > 0  # the weights depend on x_t
    images = np.load(Path(samples["path"]) / "samples.npz")["images"]
    assert images.shape[0] == 4 and np.isfinite(images).all()


def test_cdm_attribute_exact_shapley_and_eq6_credit_with_deep_prompts(root):
    """cdm-attribute on prompted shards: exact Shapley of the mean router weight (v(S) samples
    the coalition S only, v({}) the safe backbone) and paper eq. 6 credit on the same path."""
    from hydra import compose, initialize_config_dir

    from cdm.attribution.composition import run_attribution
    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    overrides = [*PROMPTS, "num_samples=4", "batch_size=4", "steps=2",
                 "attribution.credit_samples=2", "attribution/property=router_weight",
                 f"paths.artifacts={root}"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        card = run_attribution(compose(config_name="attribute", overrides=overrides))
    assert {p["name"]: p["hash"] for p in card["parents"] if p["kind"] == "adapter"} == (
        prompt_hashes(root)
    )
    values = json.loads((Path(card["path"]) / "values.json").read_text())
    assert values["players"] == ["shard-00", "shard-01", "shard-02"]
    assert len(values["coalitions"]) == 2**3 and values["v_empty"] == 0.0
    shapley = values["shapley"]["values"]
    assert sum(shapley.values()) == pytest.approx(values["v_all"] - values["v_empty"], abs=1e-9)
    credit = np.array(values["eq6"]["credit_per_step"])
    assert credit.shape == (2, 3) and np.allclose(credit.sum(1), 1.0)
    assert np.array(values["eq6"]["per_sample"]).shape == (2, 3)
