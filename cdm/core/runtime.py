"""Process-wide settings that make a run reproducible: seeds, thread count, determinism."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def configure_runtime(seed: int, threads: int, deterministic: bool = True) -> None:
    """Pin the torch thread count, seed every RNG and switch to deterministic kernels.

    Bit-reproducibility on CPU holds only at an equal thread count (1 vs 2 threads differ).
    """
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def machine_info(**versions: str) -> dict:
    """Where numbers were measured: platform, CPUs, threads, torch (+ ``versions``), GPU, load."""
    import platform

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
