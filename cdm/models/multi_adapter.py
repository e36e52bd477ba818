"""Many shards' LoRA adapters on one backbone, evaluated in ONE batched forward.

Every LoRA-targeted layer of the backbone is wrapped by a grouped layer that holds the stacked
factors A [n, r, ...] and B [n, out, r] of all shards. A batch carries a shard index per sample;
the grouped layer computes ``base(x) + scale_k * B_k A_k x`` with sample b's own shard k in one
kernel per layer whatever the number of shards: x is projected by all shards' A at once (n*r
output channels, cheap since r is small), each sample keeps its own r-slice, and a batched
product applies its own B. When the whole batch uses one shard, the layer runs exactly peft's
ops (``lora_B(lora_A(x)) * scaling`` added to the base output), so a single shard reproduces the
plain peft adapter bit for bit.

Full fine-tuned shards (``adapter=full``: a whole copy of the backbone each) cannot share one
forward; ``MultiShardFull`` gives them the same interface and runs one forward per shard present
in the batch.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cdm.core.composition import merge_lora_weights
from cdm.models.backbone import predict_epsilon

PEFT_PREFIX = "base_model.model."


class ShardSelection:
    """The per-sample shard indices of the current forward, shared by all grouped layers."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # [B] shard of each sample
        self.used: torch.Tensor | None = None  # sorted distinct shards of the batch
        self.position: torch.Tensor | None = None  # [B] position of each sample's shard in `used`
        self.single: int | None = None  # set when the whole batch uses one shard
        self.blocks: int | None = (
            None  # set when the batch is equal contiguous blocks, one per used shard
        )


