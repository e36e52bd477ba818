"""The compartmentalized router (issue 12, section 1): one head per shard, shard vs safe data.

1. exactness: exact log-density ratios to a reference give the exact mixture score (Prop. 3.1);
2. trained tiny heads on a 1-D toy mixture give a posterior close to the exact one (KL per band);
3. on tiny digits: stage=head per shard, isolation, composition, and forgetting retrains exactly
   one adapter and one head (bit-identical to a from-scratch head) and no router.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from cdm.core.composition import mix_epsilons, router_posterior
from cdm.data.manifest import Manifest
from cdm.models.backbone import build_scheduler
from cdm.models.compartmental import CompartmentalRouter
from cdm.models.router import timestep_embedding
from cdm.store import ArtifactStore, CorruptArtifactError, StaleArtifactError, sha256_file
from cdm.store.records import add_forgotten_ids
from cdm.training.heads import HeadTraining
from tests.conftest import run_inprocess

# ------------------------------------------------------------------------ 1. exactness


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, var I) for x [B, d], mean [d], var scalar (float64)."""
    d = x.shape[1]
    return -0.5 * (((x - mean) ** 2).sum(1) / var + d * torch.log(2 * math.pi * var))


@pytest.mark.parametrize("abar", [0.999, 0.5, 0.02])
def test_exact_log_ratios_give_the_exact_mixture_score(abar):
    """softmax(log p_t^i - log p_t^safe + log lambda) mixes the shard scores into the exact score
    of sum_i lambda_i p_t^i (Prop. 3.1): the reference density cancels."""
    torch.manual_seed(0)
    d, n = 3, 4
    abar = torch.tensor(abar, dtype=torch.float64)
    means = torch.randn(n, d, dtype=torch.float64) * 2
    stds = torch.rand(n, dtype=torch.float64) + 0.3
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    m_t, v_t = abar.sqrt() * means, abar * stds**2 + 1 - abar  # q(x_t): N(sqrt(abar) mu, ...)
    m_safe, v_safe = abar.sqrt() * torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64), 2.0 - abar
    x = torch.randn(64, d, dtype=torch.float64) * 2
    h = torch.stack(
        [gaussian_log_density(x, m_t[i], v_t[i]) - gaussian_log_density(x, m_safe, v_safe)
         for i in range(n)], dim=1,
    )  # fmt: skip
    w = router_posterior(h, torch.log(lam))
    scores = torch.stack([-(x - m_t[i]) / v_t[i] for i in range(n)])  # [n, B, d]
    composed = mix_epsilons(scores, w)

    xg = x.clone().requires_grad_(True)
    log_p = torch.logsumexp(
        torch.stack(
            [torch.log(lam[i]) + gaussian_log_density(xg, m_t[i], v_t[i]) for i in range(n)]
        ),
        dim=0,
    )
    (exact,) = torch.autograd.grad(log_p.sum(), xg)
    assert composed.dtype == torch.float64
    torch.testing.assert_close(composed, exact, rtol=0, atol=1e-10)


def test_class_conditional_log_ratios_give_the_exact_posterior():
    """h_i = log p^i(x|y) - log p^safe(x) with log P(z=i|y) = log(lambda_i p^i(y)) gives
    P(z = i | x, y) exactly (the model docstring's derivation)."""
    torch.manual_seed(1)
    n, classes, d = 3, 4, 2
    means = torch.randn(n, classes, d, dtype=torch.float64) * 2
    lam = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    class_share = torch.rand(n, classes, dtype=torch.float64)
    class_share[0, 3] = 0.0  # shard 0 holds no sample of class 3
    class_share = class_share / class_share.sum(1, keepdim=True)
    x = torch.randn(32, d, dtype=torch.float64)
    y = torch.arange(32) % classes
    one = torch.tensor(1.0, dtype=torch.float64)
    log_px_y = torch.stack([gaussian_log_density(x, means[i, y], one) for i in range(n)], dim=1)
    h = log_px_y - gaussian_log_density(x, torch.zeros(d, dtype=torch.float64), 4 * one)[:, None]
    log_prior_y = torch.log(lam[None, :] * class_share[:, y].t())  # [B, n], -inf off-shard
    w = router_posterior(h, log_prior_y)
    joint = lam[None, :] * class_share[:, y].t() * log_px_y.exp()
    torch.testing.assert_close(w, joint / joint.sum(1, keepdim=True), rtol=0, atol=1e-12)
    assert (w[y == 3, 0] == 0).all()


