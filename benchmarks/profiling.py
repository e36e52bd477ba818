"""Where a step's time goes: torch.profiler over a few calls, kernels grouped into families.

``profile_calls`` is shared by ``compose_step.py`` and ``train_step.py``. Its ``families`` answer
the question issue 16 asks of every missed goal (launch- or compute-bound, and bound by what):
convolutions, matmuls, attention, normalization, cuDNN's layout conversions, inductor's fused
Triton kernels, plain elementwise kernels, casts and copies, the optimizer. The same names group
the CPU's aten ops, so a CPU run and a GPU run read alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# First match wins, on the lower-cased kernel (CUDA) or op (CPU) name. Inductor's kernels are
# named triton_{poi,red,per}_fused_<ops>: a fused kernel that normalizes is "norm (triton)", any
# other "fused (triton)", before "conv" could match a convolution fused into the name.
KERNEL_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(pattern))
    for family, pattern in (
        ("norm (triton)", r"^triton_.*(group_norm|layer_norm|batch_norm)"),
        ("fused (triton)", r"^triton_"),
        ("layout", r"nchwtonhwc|nhwctonchw|nchw2nhwc|nhwc2nchw"),
        ("attention", r"flash|fmha|attention|sdpa"),
        ("conv", r"conv|fprop|dgrad|wgrad|winograd|cudnn"),
        ("gemm", r"gemm|cutlass|cublas|s16816|splitk|\b(mm|bmm|addmm|baddbmm|matmul|linear)\b"),
        (
            "norm",
            r"group_?norm|layer_?norm|batch_?norm|rowwisemoments|fusedparams|gammabeta"
            r"|computeinternalgradients",
        ),  # fmt: skip
        ("optimizer", r"adam|multi_tensor_apply|_foreach_|lerp"),
        ("copy", r"copy|memcpy|_to_copy|\bcat\b|catarray|clone|contiguous"),
        ("alloc / fill", r"memset|fill|zero_|aten::(empty|resize_)"),
        ("elementwise", r"elementwise|reduce_kernel|reduce|aten::"),
    )
)


def kernel_family(name: str) -> str:
    """The family of a CUDA kernel or an aten op by its profiler name (``other`` if none fits)."""
    low = name.lower()
    for family, pattern in KERNEL_FAMILIES:
        if pattern.search(low):
            return family
    return "other"


def profile_calls(
    fn: Callable[[], Any], calls: int, cuda: bool, top: int = 12, origins: str | None = None
) -> dict[str, Any]:
    """Wall time and (on CUDA) summed kernel time per call of ``fn`` under torch.profiler.

    ``busy`` = kernel time / wall time: near 1 the step is compute- (or memory-) bound, far below
    1 it is launch-bound (the GPU waits for the host). ``top``: the kernels (CUDA) or ops (CPU)
    with the most self time, ms per call. ``families``: the same self time summed per
    ``kernel_family``, as [family, ms per call, launches per call, share of the summed time].
    Kernels replayed from a CUDA graph are reported only where the profiler sees inside graphs
    (recent CUDA); otherwise ``kernel_ms`` is ~0 for them. On CUDA only the kernels' own rows
    are summed: an aten op's row carries the device time of the kernels it launched as well, so
    summing both counted every kernel twice (``kernel_rows``; the train_step GPU JSONs of
    2026-11-30 in docs/benchmarks hold about twice the kernel time, docs/benchmarks.md corrects).

    ``origins`` (an aten op name such as ``aten::copy_``): also record shapes, and list where
    that op's device time comes from as [caller chain, input shapes, ms per call, calls per
    call], the callers being the op's enclosing profiler ranges, innermost first.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=origins is not None) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start) / calls
    rows = kernel_rows(prof.key_averages()) if cuda else prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy = sorted((r for r in rows if getattr(r, key) > 0), key=lambda r: -getattr(r, key))
    kernel_ms = sum(r.self_device_time_total for r in rows) / 1e3 / calls if cuda else None
    families: dict[str, list[float]] = {}
    for r in busy:
        ms_launches = families.setdefault(kernel_family(r.key), [0.0, 0.0])
        ms_launches[0] += getattr(r, key) / 1e3 / calls
        ms_launches[1] += r.count / calls
    summed = sum(ms for ms, _ in families.values()) or 1.0
    report = {
        "calls": calls,
        "wall_ms": round(wall_ms, 3),
        "kernel_ms": None if kernel_ms is None else round(kernel_ms, 3),
        "busy": None if kernel_ms is None else round(kernel_ms / wall_ms, 4),
        "top": [
            [r.key[:100], round(getattr(r, key) / 1e3 / calls, 4), r.count // calls]
            for r in busy[:top]
        ],
        "families": [
            [family, round(ms, 4), round(launches, 1), round(ms / summed, 4)]
            for family, (ms, launches) in sorted(families.items(), key=lambda kv: -kv[1][0])
        ],
    }
    if origins is not None:
        report["origins"] = {origins: op_origins(prof.events(), origins, calls, cuda, top)}
    return report


def kernel_rows(rows: Any) -> list[Any]:
    """The profiler rows that are kernels (or memcpy/memset) run on the device: not the aten ops
    that launched them, nor the ranges around them (inductor's ``## Call CompiledFxGraph ##``),
    whose device time is that of the kernels inside, so summing them counts kernels twice."""
    return [
        r
        for r in rows
        if r.device_type != DeviceType.CPU
        and not getattr(r, "is_user_annotation", False)
        and not r.key.startswith("## ")
    ]


def op_origins(events: Any, op: str, calls: int, cuda: bool, top: int) -> list[list[Any]]:
    """Where ``op``'s time comes from: its events grouped by enclosing ranges and input shapes."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    grouped: dict[tuple[str, str], list[float]] = {}
    for event in events:
        if event.name != op or getattr(event, key) <= 0:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 4:
            chain.append(parent.name[:60])
            parent = parent.cpu_parent
        ms_count = grouped.setdefault((" < ".join(chain), str(event.input_shapes)), [0.0, 0.0])
        ms_count[0] += getattr(event, key) / 1e3 / calls
        ms_count[1] += 1 / calls
    ranked = sorted(grouped.items(), key=lambda kv: -kv[1][0])[:top]
    return [[chain, shapes, round(ms, 4), round(n, 1)] for (chain, shapes), (ms, n) in ranked]