class GroupedLoRA(nn.Module):
    """A frozen base layer (nn.Linear or nn.Conv2d) plus n shards' LoRA factors."""

    def __init__(
        self,
        base: nn.Module,
        lora_a: Sequence[torch.Tensor | None],
        lora_b: Sequence[torch.Tensor | None],
        scaling: Sequence[float],
        selection: ShardSelection,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear | nn.Conv2d):
            raise TypeError(
                f"grouped LoRA supports nn.Linear and nn.Conv2d, not {type(base).__name__}"
            )
        self.base = base
        self.selection = selection
        rank = max(a.shape[0] for a in lora_a if a is not None)
        like = next(a for a in lora_a if a is not None)
        a_shape = (rank, *like.shape[1:])
        out = base.out_channels if isinstance(base, nn.Conv2d) else base.out_features
        a_list, b_list, present = [], [], []
        for a, b in zip(lora_a, lora_b, strict=True):
            if a is None:  # this shard did not adapt this layer: zero factors add nothing
                a_list.append(like.new_zeros(a_shape))
                b_list.append(like.new_zeros(out, rank))
                present.append(False)
                continue
            r = a.shape[0]
            a_list.append(F.pad(a, [0] * (2 * (a.dim() - 1)) + [0, rank - r]))
            b_list.append(F.pad(b.reshape(out, r), (0, rank - r)))
            present.append(True)
        self.rank = rank
        self.register_buffer("lora_a", torch.stack(a_list))  # [n, r, in(, k, k)]
        self.register_buffer("lora_b", torch.stack(b_list))  # [n, out, r]
        self.register_buffer("scaling", torch.tensor(list(scaling), dtype=torch.float32))
        self.present = present
        self.unpadded = [None if a is None else a.shape[0] for a in lora_a]

    def _project_a(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, nn.Conv2d):
            b = self.base
            return F.conv2d(x, weight, None, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, weight)

    def _single(self, x: torch.Tensor, k: int, result: torch.Tensor) -> torch.Tensor:
        """peft's own computation for one shard: result + lora_B(lora_A(x)) * scaling."""
        if not self.present[k]:
            return result
        r = self.unpadded[k]
        a = self.lora_a[k, :r]
        h = self._project_a(x, a)
        if isinstance(self.base, nn.Conv2d):
            delta = F.conv2d(h, self.lora_b[k, :, :r, None, None])
        else:
            delta = F.linear(h, self.lora_b[k, :, :r])
        return result + delta * float(self.scaling[k])

    def _blocks(self, x: torch.Tensor, used: torch.Tensor, blocks: int) -> torch.Tensor:
        """LoRA deltas when the batch is ``blocks`` equal contiguous groups, group j of shard used[j].

        Each group meets only its own shard's factors (grouped conv / batched matmul): the same
        FLOPs as a loop over shards, in one kernel per factor.
        """
        a = self.lora_a[used]  # [u, r, in(, k, k)]
        b = self.lora_b[used] * self.scaling[used].to(x.dtype)[:, None, None]  # [u, out, r]
        u, r = a.shape[0], self.rank
        m = x.shape[0] // blocks
        if isinstance(self.base, nn.Conv2d):
            c, h, w = x.shape[1:]
            xg = x.view(u, m, c, h, w).transpose(0, 1).reshape(m, u * c, h, w)
            base = self.base
            hid = F.conv2d(
                xg,
                a.reshape(u * r, *a.shape[2:]),
                None,
                base.stride,
                base.padding,
                base.dilation,
                groups=u,
            )
            out = F.conv2d(hid, b.reshape(-1, r, 1, 1), groups=u)  # [m, u*out, H', W']
            o, hh, ww = b.shape[1], out.shape[-2], out.shape[-1]
            return out.view(m, u, o, hh, ww).transpose(0, 1).reshape(u * m, o, hh, ww)
        xs = x.reshape(u, -1, x.shape[-1])  # [u, m*S, in]
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # [u, m*S, out]
        return delta.reshape(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        sel = self.selection
        if sel.single is not None:
            return self._single(x, sel.single, result)
        if sel.blocks is not None:
            return result + self._blocks(x, sel.used, sel.blocks)
        index, used, position = sel.index, sel.used, sel.position
        n, r = used.numel(), self.rank
        a = self.lora_a[used]  # only the shards in this batch: no other adapter is touched
        h = self._project_a(x, a.reshape(n * r, *a.shape[2:]))
        b_sel = self.lora_b[index] * self.scaling[index].to(x.dtype)[:, None, None]  # [B, out, r]
        rows = torch.arange(x.shape[0], device=x.device)
        if isinstance(self.base, nn.Conv2d):
            bsz, _, hh, ww = h.shape
            h = h.view(bsz, n, r, hh, ww)[rows, position]  # [B, r, H, W]
            delta = torch.einsum("brhw,bor->bohw", h, b_sel)
        else:
            shape = h.shape
            h = h.view(shape[0], -1, n, r)[rows, :, position]  # [B, S, r]
            delta = torch.einsum("bsr,bor->bso", h, b_sel).reshape(*shape[:-1], -1)
        return result + delta


def check_shard_index(x_t: torch.Tensor, shard_index: torch.Tensor, n_shards: int) -> None:
    """Refuse a ``shard_index`` that is not one shard in [0, n_shards) per sample of ``x_t``."""
    if shard_index.shape != (x_t.shape[0],):
        raise ValueError(
            f"shard_index must have shape ({x_t.shape[0]},), got {tuple(shard_index.shape)}"
        )
    if int(shard_index.min()) < 0 or int(shard_index.max()) >= n_shards:
        raise ValueError(f"shard_index must lie in [0, {n_shards}), got {shard_index.tolist()}")


def read_peft_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter_config) of a standard peft LoRA folder (safetensors only)."""
    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    return load_file(directory / "adapter_model.safetensors"), config


def _scaling(config: Mapping) -> float:
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / (r**0.5) if config.get("use_rslora") else alpha / r


LORA_PATHS = ("grouped", "stacked")


class MultiShardUNet(nn.Module):
    """The backbone with n shards' adapters: ``forward(x_t, t, labels, shard_index) -> eps``.

    ``shard_index`` gives each sample's shard; the whole batch is one forward pass.
    ``lora_path`` picks how the static-shape forwards (``dense``, ``pairs``) apply the factors:
    ``grouped``, each block of rows meets only its own shard's A and B (grouped conv / batched
    matmul: one shard's FLOPs per row); ``stacked``, every row is projected by all n shards' A at
    once (one dense conv or matmul with n*r outputs, n times the A FLOPs), keeps its own r-slice
    and meets its own B. Which is faster is a property of the GPU's kernels (benchmarks/
    compose_step.py times both); the results agree to float rounding.
    """

    def __init__(
        self,
        unet: nn.Module,
        adapters: Sequence[tuple[Mapping[str, torch.Tensor], Mapping]],
        lora_path: str = "grouped",
    ) -> None:
        super().__init__()
        if lora_path not in LORA_PATHS:
            raise ValueError(f"lora_path must be one of {LORA_PATHS}, got {lora_path!r}")
        self.lora_path = lora_path
        if not adapters:
            raise ValueError("MultiShardUNet needs at least one adapter")
        if any(config.get("use_dora") for _, config in adapters):
            raise ValueError("DoRA adapters are not supported by the grouped forward")
        unet.requires_grad_(False).eval()
        self.unet = unet
        self.n_shards = len(adapters)
        self.selection = ShardSelection()
        targets: set[str] = set()
        for state, _ in adapters:
            targets |= {
                k[len(PEFT_PREFIX) :].rsplit(".lora_A", 1)[0] for k in state if ".lora_A." in k
            }
        if not targets:
            raise ValueError("the adapters hold no LoRA weights (no '*.lora_A.weight' keys)")
        modules = dict(unet.named_modules())
        for name in sorted(targets):
            if name not in modules:
                raise ValueError(
                    f"adapter layer {name!r} does not exist in this backbone: wrong backbone?"
                )
            a = [s.get(f"{PEFT_PREFIX}{name}.lora_A.weight") for s, _ in adapters]
            b = [s.get(f"{PEFT_PREFIX}{name}.lora_B.weight") for s, _ in adapters]
            scales = [_scaling(c) for _, c in adapters]
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else unet
            setattr(parent, child, GroupedLoRA(modules[name], a, b, scales, self.selection))

    @classmethod
    def from_dirs(
        cls, unet: nn.Module, directories: Sequence[str | Path], lora_path: str = "grouped"
    ) -> MultiShardUNet:
        """Build from peft adapter folders (e.g. the store's ``shards/shard-KK``)."""
        return cls(unet, [read_peft_adapter(d) for d in directories], lora_path)

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        shard_index: torch.Tensor,
    ) -> torch.Tensor:
        check_shard_index(x_t, shard_index, self.n_shards)
        sel = self.selection
        used = torch.unique(shard_index)
        sel.single = int(used[0]) if used.numel() == 1 else None
        sel.index = shard_index.to(x_t.device)
        sel.used = used.to(x_t.device)
        sel.position = torch.searchsorted(used, shard_index).to(x_t.device)
        sel.blocks = None
        if sel.single is None and len(shard_index) % used.numel() == 0:
            expected = used.repeat_interleave(len(shard_index) // used.numel())
            if torch.equal(shard_index.cpu(), expected.cpu()):
                sel.blocks = used.numel()
        try:
            return predict_epsilon(self.unet, x_t, timesteps, labels)
        finally:
            sel.index = sel.used = sel.position = sel.single = sel.blocks = None

    def dense(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Every shard's epsilon for every sample, ``[n, B, C, H, W]``: the n*B pairs as n
        contiguous blocks, one per shard, in one forward with no host synchronisation (so a
        CUDA graph can capture it, ``GraphedDense``)."""
        n, batch = self.n_shards, x_t.shape[0]
        y = None if labels is None else labels.repeat(n)
        x = x_t.repeat(n, *([1] * (x_t.dim() - 1)))
        # blocks even for n = 1: the single-shard path reads a scale on the host
        eps = self._blocks_forward(x, timesteps.repeat(n), y, torch.arange(n, device=x.device))
        return eps.view(n, batch, *eps.shape[1:])

    def _blocks_forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        used: torch.Tensor,
    ) -> torch.Tensor:
        """eps of ``len(used)`` equal contiguous blocks of rows, block j with shard ``used[j]``, in
        one forward with no host synchronisation (``lora_path``: grouped or stacked factors)."""
        sel = self.selection
        if self.lora_path == "stacked":  # every shard's A for every row, each row's own slice
            sel.used = torch.arange(self.n_shards, device=used.device)
            sel.index = sel.position = used.repeat_interleave(x.shape[0] // used.numel())
        else:
            sel.used, sel.blocks = used, used.numel()
        try:
            return predict_epsilon(self.unet, x, timesteps, labels)
        finally:
            sel.index = sel.used = sel.position = sel.single = sel.blocks = None

    def pairs(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        shard_of_pair: torch.Tensor,
    ) -> torch.Tensor:
        """eps of k (sample, shard) pairs per sample, ``[B, k, C, H, W]``; pair j of sample b
        uses shard ``shard_of_pair[b, j]`` (a [B, k] tensor on the model's device).

        The B*k pairs are one forward of B*k rows, each row meeting its own shard's factors
        (``lora_path``: blocks of one row, or every shard's A stacked), with static shapes and no
        host synchronisation, so a CUDA graph captures it (``GraphedPairs``): top-k with a static
        capacity of k pairs per sample. Indices are not checked here (a check would synchronise);
        ``ComposedDenoiser`` builds them from its own weights.
        """
        batch, k = shard_of_pair.shape
        x, t = x_t.repeat_interleave(k, dim=0), timesteps.repeat_interleave(k)
        y = None if labels is None else labels.repeat_interleave(k)
        eps = self._blocks_forward(x, t, y, shard_of_pair.reshape(-1))
        return eps.view(batch, k, *eps.shape[1:])

    def mixed_pairs(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        shard_of_pair: torch.Tensor,
        weight_of_pair: torch.Tensor,
    ) -> torch.Tensor:
        """sum_j w[b, j] eps_{shard[b, j]}(x_t[b]) (Prop. 3.1 over the selected pairs), ``[B, C, H,
        W]``: ``pairs`` and the mixing in one static-shape call."""
        eps = self.pairs(x_t, timesteps, labels, shard_of_pair)
        mix = weight_of_pair.to(eps.dtype).reshape(*weight_of_pair.shape, *[1] * (eps.dim() - 2))
        return (eps * mix).sum(1)


class GraphedCall:
    """``fn(*tensors)`` captured in one CUDA graph per input signature (shapes, None pattern,
    autocast), replayed at every later call.

    A composed step is then one graph replay: the eager step is launch-bound on a GPU (docs/
    benchmarks.md), so this removes its host cost. ``fn`` must take tensors (or None) of static
    shapes and synchronise nothing with the host; inputs are copied into static buffers and the
    returned tensor is a static output, valid until the next call. CUDA only. (torch.compile's
    ``reduce-overhead`` mode graphs too, but only a compiled model; a plain capture also takes
    the eager kernels, and ``GraphedCall(torch.compile(fn))`` the compiled ones.)
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        first = next(x for x in inputs if x is not None)
        if first.device.type != "cuda":
            raise ValueError(
                f"{type(self).__name__} needs CUDA tensors; call the model's eager method on the CPU"
            )
        shapes = tuple(None if x is None else (tuple(x.shape), x.dtype) for x in inputs)
        key = (shapes, torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            static = [None if x is None else x.clone() for x in inputs]
            # under autocast, casts must be recorded in the graph, not served from its cache
            amp = torch.autocast(
                "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=key[1], cache_enabled=False
            )
            torch.clear_autocast_cache()  # casts cached by eager calls around us stay out of it
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), amp:
                for _ in range(2):  # warm-up: lazy initialisation outside the graph
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), amp:
                out = self.fn(*static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buffer, x in zip(static, inputs, strict=True):
            if x is not None:
                buffer.copy_(x)
        graph.replay()
        return out


def compile_static(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled by inductor for static shapes: fused elementwise kernels, no layout
    conversions around the convs (8 shards on an H200: 14.3 ms per graphed step against 25.9 ms
    uncompiled, docs/benchmarks.md). The first call of each shape compiles (about a minute)."""
    return torch.compile(fn, dynamic=False)


class GraphedDense(GraphedCall):
    """``MultiShardUNet.dense`` (every pair) as one CUDA graph replay per input shape; with
    ``compile_step=True`` the graph captures the inductor-compiled step."""

    def __init__(self, model: MultiShardUNet | MultiShardFull, compile_step: bool = False) -> None:
        super().__init__(compile_static(model.dense) if compile_step else model.dense)


class GraphedPairs(GraphedCall):
    """``MultiShardUNet.mixed_pairs`` (a static capacity of k pairs per sample, mixed) as one
    CUDA graph replay per input shape: top-k and random selection with static shapes; with
    ``compile_step=True`` the graph captures the inductor-compiled step."""

    def __init__(self, model: MultiShardUNet, compile_step: bool = False) -> None:
        super().__init__(compile_static(model.mixed_pairs) if compile_step else model.mixed_pairs)


def merge_adapters(
    adapters: Sequence[tuple[Mapping[str, torch.Tensor], Mapping]], weights: Sequence[float]
) -> tuple[dict[str, torch.Tensor], dict]:
    """One adapter whose delta is sum_i w_i s_i B_i A_i: the weight-space merge baseline.

    Merging in weight space (Diffusion-Soup style) averages the adapters' *deltas*; averaging A
    and B separately would add cross terms B_i A_j. The merged factors are the concatenations
    A = [A_1; ...; A_n], B = [w_1 s_1 B_1, ..., w_n s_n B_n] (rank sum_i r_i, scaling 1), so the
    merged layer is exactly base(x) + sum_i w_i s_i B_i A_i x. For use inside cdm (ranks may
    differ per layer), not a peft folder.
    """
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} merge weights")
    layers = sorted(
        {k.rsplit(".lora_A", 1)[0] for state, _ in adapters for k in state if ".lora_A." in k}
    )
    merged: dict[str, torch.Tensor] = {}
    for layer in layers:
        a_parts, b_parts = [], []
        for (state, config), w in zip(adapters, weights, strict=True):
            a = state.get(f"{layer}.lora_A.weight")
            if a is None:
                continue
            a_parts.append(a)
            b_parts.append(state[f"{layer}.lora_B.weight"] * (float(w) * _scaling(config)))
        merged[f"{layer}.lora_A.weight"] = torch.cat(a_parts, dim=0)
        merged[f"{layer}.lora_B.weight"] = torch.cat(b_parts, dim=1)
    return merged, {"r": 1, "lora_alpha": 1}


def read_full_model(directory: str | Path, like: nn.Module) -> nn.Module:
    """A full fine-tuned shard (a diffusers ``save_pretrained`` folder) as a model of ``like``'s
    class (the backbone's), in eval mode and frozen."""
    model = type(like).from_pretrained(str(directory), local_files_only=True)
    return model.requires_grad_(False).eval()


class MultiShardFull(nn.Module):
    """n full fine-tuned copies of the backbone behind ``MultiShardUNet``'s interface:
    ``forward(x_t, t, labels, shard_index) -> eps`` takes each sample's epsilon from its own
    shard's copy, one forward per shard present in the batch (no other copy is run)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("MultiShardFull needs at least one model")
        self.shards = nn.ModuleList(m.requires_grad_(False).eval() for m in models)
        self.n_shards = len(models)

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor | None,
        shard_index: torch.Tensor,
    ) -> torch.Tensor:
        check_shard_index(x_t, shard_index, self.n_shards)
        used = torch.unique(shard_index).tolist()
        if len(used) == 1:  # the whole batch on one copy: exactly that model's forward
            return predict_epsilon(self.shards[used[0]], x_t, timesteps, labels)
        out: torch.Tensor | None = None
        for k in used:
            rows = torch.nonzero(shard_index == k).squeeze(1).to(x_t.device)
            y = None if labels is None else labels[rows]
            eps = predict_epsilon(self.shards[k], x_t[rows], timesteps[rows], y)
            if out is None:
                out = eps.new_empty((x_t.shape[0], *eps.shape[1:]))
            out[rows] = eps
        return out

    def dense(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Every shard's epsilon for every sample, ``[n, B, C, H, W]`` (one forward per copy)."""
        return torch.stack([predict_epsilon(m, x_t, timesteps, labels) for m in self.shards])


def merge_full(models: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """One model whose weights are sum_i w_i theta_i: the weight-space merge of full fine-tuned
    shards (Diffusion-Soup style; the copies share the backbone's architecture), through
    ``cdm.core.composition.merge_lora_weights`` (float64 sums, other tensors must agree)."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"{len(models)} models but {len(weights)} merge weights")
    merged = merge_lora_weights([m.state_dict() for m in models], list(weights))
    model = copy.deepcopy(models[0])
    model.load_state_dict(merged)
    return model