# ------------------------------------------------------------------ 2. trained toy heads


class ToyHead(torch.nn.Module):
    """h(x_t, t) -> [B, 1] for 1-D data: an MLP on x_t and a sinusoidal embedding of t."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(17, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
            torch.nn.Linear(64, 1),
        )  # fmt: skip

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t.flatten(1), timestep_embedding(timesteps, 16)], 1))


class Points(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i : i + 1], "label": torch.tensor(0), "index": torch.tensor(i)}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: more threads only contend
    yield
    torch.set_num_threads(threads)


def test_trained_heads_give_the_exact_posterior_on_a_toy_mixture(one_thread):
    """Two 1-D shards and a broad safe split: heads trained by HeadTraining's loss give
    softmax(h + log lambda) with a small KL to the exact posterior in every timestep band."""
    torch.manual_seed(0)
    alphas = build_scheduler(
        {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    ).alphas_cumprod.double()
    shards = [(-1.5, 0.4, 3000), (1.5, 0.6, 1000)]  # mean, std, size: lambda = 0.75, 0.25
    safe = torch.randn(4000) * 1.5
    data = torch.cat([safe, *[m + s * torch.randn(k) for m, s, k in shards]])
    dataset = Points(data)
    bounds = [0, 4000, 7000, 8000]
    heads = []
    for i in range(2):
        torch.manual_seed(i)
        module = HeadTraining(
            ToyHead(), alphas.float(), negatives=dataset, safe_indices=range(4000), head_config={},
            dataset_size=len(dataset), lr=5e-3, seed=i,
        )  # fmt: skip
        opt = torch.optim.Adam(module.head.parameters(), lr=5e-3)
        mine = torch.arange(bounds[i + 1], bounds[i + 2])
        for step in range(500):
            idx = mine[torch.randint(len(mine), (256,))]
            batch = {"image": data[idx][:, None], "label": torch.zeros(256, dtype=torch.long),
                     "index": idx}  # fmt: skip
            loss = module.head_loss(batch, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
        heads.append(module.head.eval())
    router = CompartmentalRouter(heads)
    lam = torch.tensor([k for *_, k in shards], dtype=torch.float64)
    lam = lam / lam.sum()
    kls = {}
    for lo, hi in [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]:
        t = torch.randint(lo, hi, (4000,))
        z = torch.multinomial(lam, 4000, replacement=True)
        m = torch.tensor([s[0] for s in shards], dtype=torch.float64)[z]
        sd = torch.tensor([s[1] for s in shards], dtype=torch.float64)[z]
        x0 = m + sd * torch.randn(4000, dtype=torch.float64)
        a = alphas[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(4000, dtype=torch.float64)
        exact_log = torch.stack(
            [torch.log(lam[j]) - 0.5 * (x_t - a.sqrt() * mj) ** 2 / (a * sj**2 + 1 - a)
             - 0.5 * torch.log(a * sj**2 + 1 - a) for j, (mj, sj, _) in enumerate(shards)], 1,
        )  # fmt: skip
        exact = torch.softmax(exact_log, 1)
        with torch.no_grad():
            w = router_posterior(
                router(x_t[:, None, None, None].float(), t).double(), torch.log(lam)
            )
        kls[f"t{lo}-{hi - 1}"] = float(
            (exact * (exact.log() - w.clamp_min(1e-12).log())).sum(1).mean()
        )
    print("KL(exact || heads) per band:", {k: round(v, 4) for k, v in kls.items()})
    assert all(v < 0.02 for v in kls.values()), kls


# ------------------------------------------------------------------ 3. tiny digits

EXP = "digits_2split"
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_slices=3"]
SAMPLE = ["num_samples=4", "steps=2", "progress=false"]
# the heads' stopping rule decides past the last slice (no check improves by 100%: patience)
HEAD_RULE = [f"router.convergence.{k}={v}" for k, v in
             dict(min_steps=0, max_steps=60, patience=2, min_improvement=1.0).items()]  # fmt: skip


def head_sha(root: Path, shard: str) -> str:
    return sha256_file(ArtifactStore(root).head_dir(EXP, shard) / "router.safetensors")


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Backbone, both shards and both heads; the dataset indices read while training head 0."""
    from cdm.data.datasets import SampleDataset

    root = tmp_path_factory.mktemp("heads")
    for stage in ("backbone", "shard"):
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    run_inprocess(*TINY, "stage=shard", "shard.index=1", artifacts=root)
    read: set[int] = set()
    original = SampleDataset.__getitem__

    def recording(self, i):
        read.add(int(i))
        return original(self, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SampleDataset, "__getitem__", recording)
        card = run_inprocess(*TINY, *HEAD_RULE, "stage=head", artifacts=root)
    run_inprocess(*TINY, *HEAD_RULE, "stage=head", "shard.index=1", artifacts=root)
    return root, card, read


