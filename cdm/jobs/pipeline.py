"""``CDMPipeline``: a compartmentalized model as a diffusers pipeline, built from the store.

    pipe = CDMPipeline.from_store("artifacts", "digits_4split", composition="average", shards=[0, 2])
    images = pipe(batch_size=8, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images

The pipeline holds a ``ComposedDenoiser`` (Prop. 3.1 over the allowed shards) and a diffusers
scheduler; a call runs the pure loop ``cdm.core.sampling.sample`` over them once (one batch).
The composition method and the sampler are Hydra options (``conf/composition``, ``conf/sampler``)
that name their class by ``_target_``; ``cdm-sample`` (``cdm.jobs.sample``) is a user of this.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from cdm.core import composition as C
from cdm.core.identity import read_captions
from cdm.core.names import ShardId, job_name
from cdm.jobs.config import register_resolvers
from cdm.jobs.context import check_backbone_config, load_data
from cdm.jobs.head import load_heads
from cdm.jobs.knn import knn_embedder
from cdm.jobs.router import load_router_model
from cdm.models.backbone import UNET_CLASSES, build_scheduler, null_label, predict_epsilon
from cdm.models.composed import ComposedDenoiser, draw
from cdm.models.knn_router import KNNRouter
from cdm.models.multi_adapter import (
    GraphedDense,
    GraphedPairs,
    MultiShardFull,
    MultiShardUNet,
    merge_adapters,
    merge_full,
    read_full_model,
    read_peft_adapter,
)
from cdm.models.prompts import MultiShardPrompt, merge_prompts, read_prompts
from cdm.models.text import (
    LatentCodec,
    TextEncoder,
    attach_contexts,
    caption_table,
    conditioned_unets,
    contexts_of,
    is_text_data,
    latent_codec,
    model_shape,
    text_encoder_of,
)
from cdm.store import ArtifactStore, StoreError
from cdm.store.knn import load_centroids

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# cuda_graph=: off, each step one CUDA graph replay, or the replay of the inductor-compiled step
CUDA_GRAPH = (False, True, "compiled")


@dataclass
class CDMPipelineOutput(BaseOutput):
    """images: PIL list | [B, H, W, C] array in [0, 1] | [B, C, H, W] tensor in [0, 1] ("pt") or
    in [-1, 1] ("latent"); weights: the router weight trace w_i(x_t, t), [B, steps, n]."""

    images: list | np.ndarray | torch.Tensor
    weights: torch.Tensor


@dataclass
class StoredAdapter:
    """A checked shard (or paragon) in the store: its folder and ``adapter_kind`` (lora | full |
    deep_prompt)."""

    directory: Path
    kind: str


@dataclass
class RouterParts:
    """A loaded router: logits of the allowed shards, its training log-prior, card parents."""

    router: Any
    train_log_prior: torch.Tensor | None
    parents: list[dict]


class CDMPipeline(DiffusionPipeline):
    """Sample a compartmentalized diffusion model as diffusers users expect (``pipe(...)``).

    Components: ``model`` (the backbone with the composed shards' adapters) and ``scheduler``
    (any epsilon-predicting diffusers scheduler; swap it as usual:
    ``pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)``).
    """

    def __init__(
        self,
        denoiser: ComposedDenoiser,
        scheduler: Any,
        sample_shape: Sequence[int],
        label_pool: torch.Tensor | None = None,
        shards: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.register_modules(model=denoiser.model, scheduler=scheduler)
        self.denoiser = denoiser
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.label_pool = label_pool
        self.shards = list(shards)
        self.adapter_names: list[str] = []  # filled by from_config: the store's adapter jobs
        self.prompts: list[dict] | None = None  # text data: label k = prompts[k] (prompt_list)
        self.codec: LatentCodec | None = None  # latent space: samples are decoded by it
        self.text_encoder: TextEncoder | None = None  # text models: encodes prompts
        self.base_contexts: torch.Tensor | None = None  # the table before prompt_labels added rows
        self.parents: list[dict] = []  # filled by from_config: card parents of the samples
        self.prior = denoiser.prior

    @property
    def device(self) -> torch.device:
        """Where the composed model runs."""
        return next(self.model.parameters()).device

    @classmethod
    def from_store(
        cls,
        store_root: str | Path,
        experiment: str,
        *,
        shards: Sequence[int] | None = None,
        composition: str = "classifier",
        sampler: str = "ddim",
        router_name: str = "router",
        overrides: Sequence[str] = (),
    ) -> CDMPipeline:
        """The pipeline of ``experiment`` (a ``conf/experiment`` name) from the store at ``store_root``.

        ``composition`` and ``sampler`` are option names of their config groups; ``overrides``
        are further Hydra overrides of the ``sample`` config (e.g. ``["device=cuda"]``).
        """
        register_resolvers()
        cfg = sample_config([
            f"experiment={experiment}", f"paths.artifacts={store_root}",
            f"composition={composition}", f"sampler={sampler}", f"router_name={router_name}",
            *([] if shards is None else [f"shards=[{','.join(str(int(k)) for k in shards)}]"]),
            *overrides,
        ])  # fmt: skip
        return cls.from_config(cfg)

    @classmethod
    def from_config(cls, cfg: DictConfig, store: ArtifactStore | None = None) -> CDMPipeline:
        """The pipeline of a composed ``sample`` config: only the allowed shards' adapters are read."""
        store = store or ArtifactStore(cfg.paths.artifacts)
        composition = instantiate_option(cfg.composition)
        device = sampling_device(cfg, composition)
        experiment = cfg.experiment_name
        unet, backbone_card = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
        check_backbone_config(cfg, backbone_card)  # the sampler's schedule is the backbone's
        available = shard_indices(store, experiment)
        one_model = composition.paragon or composition.base  # no shard is composed
        shards = [] if one_model else allowed_shards(cfg, available)
        manifests = {k: store.load_manifest(experiment, job_name("shard", k)) for k in available}
        jobs = ["paragon"] if composition.paragon else [job_name("shard", k) for k in shards]
        stored, parents = checked_adapters(store, experiment, jobs, cfg.backbone.id, backbone_card)
        routed = RouterParts(None, None, [])
        if composition.router is not None:
            routed = load_composition_router(
                composition.router, cfg, store, shards, manifests, unet, backbone_card, device
            )
        prior, model = mixture(cfg, composition, shards, manifests, unet, stored)
        prompts, encoder = None, None
        if is_text_data(cfg.data):  # after the router: it was trained without captions
            prompts, encoder = prompt_list(cfg, load_data(cfg)), text_encoder_of(cfg.backbone)
            table = caption_table(encoder, [p["caption"] for p in prompts])
            attach_contexts(unet, table)
            attach_contexts(model, table)
        model = model.to(device)
        label_prior, label_pool = conditioning(cfg, composition, available, shards, manifests)
        if prompts is not None:
            label_pool = torch.arange(len(prompts))
        dense = pairs = None
        graph = cfg.get("cuda_graph") or False
        if graph not in CUDA_GRAPH:
            raise ValueError(f"cuda_graph={graph}: use true, false or compiled")
        if graph:
            if device.type != "cuda":
                raise ValueError(f"cuda_graph={str(graph).lower()} needs device=cuda")
            compile_step = graph == "compiled"  # the graph captures the inductor-compiled step
            dense = GraphedDense(model, compile_step)
            if isinstance(model, MultiShardUNet):  # top-k, random: a static capacity of pairs
                pairs = GraphedPairs(model, compile_step)
        denoiser = ComposedDenoiser(
            model, composition, prior.float(), router=routed.router, dense=dense, pairs=pairs,
            train_log_prior=routed.train_log_prior, label_prior=label_prior,
            guidance_scale=float(cfg.guidance_scale), null_label=null_label(unet),
        )  # fmt: skip
        schedule = OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
        codec = latent_codec(cfg.backbone)
        shape = model_shape(codec, cfg.data.channels, cfg.data.resolution)
        pipe = cls(denoiser, build_sampler(cfg.sampler, schedule), shape, label_pool, shards)
        pipe.prior, pipe.adapter_names = prior, jobs or ["backbone"]
        pipe.prompts, pipe.codec, pipe.text_encoder = prompts, codec, encoder
        pipe.base_contexts = table if prompts is not None else None
        pipe.parents = parents + routed.parents
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        shards: Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
    ) -> CDMPipelineOutput | tuple:
        """Draw ``batch_size`` samples; x_T comes from ``generator`` on the CPU (same on any device).

        class_labels: one per sample; None cycles through the shards' classes (conditional
        models) or a text model's prompts (label k = ``self.prompts[k]``). shards: compose only
        these of the pipeline's shards (the exact sub-mixture, eq. 5 masked); None = all.
        latents: x_T [batch_size, C, H, W] instead of a draw from
        ``generator`` (which then serves only the sampler's noise). prompt: a text model's
        caption(s), cycled to ``batch_size`` (they replace ``self.prompts``). Returns
        ``CDMPipelineOutput(images, weights)`` or the tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {list(OUTPUT_TYPES)}")
        if prompt is not None:
            self.set_prompts([prompt] if isinstance(prompt, str) else list(prompt))
        labels = class_labels
        if labels is None and self.label_pool is not None:
            labels = cycle_labels(self.label_pool, batch_size)
        labels = None if labels is None else torch.as_tensor(labels)
        self.denoiser.allowed = self.allowed_mask(shards)
        with self.progress_bar(total=num_inference_steps) as bar:
            images, weights = draw(
                self.denoiser, self.scheduler, shape=(batch_size, *self.sample_shape),
                steps=num_inference_steps, labels=labels, generator=generator,
                device=self.device, callback=lambda *_: bar.update(), latents=latents,
                clamp=self.codec is None,  # a codec's latents are not in [-1, 1]
            )  # fmt: skip
        if output_type != "latent":
            images = self.decode(images)
        images = postprocess(images, output_type)
        return CDMPipelineOutput(images, weights) if return_dict else (images, weights)

    def set_prompts(self, captions: Sequence[str]) -> None:
        """Encode ``captions`` (and the null caption) as the model's context table: label k is
        now caption k (``prompt_list`` entries, without test rows)."""
        if self.text_encoder is None:
            raise ValueError("prompt=... needs a text model (data.conditioning=text)")
        if self.denoiser.dense is not None:
            raise ValueError("prompt=... with cuda_graph=true: the graph holds the old captions")
        table = caption_table(self.text_encoder, captions)
        attach_contexts(self.denoiser.model, table)
        self.base_contexts = table
        self.denoiser.null_label = len(captions)
        self.prompts = [{"caption": c, "test_row": None, "id": None} for c in captions]
        self.label_pool = torch.arange(len(captions))

    def prompt_labels(self, captions: Sequence[str]) -> torch.Tensor:
        """Labels of ``captions`` for the next calls, the pipeline's own prompts kept: their
        contexts follow the pipeline's table rows (labels 0..len(prompts) - 1 unchanged), the null
        caption stays last; each call replaces the previous call's captions. (``set_prompts``
        replaces the prompts instead.)"""
        if self.text_encoder is None:
            raise ValueError("prompts need a text model (data.conditioning=text)")
        if self.denoiser.dense is not None:
            raise ValueError("prompts with cuda_graph=true: the graph holds the old captions")
        base = self.base_contexts
        if base is None:  # a pipeline built by hand: the table its model carries
            base = self.base_contexts = contexts_of(conditioned_unets(self.denoiser.model)[0])
        table = torch.cat([base[:-1], self.text_encoder.encode(list(captions)).to(base), base[-1:]])
        attach_contexts(self.denoiser.model, table)
        self.denoiser.null_label = len(table) - 1
        return torch.arange(len(base) - 1, len(base) - 1 + len(captions))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of the model's samples: the codec's decoding (pixel models: as is)."""
        return latents if self.codec is None else self.codec.decode(latents).clamp(-1, 1)

    def allowed_mask(self, shards: Sequence[int] | None) -> torch.Tensor:
        """bool [n] over the pipeline's shards: those in ``shards`` (None: all)."""
        n = self.denoiser.model.n_shards
        if shards is None:
            return torch.ones(n, dtype=torch.bool)
        wanted = sorted({int(k) for k in shards})
        unknown = [k for k in wanted if k not in self.shards]
        if unknown or not wanted or len(self.shards) != n:
            raise ValueError(
                f"shards={wanted}: this pipeline composes shards {self.shards} one by one; "
                f"build it with CDMPipeline.from_store(..., shards=...) for others"
            )
        return torch.tensor([k in wanted for k in self.shards])


