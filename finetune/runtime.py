"""Device, precision, seeds and library versions: decided once at start, passed down."""
from __future__ import annotations

import contextlib
import platform
import random
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError

if TYPE_CHECKING:  # torch is imported lazily so that --help and usage errors stay fast
    import torch

DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def get_device(requested: str = "auto", cuda_index: int | None = None) -> torch.device:
    """CUDA, else Apple MPS, else CPU; an explicit request must be available. `cuda_index`: this process's
    GPU under torchrun (its local rank)."""
    import torch

    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if requested not in DEVICES:
        raise UserError(f"unknown --device {requested!r}. HINT: choose one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible. HINT: use --device auto or cpu")
    if requested == "mps" and not mps_ok:
        raise UserError("--device mps was asked for but Apple MPS is not available. HINT: use --device auto or cpu")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    return torch.device("cuda", cuda_index) if requested == "cuda" and cuda_index is not None else \
        torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 / AMX), where bf16 autocast pays off."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flag("avx512_bf16", "amx_bf16")
    except (AttributeError, RuntimeError):
        return False


def _cpu_flag(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return False
    return any(flag in text.split() for flag in flags)


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map --precision auto|fp32|bf16|fp16 to what runs on this device.

    auto: bf16 on CUDA that supports it, fp16 (with a GradScaler when training) on older
    CUDA, bf16 on CPUs with native bf16 instructions, else fp32. On Apple MPS auto picks
    fp32: MPS autocast support varies across macOS/PyTorch releases, and fp32 is always right.
    """
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"unknown --precision {requested!r}. HINT: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on CPU. HINT: use --precision bf16 or fp32")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16. HINT: use --precision fp16 or fp32")
    return requested


def autocast_context(device: torch.device, precision: str):
    """The autocast context for the forward pass; master weights stay fp32."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run's numbers depend on (peft only when installed)."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "numpy", "peft"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
