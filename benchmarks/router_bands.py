"""Router accuracy per timestep band: the joint classifier router vs the compartmental heads.

Both are scored on the same fixed noised held-out samples (the router job's validation set:
the test images of classes owned by one shard, or a held-out part of each shard), as
argmax of their posterior w = P_lambda(z | x_t) (Prop. 3.1) against the true shard. Needs a store
with the experiment's backbone, its router (``stage=router``) and one head per shard
(``stage=head``). Run from the repo root, with the experiment's train overrides:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/router_bands.py experiment=digits_4split_uncond \
        paths.artifacts=artifacts
"""

from __future__ import annotations

import copy
import sys

import torch
from hydra import compose, initialize_config_module

from cdm.core.composition import priors_from_sizes, router_posterior
from cdm.core.diffusion import q_sample
from cdm.core.names import ShardId
from cdm.jobs.config import register_resolvers
from cdm.jobs.context import load_data, split_data
from cdm.jobs.head import load_heads
from cdm.jobs.router import load_router_model, router_data
from cdm.models.backbone import UNET_CLASSES, build_scheduler
from cdm.store import ArtifactStore
from cdm.training.router import band_name, fixed_validation_noise, timestep_bands


@torch.no_grad()
def band_accuracy(overrides: list[str], bands: int = 5, draws: int = 2) -> dict[str, dict]:
    """{router: {band: accuracy}} of the joint router and of the heads, on the same x_t."""
    register_resolvers()
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        cfg = compose("train", overrides=["stage=router", *overrides])
    store, experiment = ArtifactStore(cfg.paths.artifacts), cfg.experiment_name
    dataset = load_data(cfg)
    split = split_data(cfg, dataset)
    unet, bcard = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
    alphas = build_scheduler(cfg.backbone.scheduler).alphas_cumprod
    shards = [ShardId.parse(m.name).index for m in split.shards]
    manifests = {k: store.load_manifest(experiment, ShardId(k).name) for k in shards}
    log_lambda = torch.log(priors_from_sizes([len(m) for m in split.shards])).float()
    joint, card = load_router_model(store, experiment, backbone=copy.deepcopy(unet),
                                    expected_backbone_hash=bcard["backbone_hash"])  # fmt: skip
    pi = torch.tensor(card["train_log_prior"], dtype=torch.float32)
    heads, _ = load_heads(store, experiment, shards, manifests, copy.deepcopy(unet),
                          bcard["backbone_hash"])  # fmt: skip
    val = router_data(dataset, split, seed=int(cfg.seed)).val_items
    index = torch.tensor([i for i, _ in val])
    labels = torch.tensor([k for _, k in val])
    x0 = torch.stack([dataset[int(i)]["image"] for i in index])
    out: dict[str, dict] = {"classifier": {}, "compartmental": {}}
    T = len(alphas)
    for band in timestep_bands(T, bands):
        hits = {name: 0 for name in out}
        for draw in range(draws):
            noise, t = fixed_validation_noise(index, x0.shape[1:], band, draw, int(cfg.seed))
            x_t = q_sample(x0, noise, t, alphas)
            w = {
                "classifier": router_posterior(joint(x_t, t).float(), log_lambda, pi),
                "compartmental": router_posterior(heads(x_t, t).float(), log_lambda),
            }
            for name, weights in w.items():
                hits[name] += int((weights.argmax(1) == labels).sum())
        for name in out:
            out[name][band_name(*band, T)] = hits[name] / (draws * len(labels))
    return out


def main() -> None:
    result = band_accuracy(sys.argv[1:])
    bands = list(result["classifier"])
    print("| router | " + " | ".join(bands) + " |")
    print("|---|" + "---|" * len(bands))
    for name, acc in result.items():
        print(f"| {name} | " + " | ".join(f"{acc[b]:.3f}" for b in bands) + " |")


if __name__ == "__main__":
    main()
