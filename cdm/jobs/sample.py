"""Sample from a composed CDM from a resolved config: the library behind cdm-sample."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.logging import get_logger
from cdm.core.runtime import configure_runtime
from cdm.eval.grids import grid_png
from cdm.jobs.context import device_description, identity_of
from cdm.jobs.pipeline import CDMPipeline, cycle_labels, to_uint8
from cdm.store import ArtifactStore, StoreError, make_card, read_card
from cdm.store.samples import save_samples

log = get_logger(__name__)


def weights_plot_png(trace: torch.Tensor, shard_names: list[str], title: str) -> bytes:
    """Router weights over the reverse process (paper Fig. 1 right / Fig. 3).

    Left: mean weight of each shard. Right: mean weight of the shard each sample ends on, i.e.
    how early the router commits to one shard (1/n = no preference).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(trace.shape[1])
    final = trace[:, -1].argmax(dim=1)
    chosen = trace[torch.arange(trace.shape[0]), :, final].numpy()  # [N, steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    for i, name in enumerate(shard_names):
        left.plot(steps, trace[:, :, i].mean(dim=0).numpy(), label=name)
    left.set_ylabel("mean weight w_i(x_t, t)")
    left.legend(fontsize=7)
    right.plot(steps, chosen.mean(axis=0), color="black", label="final shard")
    right.fill_between(
        steps,
        np.percentile(chosen, 25, axis=0),
        np.percentile(chosen, 75, axis=0),
        alpha=0.2,
        color="gray",
    )
    right.axhline(1 / len(shard_names), ls="--", color="gray", lw=0.8, label="1/n")
    right.set_ylabel("weight of each sample's final shard")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xlabel("reverse step (noise -> data)")
        ax.set_ylim(0, 1.02)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def run_sampling(cfg: DictConfig) -> dict:
    """Compose the allowed shards with ``cfg.composition``, sample, and store the result."""
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    started = time.perf_counter()
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    signature = sampling_signature(cfg)
    previous = None if cfg.resample else current_samples(store, experiment, str(cfg.name), signature)  # fmt: skip
    if previous is not None:
        log.info(
            "samples %r are up to date at %s; resample=true redraws", cfg.name, previous["path"]
        )
        return previous
    pipe = CDMPipeline.from_config(cfg, store)
    pipe.set_progress_bar_config(disable=not cfg.progress, desc="sampling (steps)")
    images, trace, labels = draw_samples(pipe, cfg)
    pairs = pipe.denoiser.evaluated_pairs / (int(cfg.num_samples) * int(cfg.steps))
    card = make_card(
        kind="samples", name=cfg.name, experiment=experiment, composition=cfg.composition.name,
        shards=pipe.shards, parents=pipe.parents, prior=pipe.prior.tolist(), signature=signature,
        metrics={"evaluated_pairs_per_sample_step": pairs},
        config=OmegaConf.to_container(cfg, resolve=True), device=device_description(),
        wall_time_s=round(time.perf_counter() - started, 3),
    )  # fmt: skip
    files = sample_files(cfg, pipe, images, trace, labels)
    return save_samples(store, experiment, cfg.name, files, card)


def draw_samples(
    pipe: CDMPipeline, cfg: DictConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_0 [N, C, H, W] in [-1, 1], trace [N, steps, n], labels [N] or None).

    ``num_samples`` are drawn in batches of ``batch_size``; the batch at ``start`` comes from a
    generator seeded ``seed * 1_000_003 + start``, so each batch is reproducible on its own.
    """
    n, size = int(cfg.num_samples), int(cfg.batch_size)
    labels = None if pipe.label_pool is None else cycle_labels(pipe.label_pool, n)
    images, traces = [], []
    for start in range(0, n, size):
        stop = min(start + size, n)
        out = pipe(
            batch_size=stop - start, class_labels=None if labels is None else labels[start:stop],
            num_inference_steps=int(cfg.steps), output_type="latent",
            generator=torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + start),
        )  # fmt: skip
        images.append(out.images)
        traces.append(out.weights)
    return torch.cat(images), torch.cat(traces), labels


def sample_files(
    cfg: DictConfig,
    pipe: CDMPipeline,
    images: torch.Tensor,
    trace: torch.Tensor,
    labels: torch.Tensor | None,
) -> dict[str, bytes]:
    """The samples artifact's files: grid.png, samples.npz, trace.npz, weights.png."""
    names = pipe.adapter_names
    plot_names = names if trace.shape[-1] == len(names) else [f"merged({', '.join(names)})"]
    title = f"{cfg.experiment_name}: {cfg.composition.name}, {cfg.sampler.name} {cfg.steps} steps"
    return {
        "grid.png": grid_png(images),
        "samples.npz": _npz(
            images=to_uint8(images).numpy(),
            labels=np.array([] if labels is None else labels.numpy()),
        ),
        "trace.npz": _npz(
            weights=trace.numpy(),
            shards=np.array(pipe.shards),
            timesteps=pipe.scheduler.timesteps.cpu().numpy(),
        ),
        "weights.png": weights_plot_png(trace, plot_names, title),
    }


def sampling_signature(cfg: DictConfig) -> str:
    """Hash of every setting that changes which samples are drawn: the ``sample`` identity
    (``cdm.core.identity``); the parents' hashes are checked on the card."""
    return identity_of(cfg, "sample").hash


def current_samples(
    store: ArtifactStore, experiment: str, name: str, signature: str
) -> dict | None:
    """The stored samples ``name`` if drawn with these settings from the artifacts stored now.

    Every parent (backbone, adapters, router, centroids) must still have the hash the samples
    were drawn with; a retrained or forgotten parent makes the samples stale.
    """
    directory = store.samples_dir(experiment, name)
    if not (directory / "card.json").exists():
        return None
    card = read_card(directory)
    if card.get("signature") != signature:
        return None
    for parent in card.get("parents", []):
        if current_parent_hash(store, experiment, parent) != parent["hash"]:
            return None
    return card


def current_parent_hash(store: ArtifactStore, experiment: str, parent: dict) -> str | None:
    """The hash the store holds now for a parent entry of a card (None when it is gone)."""
    try:
        if parent["kind"] == "backbone":
            return read_card(store.backbone_dir(parent["name"])).get("backbone_hash")
        if parent["kind"] == "adapter":
            return read_card(store.adapter_dir(experiment, parent["name"])).get("weights_sha256")
        if parent["kind"] == "router":
            return read_card(store.router_dir(experiment, parent["name"])).get("weights_sha256")
        if parent["kind"] == "feature_net":
            return read_card(store.feature_net_dir(parent["name"])).get("weights_sha256")
        if parent["kind"] == "knn_centroids":
            embedder, job = parent["name"].split("/")
            return read_card(store.centroids_dir(experiment, embedder, job)).get("weights_sha256")
    except StoreError:
        return None
    return None


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
