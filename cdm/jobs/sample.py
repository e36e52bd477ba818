"""Sample from a composed CDM from a resolved config: the library behind cdm-sample."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core.identity import JobIdentity, job_identity, refusal
from cdm.core.logging import get_logger
from cdm.core.runtime import configure_runtime
from cdm.eval.grids import grid_png
from cdm.jobs.context import device_description, identity_of
from cdm.jobs.pipeline import CDMPipeline, cycle_labels, to_uint8
from cdm.store import ArtifactStore, StoreError, make_card, read_card
from cdm.store.samples import save_samples
from cdm.store.staleness import changed_parent

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
    """Compose the allowed shards with ``cfg.composition``, sample, and store the result.

    Samples already stored under ``cfg.name`` with these settings and parents are reused
    (``resample=true`` redraws); samples stored there with other settings are never replaced
    silently: that needs ``overwrite=true`` (or another ``name=...``).
    """
    configure_runtime(int(cfg.seed), int(cfg.threads), bool(cfg.deterministic))
    started = time.perf_counter()
    store = ArtifactStore(cfg.paths.artifacts)
    experiment, name = cfg.experiment_name, str(cfg.name)
    identity = identity_of(cfg, "sample")
    stored = stored_samples_card(store, experiment, name)
    if stored is not None and not cfg.resample and current_samples(store, experiment, stored, identity.hash):  # fmt: skip
        log.info("samples %r are up to date at %s; resample=true redraws", name, stored["path"])
        return stored
    pipe = CDMPipeline.from_config(cfg, store)  # a bad request (shards, router) fails here
    check_overwrite(stored, identity, cfg)  # before anything is drawn
    pipe.set_progress_bar_config(disable=not cfg.progress, desc="sampling (steps)")
    images, trace, labels = draw_samples(pipe, cfg)
    pairs = pipe.denoiser.evaluated_pairs / (int(cfg.num_samples) * int(cfg.steps))
    card = make_card(
        kind="samples", name=name, experiment=experiment, composition=cfg.composition.name,
        shards=pipe.shards, parents=pipe.parents, prior=pipe.prior.tolist(),
        signature=identity.hash, identity=identity.sections,
        metrics={"evaluated_pairs_per_sample_step": pairs},
        config=OmegaConf.to_container(cfg, resolve=True), device=device_description(cfg.device),
        wall_time_s=round(time.perf_counter() - started, 3),
    )  # fmt: skip
    files = sample_files(cfg, pipe, images, trace, labels)
    return save_samples(store, experiment, name, files, card)


def check_overwrite(stored: dict | None, identity: JobIdentity, cfg: DictConfig) -> None:
    """Refuse to replace samples drawn with other settings unless ``overwrite=true``."""
    if stored is None or stored.get("signature") == identity.hash:
        return
    what = f"samples {cfg.name!r} of experiment {cfg.experiment_name!r}"
    if not cfg.get("overwrite", False):
        sections = stored.get("identity")  # older cards: recomputed from their config
        if sections is None and isinstance(stored.get("config"), dict):
            sections = job_identity(stored["config"], "sample").sections
        raise StoreError(
            refusal(what, sections, identity.sections,
                    "choose another name=... or pass overwrite=true to replace them")
        )  # fmt: skip
    log.warning("overwrite=true: replacing %s, drawn with other settings", what)


def draw_samples(
    pipe: CDMPipeline, cfg: DictConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_0 [N, C, H, W] in [-1, 1] (a codec's latents decoded), trace [N, steps, n], labels [N]
    or None: class labels, or a text model's prompt rows).

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
            generator=batch_generator(int(cfg.seed), start),
        )  # fmt: skip
        images.append(pipe.decode(out.images))
        traces.append(out.weights)
    return torch.cat(images), torch.cat(traces), labels


def batch_generator(seed: int, start: int = 0) -> torch.Generator:
    """The generator of the batch whose first sample is number ``start`` of a draw seeded ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + start)


def sample_files(
    cfg: DictConfig,
    pipe: CDMPipeline,
    images: torch.Tensor,
    trace: torch.Tensor,
    labels: torch.Tensor | None,
) -> dict[str, bytes]:
    """The samples artifact's files: grid.png, samples.npz, trace.npz, weights.png; a text
    model's prompts.json (sample k's prompt and test row) and captions.png (the first samples
    beside their captions; grid.png is in sample order)."""
    names = pipe.adapter_names
    plot_names = names if trace.shape[-1] == len(names) else [f"merged({', '.join(names)})"]
    title = f"{cfg.experiment_name}: {cfg.composition.name}, {cfg.sampler.name} {cfg.steps} steps"
    text: dict[str, bytes] = {}
    if pipe.prompts is not None and labels is not None:
        prompts = [pipe.prompts[int(k)] for k in labels]
        text = {
            "prompts.json": json.dumps(prompts, indent=1).encode(),
            "captions.png": captioned_png(images[:CAPTIONED], [p["caption"] for p in prompts]),
        }
        title += " (row-major = prompts.json)"
        labels_for_grid = None
    else:
        labels_for_grid = labels
        title += " (column k = class k)" if labels is not None else ""
    return {
        **text,
        "grid.png": grid_png(images, labels=labels_for_grid, title=title),
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


CAPTIONED = 16  # samples shown beside their captions in captions.png


def captioned_png(images: torch.Tensor, captions: list[str], cell: int = 64) -> bytes:
    """One row per sample: the image (enlarged to ``cell`` pixels) and its caption to its right."""
    from PIL import Image, ImageDraw

    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels.repeat(3, axis=-1)
    width = cell + 8 + 7 * max((len(c) for c in captions), default=1)
    sheet = Image.new("RGB", (width, cell * len(pixels)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(zip(pixels, captions, strict=False)):
        sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (0, k * cell))
        draw.text((cell + 6, k * cell + cell // 2 - 6), caption, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def sampling_signature(cfg: DictConfig) -> str:
    """Hash of every setting that changes which samples are drawn: the ``sample`` identity
    (``cdm.core.identity``); the parents' hashes are checked on the card."""
    return identity_of(cfg, "sample").hash


def stored_samples_card(store: ArtifactStore, experiment: str, name: str) -> dict | None:
    """The card of the samples stored under ``name`` (None: there are none)."""
    directory = store.samples_dir(experiment, name)
    return read_card(directory) if (directory / "card.json").exists() else None


def current_samples(store: ArtifactStore, experiment: str, card: dict, signature: str) -> bool:
    """Whether stored samples (``card``) were drawn with these settings from the artifacts
    stored now: a retrained or forgotten parent (backbone, adapters, router, centroids) makes
    them stale (``cdm.store.staleness.changed_parent``)."""
    return card.get("signature") == signature and changed_parent(store, experiment, card) is None


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
