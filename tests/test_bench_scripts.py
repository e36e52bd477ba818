"""``benchmarks/compose_step.py`` and ``benchmarks/train_step.py`` at tiny size on the CPU: the
flags the GPU run uses (benchmarks/gpu_run.sh) parse, and what the scripts check holds (no
timing is asserted)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def run(script: str, *args: str, out: Path) -> dict:
    cmd = [sys.executable, f"benchmarks/{script}", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())


def test_compose_step_static_topk_matches_and_profiles(tmp_path):
    result = run(
        "compose_step.py", "--preset", "tiny", "--batch-size", "4", "--shards", "1", "3",
        "--rounds", "1", "--iters", "1", "--warmup", "1", "--steps", "3", "--profile",
        out=tmp_path / "compose.json",
    )  # fmt: skip
    for n in ("1", "3"):
        row = result["results"][n]
        assert row["allclose"], row
        # k pairs per sample, padded, give the kept-pairs trajectory's x_0
        assert row["max_abs_diff_topk_static_vs_topk_x0"] < 1e-4
        assert row["topk_static"]["ms"] > 0 and 1 <= row["topk_mean_kept_per_sample"] <= 2
    assert result["config"]["methods"][-1] == "bare_nB" and result["config"]["errors"] == {}
    profile = result["results"]["profile"]
    assert profile["n"] == 3 and set(profile) == {"n", "one_adapter", "grouped", "bare_nB"}
    assert all(
        p["wall_ms"] > 0 and p["top"] and p["kernel_ms"] is None
        for k, p in profile.items()
        if k != "n"
    )


def test_train_step_unsynced_profiled_losses_agree(tmp_path):
    census = run(
        "train_census.py", "--preset", "tiny", "--batch-size", "8", "--norm-dtype", "bf16",
        out=tmp_path / "census.json",
    )["results"]["step"]  # fmt: skip
    result = run(
        "train_step.py", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--rounds", "1", "--unsynced", "--cudnn-benchmark", "--profile", "--precision", "bf16",
        "--norm-dtype", "bf16", "--census", str(tmp_path / "census.json"), "--pin-memory",
        out=tmp_path / "train.json",
    )  # fmt: skip
    report = result["results"]
    beside = report["profile_vs_census"]
    assert beside["conv"]["floor_ms"] == census["families"]["conv"]["floor_ms"]
    assert beside["all kernels"]["floor_ms"] == census["floor"]["unfused"]["ms"]
    profiled = sum(ms for _, ms, _, _ in report["profile_bare_step"]["families"])
    parts = sum(beside[k]["ms"] for k in ("conv", "gemm", "attention", "everything else"))
    assert abs(parts - profiled) < 1e-2 and abs(beside["all kernels"]["ms"] - profiled) < 1e-2
    # ours (bf16-mixed under Lightning) and the bare loop (autocast) train the same weights
    assert report["max_abs_loss_diff"] == 0.0
    assert report["ours"]["period_ms"] > 0 and report["bare"]["period_ms"] > 0
    top = [name for name, _, _ in report["profile_bare_step"]["top"]]
    assert any("convolution" in name for name in top), top
    families = {f: (ms, share) for f, ms, _, share in report["profile_bare_step"]["families"]}
    assert {"conv", "gemm", "norm"} <= set(families), families
    assert abs(sum(share for _, share in families.values()) - 1) < 0.01
    # where the copies come from: each with the ranges around it and its shapes
    origins = report["profile_bare_step"]["origins"]["aten::copy_"]
    assert origins and all(
        chain and shapes.startswith("[[") and ms > 0 for chain, shapes, ms, _ in origins
    )
    assert sum(ms for _, _, ms, _ in origins) <= families["copy"][0] + 1e-3


# Kernel names as the H200's profiler printed them (docs/benchmarks/compose_step-cuda-h200.json),
# inductor's Triton kernels and the CPU's aten ops
NAMED_KERNELS = {
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_64x64": "conv",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x64x64": "conv",
    "void implicit_convolve_sgemm<__nv_bfloat16, __nv_bfloat16, 1024, 5, 5, 3, 3, 3": "conv",
    "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16": "layout",
    "void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16": "layout",
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long": "norm",
    "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda": "copy",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::nat": (
        "elementwise"
    ),
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4": "attention",
    "void at::native::(anonymous namespace)::Compute1dBackwardFusedParamsCUDAKernel<float": "norm",
    "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel1<float>": "norm",
    "void cudnn::winograd_nonfused::winogradForwardData4x4<float, __half>": "conv",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn": "gemm",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float": "gemm",
    "triton_red_fused_native_group_norm_silu_3": "norm (triton)",
    "triton_poi_fused_add_convolution_mul_7": "fused (triton)",
    "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor": "optimizer",
    "Memcpy HtoD (Pageable -> Device)": "copy",
    "aten::mkldnn_convolution": "conv",
    "aten::convolution_backward": "conv",
    "aten::addmm": "gemm",
    "aten::native_group_norm_backward": "norm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::silu_backward": "elementwise",
    "aten::_to_copy": "copy",
    "aten::_fused_adamw_": "optimizer",
    "aten::empty": "alloc / fill",
}


def test_kernels_are_grouped_into_the_families_the_docs_read():
    sys.path.insert(0, str(ROOT))
    from benchmarks.profiling import kernel_family

    assert {name: kernel_family(name) for name in NAMED_KERNELS} == NAMED_KERNELS


def test_layout_opt_without_compile_is_refused_in_one_line():
    cmd = [sys.executable, "benchmarks/train_step.py", "--layout-opt", "--out", "/nonexistent/x"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--layout-opt is an inductor option: add --compile" in proc.stderr.splitlines()[-1]


def test_kernel_time_sums_kernels_once():
    """A kernel's time shows three times in the profiler's rows: its own row, the aten op that
    launched it and the range around a compiled graph. Only the first is summed."""
    sys.path.insert(0, str(ROOT))
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profiling import kernel_rows

    def row(key, device_type, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, is_user_annotation=annotation)

    kernel = row("sm90_xmma_fprop_implicit_gemm_bf16bf16", DeviceType.CUDA)
    memcpy = row("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA)
    rows = [
        row("aten::cudnn_convolution", DeviceType.CPU),
        kernel,
        row("## Call CompiledFxGraph fabc ##", DeviceType.CUDA, annotation=True),
        row("## Call CompiledFxGraph fdef ##", DeviceType.CUDA),  # an older torch: name only
        memcpy,
    ]
    assert kernel_rows(rows) == [kernel, memcpy]


def test_census_counts_the_steps_flops_and_each_ops_bytes(tmp_path):
    """``train_census.py`` on fake tensors: the FLOPs of the real step (FlopCounterMode on real
    tensors), a conv's exact bytes, and the two levers it compares move bytes the right way."""
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf

    from benchmarks.presets import backbone_conf
    from benchmarks.train_census import OpCensus, main
    from benchmarks.train_step import count_flops, make_unet
    from cdm.models.adapters import prepare_shard_model
    from cdm.models.backbone import build_scheduler, null_label

    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.rand(2, 3, 6, 6)
    with OpCensus() as census:
        conv(x)
    count, flops, moved = census.ops["aten::convolution"]
    assert (count, flops) == (1, 2 * 2 * 5 * 6 * 6 * 3 * 3 * 3)
    assert moved == 4 * (x.numel() + conv.weight.numel() + conv.bias.numel() + 2 * 5 * 6 * 6)

    runs = {}
    for norms in ("autocast", "bf16"):
        argv = ["--preset", "tiny", "--batch-size", "8", "--norm-dtype", norms]
        runs[norms] = main([*argv, "--out", str(tmp_path / f"{norms}.json")])["results"]
    args = argparse.Namespace(resolution=8, channels=1)
    torch.manual_seed(0)
    bcfg = backbone_conf("tiny")
    adapter = dict(OmegaConf.load(ROOT / "cdm" / "conf" / "adapter" / "lora.yaml"))
    model = prepare_shard_model(make_unet(bcfg, args), adapter)
    batch = {"image": torch.rand(8, 1, 8, 8), "label": torch.randint(0, 10, (8,))}
    alphas = build_scheduler(bcfg.scheduler).alphas_cumprod.float()
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    # FlopCounterMode has no formula for the CPU's attention kernel; the census adds CUDA's
    counted = runs["autocast"]["step"]
    attention = counted["families"]["attention"]["flop"]
    heads, tokens, dim = 4, 16, 8  # tiny: the mid block (32 channels) attends at 4x4, 4 heads of 8
    assert attention == 8 * (4 * heads * tokens * tokens * dim) * 7 // 2  # forward + backward
    assert counted["flop_per_step"] - attention == count_flops(
        model, batch, alphas, null_label(model), amp
    )
    step, with_casts = runs["bf16"]["step"], runs["bf16"]["step_with_peft_casts"]
    # bf16 activations into every LoRA layer: peft's casts are copies the step no longer makes
    assert step["families"]["copy"]["gb"] < with_casts["families"]["copy"]["gb"]
    # fp32 norms (CUDA autocast's rule) move more bytes than bf16 ones
    assert step["floor"]["unfused"]["ms"] < runs["autocast"]["step"]["floor"]["unfused"]["ms"]


def test_train_step_refuses_a_census_of_another_size(tmp_path):
    counted_at = {"preset": "tiny", "resolution": 8, "channels": 1, "batch_size": 4,
                  "precision": "bf16", "norm_dtype": "autocast", "targets": None}  # fmt: skip
    (tmp_path / "census.json").write_text(json.dumps({"config": counted_at}))
    cmd = [sys.executable, "benchmarks/train_step.py", "--preset", "tiny", "--batch-size", "8",
           "--profile", "--census", str(tmp_path / "census.json"), "--out", str(tmp_path / "t.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "count it with the same flags" in proc.stderr, proc.stderr
    assert not (tmp_path / "t.json").exists()