def sample_config(overrides: Sequence[str]) -> DictConfig:
    """The composed ``sample`` config (cdm/conf) with these overrides."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="sample", overrides=list(overrides))
    with initialize_config_module(config_module="cdm.conf", version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def instantiate_option(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a config-group option (``_target_`` + kwargs); its ``name`` key only labels it."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("name", None)
    return instantiate(spec, _convert_="all", **kwargs)


def build_sampler(node: DictConfig | Mapping[str, Any], schedule: Mapping[str, Any]) -> Any:
    """The diffusers scheduler of a ``sampler`` option (``_target_`` + its keys) on the backbone's
    noise schedule (``backbone.scheduler``; the option's own keys win). Only the keys its class
    accepts are passed, through ``SchedulerClass.from_config`` as diffusers carries a schedule
    over: DPM-Solver++ takes no ``clip_sample`` (``backbone=sd_local`` sets it)."""
    spec = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
    spec.pop("name", None)
    scheduler_class = get_class(spec.pop("_target_"))
    accepted = inspect.signature(scheduler_class.__init__).parameters
    config = {k: v for k, v in {**schedule, **spec}.items() if k in accepted}
    return scheduler_class.from_config(config)


def postprocess(images: torch.Tensor, output_type: str) -> list | np.ndarray | torch.Tensor:
    """x_0 in [-1, 1] as ``output_type``: latent (as is), pt, np (in [0, 1]) or pil."""
    if output_type == "latent":
        return images
    if output_type == "pil":
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
        return DiffusionPipeline.numpy_to_pil(pixels.astype(np.float32) / 255)
    unit = (images / 2 + 0.5).clamp(0, 1)
    return unit if output_type == "pt" else unit.permute(0, 2, 3, 1).numpy()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 pixels (what samples.npz stores)."""
    return ((images + 1) * 127.5).round().to(torch.uint8)


def cycle_labels(pool: torch.Tensor, n: int) -> torch.Tensor:
    """n labels cycling through ``pool``."""
    return pool[torch.arange(n) % len(pool)]


def shard_indices(store: ArtifactStore, experiment: str) -> list[int]:
    """Indices of the experiment's shards, from its manifests."""
    names = [m for m in store.list_manifests(experiment) if ShardId.is_shard(m)]
    if not names:
        raise StoreError(
            f"experiment {experiment!r} has no shard manifests: train it first (cdm-train stage=shard)"
        )
    return sorted(ShardId.parse(m).index for m in names)


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


def sampling_device(cfg: DictConfig, composition: C.Composition | None = None) -> torch.device:
    """``cfg.device`` (cpu | cuda | cuda:K), checked to exist here (and to suit ``composition``)."""
    device = torch.device(str(cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device}: no CUDA device on this machine; use device=cpu")
    if device.type != "cpu" and composition is not None and composition.router == "knn":
        raise ValueError("composition=knn samples on the CPU only for now: use device=cpu")
    return device


def checked_adapters(
    store: ArtifactStore, experiment: str, jobs: list[str], backbone: str, backbone_card: dict
) -> tuple[list[StoredAdapter], list[dict]]:
    """(adapters, card parents: the backbone, then each adapter), each verified in the store;
    only these jobs' weights are read."""
    parents = [{"kind": "backbone", "name": backbone, "hash": backbone_card["backbone_hash"]}]
    stored = []
    for job in jobs:
        directory, card = store.checked_adapter(
            experiment, job, backbone_hash=backbone_card["backbone_hash"]
        )
        stored.append(StoredAdapter(directory, store.adapter_kind(card)))
        parents.append(
            {"kind": "adapter", "name": job, "hash": card["weights_sha256"],
             "manifest_hash": card["manifest_hash"]}
        )  # fmt: skip
    return stored, parents


def mixture(
    cfg: DictConfig,
    composition: C.Composition,
    shards: list[int],
    manifests: dict[int, dict],
    unet: torch.nn.Module,
    stored: list[StoredAdapter],
) -> tuple[torch.Tensor, torch.nn.Module]:
    """(lambda, model): the mixture prior (eq. 3) and the model that composes the shards: the
    backbone with every LoRA adapter (``MultiShardUNet``), the full fine-tuned copies
    (``MultiShardFull``) or every shard's deep prompts on the DiT (``MultiShardPrompt``);
    weight_merge gives one model of the lambda-weighted weights."""
    kinds = sorted({a.kind for a in stored})
    if len(kinds) > 1:
        raise StoreError(
            f"the composed shards mix adapter kinds {kinds}: retrain them with one kind "
            f"(cdm-train stage=shard adapter=<lora|full|deep_prompt> retrain=true for each shard)"
        )
    if composition.base:  # the safe backbone alone: no adapter
        return torch.ones(1), MultiShardFull([unet])
    sizes = torch.tensor([len(manifests[k]["ids"]) for k in shards], dtype=torch.float64)
    if composition.paragon:  # the monolithic model: one adapter trained on all private data
        prior = torch.ones(1)
    else:
        prior = C.priors_from_sizes(sizes) if cfg.prior == "sizes" else torch.ones(len(shards))
    merge = C.normalize_priors(prior).tolist() if composition.merged else None
    if composition.merged:
        prior = torch.ones(1)
    if kinds == ["full"]:
        models = [read_full_model(a.directory, unet) for a in stored]
        if merge is not None:  # one model whose weights are the lambda-weighted shards' weights
            models = [merge_full(models, merge)]
        return prior, MultiShardFull(models)
    if kinds == ["deep_prompt"]:
        prompts = [read_prompts(a.directory) for a in stored]
        if merge is not None:  # one prompt set: the lambda-weighted sum of the shards' tokens
            prompts = [merge_prompts(prompts, merge)]
        return prior, MultiShardPrompt(unet, prompts)
    adapters = [read_peft_adapter(a.directory) for a in stored]
    if merge is not None:  # one model whose LoRA delta is the lambda-weighted sum of the shards'
        adapters = [merge_adapters(adapters, merge)]
    return prior, MultiShardUNet(unet, adapters)


def conditioning(
    cfg: DictConfig,
    composition: C.Composition,
    available: list[int],
    shards: list[int],
    manifests: dict[int, dict],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(P(shard | label), label pool) for a class-conditional model, else (None, None)."""
    if cfg.get("prompts") is not None and not is_text_data(cfg.data):
        raise ValueError(
            "prompts=... needs a text model (data.conditioning=text): drop prompts= or use "
            "data=captioned backbone=text_conditional"
        )
    if not cfg.data.conditional:
        return None, None
    one_model = composition.paragon or composition.base
    label_prior = None if one_model else shard_label_prior(cfg, shards, manifests)
    if cfg.labels is not None:
        return label_prior, torch.tensor(list(cfg.labels))
    owners = available if one_model else shards
    return label_prior, torch.tensor(sorted({c for k in owners for c in manifests[k]["classes"]}))


def prompt_list(cfg: DictConfig, dataset: Any) -> list[dict]:
    """A text model's prompts (``prompts``): null = the test split's captions in order; a list of
    captions; or a text file, one caption a line. Each is ``{"caption", "test_row", "id"}``:
    ``test_row`` = its place in the test split when it is a test caption (TIFA's questions come
    from that row's attributes), else null."""
    rows = [i for i in range(len(dataset)) if dataset.splits[i] == "test"]
    spec = cfg.get("prompts")
    if spec is None:
        if not rows:
            raise ValueError(
                f"dataset {dataset.name!r} has no test split to take prompts from: pass "
                "prompts=<file, one caption a line> or prompts='[\"a red 7 on the left\"]'"
            )
        captions = [dataset.captions[i] for i in rows]
    elif isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompts={spec}: no such file (one caption a line)")
        captions = read_captions(path)
    else:
        captions = [str(c) for c in spec]
    if not captions:
        raise ValueError(f"prompts={spec}: no captions; give at least one")
    first = {}
    for k, i in enumerate(rows):
        first.setdefault(dataset.captions[i], k)
    return [
        {"caption": c, "test_row": first.get(c),
         "id": None if c not in first else dataset.ids[rows[first[c]]]}
        for c in captions
    ]  # fmt: skip


def load_composition_router(
    kind: str,
    cfg: DictConfig,
    store: ArtifactStore,
    shards: list[int],
    manifests: dict[int, dict],
    backbone: torch.nn.Module,
    backbone_card: dict,
    device: torch.device,
) -> RouterParts:
    """The router a composition names (``Composition.router``): classifier | compartmental (the
    composed shards' own heads) | knn."""
    if kind == "compartmental":
        router, parents = load_heads(
            store, cfg.experiment_name, shards, manifests, copy.deepcopy(backbone),
            backbone_card["backbone_hash"],
        )  # fmt: skip
        return RouterParts(router.to(device), None, parents)
    if kind == "classifier":
        return classifier_router(cfg, store, shards, manifests, backbone, backbone_card, device)
    if kind == "knn":
        return knn_router(cfg, store, shards, manifests)
    raise ValueError(
        f"a composition asks for router {kind!r}: cdm has routers classifier | compartmental | knn"
    )


def classifier_router(
    cfg: DictConfig,
    store: ArtifactStore,
    shards: list[int],
    manifests: dict[int, dict],
    backbone: torch.nn.Module,
    backbone_card: dict,
    device: torch.device,
) -> RouterParts:
    """The classifier router's logits of the allowed shards, checked to be trained on these shards."""
    router, card = load_router_model(
        store, cfg.experiment_name, cfg.router_name, backbone=copy.deepcopy(backbone),
        expected_backbone_hash=backbone_card["backbone_hash"],
    )  # fmt: skip
    trained = {m["name"]: m["hash"] for m in card["shard_manifests"]}
    current = {job_name("shard", k): m["hash"] for k, m in manifests.items()}
    if trained != current:
        raise StoreError(
            f"router {cfg.router_name!r} was trained on other shard data than the current shards "
            f"(manifests changed or shards were added/forgotten): retrain it with "
            f"cdm-train experiment={cfg.experiment_name} stage=router retrain=true"
        )
    order = [m["name"] for m in card["shard_manifests"]]
    parent = {"kind": "router", "name": cfg.router_name, "hash": card["weights_sha256"]}
    router.to(device)
    columns = torch.tensor([order.index(job_name("shard", k)) for k in shards])
    log_prior = torch.tensor(card["train_log_prior"], dtype=torch.float32)

    def logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # of the allowed shards
        return router(x, t)[:, columns]

    return RouterParts(logits, log_prior[columns], [parent])


def knn_router(
    cfg: DictConfig, store: ArtifactStore, shards: list[int], manifests: dict[int, dict]
) -> RouterParts:
    """k-NN router over the allowed shards' centroids; Tweedie's x_0 from the bare backbone (a
    text model's: with the null caption), decoded to pixels when the backbone has a codec."""
    centroids, parents, cards = [], [], []
    for k in shards:
        c, card = load_centroids(store, cfg.experiment_name, cfg.knn.name, job_name("shard", k))
        cards.append(card)
        parents.append(
            {"kind": "knn_centroids", "name": f"{cfg.knn.name}/{job_name('shard', k)}",
             "hash": card["weights_sha256"]}
        )  # fmt: skip
        if card["manifest_hash"] != manifests[k]["hash"]:
            raise StoreError(
                f"k-NN centroids of {job_name('shard', k)} were computed on other data: recompute "
                f"with cdm-train experiment={cfg.experiment_name} stage=knn retrain=true"
            )
        centroids.append(c)
    bare, _ = store.load_backbone(cfg.backbone.id, UNET_CLASSES[cfg.backbone.kind])
    bare.eval()
    alphas = build_scheduler(
        OmegaConf.to_container(cfg.backbone.scheduler, resolve=True)
    ).alphas_cumprod
    embedder, embedder_parents = knn_embedder(cfg, store, load_data(cfg))
    for k, c in zip(shards, cards, strict=True):  # centroids embedded by another feature net
        if {p["hash"] for p in c.get("parents", [])} != {p["hash"] for p in embedder_parents}:
            raise StoreError(
                f"k-NN centroids {cfg.knn.name}/{job_name('shard', k)} were embedded by another "
                f"version of their feature net (e.g. before it was retrained after cdm-forget): "
                f"recompute with cdm-train experiment={cfg.experiment_name} stage=knn "
                f"knn={cfg.knn.name} retrain=true"
            )
    if is_text_data(cfg.data):  # x0_hat from the null caption, as guidance's unconditional eps
        attach_contexts(bare, caption_table(text_encoder_of(cfg.backbone), []))
    null = null_label(bare)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = None if null is None else torch.full((x.shape[0],), null, device=x.device)
        return predict_epsilon(bare, x, t, labels)

    codec = latent_codec(cfg.backbone)  # latent x0_hat is decoded to the centroids' pixels
    router = KNNRouter(
        embedder, centroids, eps_fn, alphas, float(cfg.knn.temperature),
        decode=None if codec is None else codec.decode,
    )  # fmt: skip
    return RouterParts(router, None, parents + embedder_parents)


def shard_label_prior(
    cfg: DictConfig, shards: list[int], manifests: dict[int, dict]
) -> torch.Tensor:
    """P(shard | label) [num_classes + 1, n] from each allowed shard's label counts.

    A label no allowed shard holds (and the null label) falls back to the shard sizes.
    """
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
