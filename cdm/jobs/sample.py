"""Sample from a composed CDM from a resolved config: the library behind cdm-sample."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cdm.core import composition as C
from cdm.core.hashing import sha256_bytes
from cdm.core.names import job_name
from cdm.core.runtime import configure_runtime
from cdm.jobs.context import device_description
from cdm.models.backbone import UNET_CLASSES, null_label
from cdm.models.composed import ComposedDenoiser, build_sampling_scheduler, sample_composed
from cdm.models.multi_adapter import (
    GraphedDense,
    MultiShardUNet,
    merge_adapters,
    read_peft_adapter,
)
from cdm.store import ArtifactStore, StoreError, make_card, read_card
from cdm.store.samples import save_samples


def shard_indices(store: ArtifactStore, experiment: str) -> list[int]:
    """Indices of the experiment's shards, from its manifests."""
    names = [m for m in store.list_manifests(experiment) if m.startswith("shard-")]
    if not names:
        raise StoreError(
            f"experiment {experiment!r} has no shard manifests: train it first (cdm-train stage=shard)"
        )
    return sorted(int(m.split("-")[1]) for m in names)


def allowed_shards(cfg: DictConfig, available: list[int]) -> list[int]:
    """The shards this request may use (``shards=[...]``), checked against the experiment."""
    if cfg.shards is None:
        return available
    wanted = sorted({int(k) for k in cfg.shards})
    unknown = [k for k in wanted if k not in available]
    if unknown or not wanted:
        raise ValueError(
            f"shards={wanted}: this experiment has shards {available}; unknown {unknown}"
        )
    return wanted


def load_router(
    cfg: DictConfig, store: ArtifactStore, manifests: dict[int, dict], backbone, backbone_card: dict
):
    """The classifier router and its training log-prior, checked to be trained on these exact shards."""
    import copy

    from cdm.jobs.router import load_router_model

    router, card = load_router_model(
        store, cfg.experiment_name, cfg.router_name, backbone=copy.deepcopy(backbone),
        expected_backbone_hash=backbone_card["backbone_hash"],
    )  # fmt: skip
    trained = {m["name"]: m["hash"] for m in card["shard_manifests"]}
    current = {f"shard-{k:02d}": m["hash"] for k, m in manifests.items()}
    if trained != current:
        raise StoreError(
            f"router {cfg.router_name!r} was trained on other shard data than the current shards "
            f"(manifests changed or shards were added/forgotten): retrain it with "
            f"cdm-train experiment={cfg.experiment_name} stage=router retrain=true"
        )
    order = [m["name"] for m in card["shard_manifests"]]
    parent = {"kind": "router", "name": cfg.router_name, "hash": card["weights_sha256"]}
    return router, order, torch.tensor(card["train_log_prior"], dtype=torch.float32), parent


def knn_router(
    cfg: DictConfig, store: ArtifactStore, shards: list[int], manifests: dict[int, dict]
):
    """k-NN router over the allowed shards' centroids; Tweedie's x_0 from the bare backbone."""
    from cdm.models.backbone import build_scheduler, predict_epsilon
    from cdm.models.knn_router import KNNRouter
    from cdm.store.knn import load_centroids

    centroids, parents, cards = [], [], []
    for k in shards:
        c, card = load_centroids(store, cfg.experiment_name, cfg.knn.name, job_name("shard", k))
        cards.append(card)
        parents.append(
            {
                "kind": "knn_centroids",
                "name": f"{cfg.knn.name}/shard-{k:02d}",
                "hash": card["weights_sha256"],
            }
        )
        if card["manifest_hash"] != manifests[k]["hash"]:
            raise StoreError(
                f"k-NN centroids of shard-{k:02d} were computed on other data: recompute with "
                f"cdm-train experiment={cfg.experiment_name} stage=knn retrain=true"
            )
        centroids.append(c)
    bare, _ = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
    bare.eval()
    alphas = build_scheduler(
        OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
    ).alphas_cumprod
    from cdm.jobs.context import load_data
    from cdm.jobs.knn import knn_embedder

    embedder, embedder_parents = knn_embedder(cfg, store, load_data(cfg))
    for k, c in zip(shards, cards, strict=True):  # centroids embedded by another feature net
        if {p["hash"] for p in c.get("parents", [])} != {p["hash"] for p in embedder_parents}:
            raise StoreError(
                f"k-NN centroids {cfg.knn.name}/shard-{k:02d} were embedded by another version of "
                f"their feature net (e.g. before it was retrained after cdm-forget): recompute with "
                f"cdm-train experiment={cfg.experiment_name} stage=knn knn={cfg.knn.name} retrain=true"
            )
    parents += embedder_parents
    null = null_label(bare)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = None if null is None else torch.full((x.shape[0],), null, device=x.device)
        return predict_epsilon(bare, x, t, labels)

    return KNNRouter(embedder, centroids, eps_fn, alphas, float(cfg.knn.temperature)), parents