@pytest.fixture
def root(heads, tmp_path) -> Path:
    return Path(shutil.copytree(heads[0], tmp_path / "artifacts"))


def test_a_head_trains_on_its_shard_and_the_safe_split_only(heads):
    from cdm.data.loaders import load_digits_dataset

    root, card, read = heads
    store = ArtifactStore(root)
    shard0, shard1, safe = (Manifest.from_json(store.load_manifest(EXP, n))
                            for n in ("shard-00", "shard-01", "safe"))  # fmt: skip
    digits = load_digits_dataset()
    ids = digits.ids
    seen = {ids[i] for i in read if digits.splits[i] == "train"}
    assert set(shard0.ids) <= seen  # every positive was fed ...
    assert seen <= set(shard0.ids) | set(safe.ids)  # ... and nothing but shard 0 and safe data
    assert not seen & set(shard1.ids)
    heldout = {ids[i] for i in read if digits.splits[i] != "train"}  # the stopping rule's pairs
    assert {digits.splits[i] for i in read} == {"train", "test"} and heldout
    assert not heldout & (set(shard0.ids) | set(shard1.ids) | set(safe.ids))
    assert card["convergence"]["stopped_by"] == "patience" and card["convergence"]["checks"] == 3
    assert card["metrics"]["epochs"] == 3 + 2  # 3 slices x 1 epoch, then the rule's 2 more
    assert card["kind"] == "head" and card["name"] == "shard-00" and card["shard_index"] == 0
    assert card["manifest_hash"] == shard0.hash  # the ids fed, checked by the ArtifactWriter
    assert card["parents"][0]["kind"] == "backbone"
    assert card["weights_sha256"] == head_sha(root, "shard-00")
    assert (store.checkpoint_dir(EXP, "head-shard-00") / "slice-02.ckpt").is_file()
    assert head_sha(root, "shard-00") != head_sha(root, "shard-01")


def test_composition_reads_only_the_composed_heads(root):
    store = ArtifactStore(root)
    card = run_inprocess(*TINY, *SAMPLE, "composition=compartmental", "shards=[1]",
                         artifacts=root, config="sample")  # fmt: skip
    assert [p["name"] for p in card["parents"] if p["kind"] == "head"] == ["shard-01"]
    both = run_inprocess(*TINY, *SAMPLE, "composition=classifier", "+router=compartmental",
                         "name=heads", artifacts=root, config="sample")  # fmt: skip
    assert [p["name"] for p in both["parents"] if p["kind"] == "head"] == ["shard-00", "shard-01"]
    weights = store.head_dir(EXP, "shard-00") / "router.safetensors"
    weights.write_bytes(b"corrupt" + weights.read_bytes())
    run_inprocess(*TINY, *SAMPLE, "composition=compartmental", "shards=[1]", "name=again",
                  artifacts=root, config="sample")  # fmt: skip  # head 0 is never read
    with pytest.raises(CorruptArtifactError):
        run_inprocess(*TINY, *SAMPLE, "composition=compartmental", "name=all",
                      artifacts=root, config="sample")  # fmt: skip