def shard_label_prior(
    cfg: DictConfig, shards: list[int], manifests: dict[int, dict]
) -> torch.Tensor:
    """P(shard | label) [num_classes + 1, n] from each allowed shard's label counts.

    A label no allowed shard holds (and the null label) falls back to the shard sizes.
    """
    from cdm.jobs.context import load_data

    dataset = load_data(cfg)
    index = dataset.id_to_index
    counts = torch.zeros(int(cfg.data.num_classes) + 1, len(shards), dtype=torch.float64)
    for j, k in enumerate(shards):
        labels = dataset.labels[[index[i] for i in manifests[k]["ids"]]]
        counts[:, j] = torch.bincount(labels, minlength=counts.shape[0]).double()[: counts.shape[0]]
    sizes = counts.sum(dim=0)
    empty = counts.sum(dim=1) == 0
    counts[empty] = sizes
    return (counts / counts.sum(dim=1, keepdim=True)).float()


def grid_png(images: torch.Tensor, ncol: int | None = None) -> bytes:
    """A PNG grid of images in [-1, 1]."""
    from PIL import Image

    n, c, h, w = images.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    canvas = np.zeros((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = (
            pixels[i]
        )
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    scale = max(1, 256 // max(canvas.shape[:2]))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
    device = sampling_device(cfg)
    store = ArtifactStore(cfg.paths.artifacts)
    experiment = cfg.experiment_name
    unet, backbone_card = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
    signature = sampling_signature(cfg)
    previous = (
        None if cfg.resample else _current_samples(store, experiment, str(cfg.name), signature)
    )
    if previous is not None:
        print(
            f"[cdm] samples {cfg.name!r} are up to date at {previous['path']}; resample=true redraws"
        )
        return previous
    available = shard_indices(store, experiment)
    paragon = cfg.composition == "paragon"
    shards = [] if paragon else allowed_shards(cfg, available)
    manifests = {k: store.load_manifest(experiment, f"shard-{k:02d}") for k in available}
    # only the allowed shards' adapters are ever read: a disallowed shard cannot be evaluated
    jobs = ["paragon"] if paragon else [job_name("shard", k) for k in shards]
    dirs, adapter_cards = [], []
    for job in jobs:
        directory, card = store.checked_adapter(
            experiment, job, backbone_hash=backbone_card["backbone_hash"]
        )
        dirs.append(directory)
        adapter_cards.append(card)
    router = train_log_prior = None
    router_parents: list[dict] = []
    if cfg.composition in ("classifier", "topk"):
        full_router, order, log_prior, parent = load_router(
            cfg, store, manifests, unet, backbone_card
        )
        router_parents = [parent]
        full_router.to(device)
        columns = torch.tensor([order.index(f"shard-{k:02d}") for k in shards])
        router = lambda x, t: full_router(x, t)[:, columns]  # noqa: E731  logits of allowed shards
        train_log_prior = log_prior[columns]
    if cfg.composition == "knn":
        router, router_parents = knn_router(cfg, store, shards, manifests)
    adapters = [read_peft_adapter(d) for d in dirs]
    sizes = torch.tensor([len(manifests[k]["ids"]) for k in shards], dtype=torch.float64)
    method = cfg.composition
    if paragon:  # the monolithic model: one adapter trained on all private data
        method, prior = "average", torch.ones(1)
    else:
        prior = C.priors_from_sizes(sizes) if cfg.prior == "sizes" else torch.ones(len(shards))
    if (
        method == "weight_merge"
    ):  # one model whose LoRA delta is the lambda-weighted sum of the shards'
        adapters = [merge_adapters(adapters, C.normalize_priors(prior).tolist())]
        method, prior = "average", torch.ones(1)
    model = MultiShardUNet(unet, adapters).to(device)
    labels = label_prior = None
    if cfg.data.conditional:
        label_prior = None if paragon else shard_label_prior(cfg, shards, manifests)
        if cfg.labels is not None:
            pool = torch.tensor(list(cfg.labels))
        else:
            owners = available if paragon else shards
            pool = torch.tensor(sorted({c for k in owners for c in manifests[k]["classes"]}))
        labels = pool[torch.arange(int(cfg.num_samples)) % len(pool)]
    dense = None
    if cfg.get("cuda_graph"):
        if device.type != "cuda":
            raise ValueError("cuda_graph=true needs device=cuda")
        dense = GraphedDense(model)
    denoiser = ComposedDenoiser(
        model, method, prior.float(), router=router, train_log_prior=train_log_prior, dense=dense,
        fixed=None if cfg.fixed_weights is None else torch.tensor(list(cfg.fixed_weights), dtype=torch.float32),
        topk=cfg.topk.k, threshold=cfg.topk.threshold, guidance_scale=float(cfg.guidance_scale),
        label_prior=label_prior,
        null_label=null_label(unet),
    )  # fmt: skip
    scheduler = build_sampling_scheduler(
        cfg.sampler, OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
    )
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    images, trace = sample_composed(
        denoiser, scheduler, num_samples=int(cfg.num_samples), shape=shape, steps=int(cfg.steps),
        labels=labels, seed=int(cfg.seed), batch_size=int(cfg.batch_size), progress=bool(cfg.progress),
        device=device,
    )  # fmt: skip
    names = jobs
    plot_names = names if trace.shape[-1] == len(names) else [f"merged({', '.join(names)})"]
    files = {
        "grid.png": grid_png(images),
        "samples.npz": _npz(
            images=((images + 1) * 127.5).round().to(torch.uint8).numpy(),
            labels=np.array([] if labels is None else labels.numpy()),
        ),  # fmt: skip
        "trace.npz": _npz(
            weights=trace.numpy(),
            shards=np.array(shards),
            timesteps=scheduler.timesteps.cpu().numpy(),
        ),
        "weights.png": weights_plot_png(
            trace, plot_names, f"{experiment}: {cfg.composition}, {cfg.sampler} {cfg.steps} steps"
        ),
    }
    card = make_card(
        kind="samples",
        name=cfg.name,
        experiment=experiment,
        composition=cfg.composition,
        shards=shards,
        parents=[
            {"kind": "backbone", "name": cfg.backbone.id, "hash": backbone_card["backbone_hash"]}
        ]
        + [
            {
                "kind": "adapter",
                "name": n,
                "hash": c["weights_sha256"],
                "manifest_hash": c["manifest_hash"],
            }
            for n, c in zip(names, adapter_cards, strict=True)
        ]  # fmt: skip
        + router_parents,
        prior=prior.tolist(),
        signature=signature,
        metrics={
            "evaluated_pairs_per_sample_step": denoiser.evaluated_pairs
            / (int(cfg.num_samples) * int(cfg.steps))
        },
        config=OmegaConf.to_container(cfg, resolve=True),
        device=device_description(),
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    return save_samples(store, experiment, cfg.name, files, card)


def sampling_device(cfg: DictConfig) -> torch.device:
    """``cfg.device`` (cpu | cuda | cuda:K), checked to exist here."""
    device = torch.device(str(cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device}: no CUDA device on this machine; use device=cpu")
    if device.type != "cpu" and cfg.composition == "knn":
        raise ValueError("composition=knn samples on the CPU only for now: use device=cpu")
    return device


def sampling_signature(cfg: DictConfig) -> str:
    """Hash of every setting that changes which samples are drawn (not where they are written)."""
    keys = ("composition", "shards", "prior", "fixed_weights", "topk", "router_name", "sampler",
            "steps", "num_samples", "batch_size", "guidance_scale", "labels", "seed", "knn", "device")  # fmt: skip
    config = OmegaConf.to_container(cfg, resolve=True)
    kept = {k: config.get(k) for k in keys} | {"backbone": config["backbone"]["id"]}
    if config.get("cuda_graph"):  # only when set: signatures of earlier samples stay valid
        kept["cuda_graph"] = True
    return sha256_bytes(json.dumps(kept, sort_keys=True, default=str).encode())


def _current_samples(
    store: ArtifactStore, experiment: str, name: str, signature: str
) -> dict | None:
    """The stored samples ``name`` if drawn with these settings from the artifacts stored now.

    Every parent (backbone, adapters, router, centroids) must still have the hash the samples
    were drawn with; a retrained or forgotten parent makes the samples stale.
    """
    from cdm.store.samples import samples_dir

    directory = samples_dir(store, experiment, name)
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
            from cdm.store.feature_nets import feature_net_dir

            return read_card(feature_net_dir(store, parent["name"])).get("weights_sha256")
        if parent["kind"] == "knn_centroids":
            from cdm.store.knn import centroids_dir

            embedder, job = parent["name"].split("/")
            return read_card(centroids_dir(store, experiment, embedder, job)).get("weights_sha256")
    except StoreError:
        return None
    return None


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