def forget(root: Path, *overrides: str) -> dict:
    """Run cdm-forget's library entry point in this process."""
    return run_inprocess(f"experiment={EXP}", *overrides, artifacts=root, config="forget")


def test_forgetting_a_sample_retrains_one_adapter_and_one_head(root, tmp_path):
    store = ArtifactStore(root)
    shard0 = Manifest.from_json(store.load_manifest(EXP, "shard-00"))
    ids = [shard0.slice_ids(1)[0]]
    head1 = head_sha(root, "shard-01")
    cert = forget(root, f"forget.ids=[{ids[0]}]")

    assert [r["artifact"] for r in cert["retrained"]] == ["adapter shard-00", "head shard-00"]
    head = cert["retrained"][1]
    assert (
        head["restarted_from"]["kind"] == "slice_checkpoint"
        and head["restarted_from"]["slice"] == 0
    )
    assert head["restarted_from"]["path"].endswith("checkpoints/head-shard-00/slice-00.ckpt")
    assert cert["routers"] == []  # no joint router anywhere in this path
    assert head_sha(root, "shard-00") == head["new_weights_sha256"] != head["old_weights_sha256"]
    assert head_sha(root, "shard-01") == head1
    assert (
        store.load_head(EXP, "shard-00")[2]["manifest_hash"]
        == store.load_manifest(EXP, "shard-00")["hash"]
    )

    fresh = tmp_path / "fresh"  # the same head trained from scratch without the id
    shutil.copytree(root / "backbones", fresh / "backbones")
    add_forgotten_ids(ArtifactStore(fresh), EXP, ids, "reference")
    run_inprocess(*TINY, *HEAD_RULE, "stage=head", artifacts=fresh)
    assert head_sha(fresh, "shard-00") == head_sha(root, "shard-00")  # the same rule, same stop


def test_a_head_is_stale_when_its_manifest_changes_and_leaves_with_its_source(root):
    store = ArtifactStore(root)
    cert = forget(root, "forget.source=0")
    deleted = {d["artifact"] for d in cert["deleted"]}
    assert {"adapter shard-00", "head shard-00", "checkpoints head-shard-00"} <= deleted
    assert not store.head_dir(EXP, "shard-00").exists()
    assert store.has_head(EXP, "shard-01")
    manifest = store.load_manifest(EXP, "shard-01")
    manifest["hash"] = "0" * 64  # as if shard 1's data changed behind the head's back
    store.save_manifest(EXP, manifest)
    with pytest.raises(StaleArtifactError, match="stage=head shard.index=1"):
        store.load_head(EXP, "shard-01")


def test_adding_a_source_trains_one_adapter_and_one_head(root, tmp_path):
    from tests.test_sources import new_source

    store = ArtifactStore(root)
    before = {k: head_sha(root, k) for k in ("shard-00", "shard-01")}
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers
    from cdm.lifecycle.add_source import run_add_source

    register_resolvers()
    every = [*TINY, "source.name=batch5", f"source.path={new_source(tmp_path / 'b.npz')}",
             "add.num_samples=2", "add.steps=2", f"paths.artifacts={root}"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        record = run_add_source(compose("add_source", overrides=every), every)
    assert record["job"] == "shard-02" and record["routers"] == []
    assert record["head_weights_sha256"] == head_sha(root, "shard-02")
    assert store.read_head_card(EXP, "shard-02")["manifest_hash"] == record["manifest_hash"]
    assert {k: head_sha(root, k) for k in before} == before  # the other heads are untouched
    assert record["samples"]["composition"] == "compartmental"


def test_a_joint_router_job_refuses_the_compartmental_router(root):
    with pytest.raises(ValueError, match="stage=head"):
        run_inprocess(*TINY, "stage=router", "router=compartmental", artifacts=root)
