"""Small pieces shared by the top-level scripts: user-facing errors, device and precision.

Kept deliberately small: each script still reads top to bottom on its own.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that --help and usage errors stay fast
    import torch

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the user: printed as one `error: ...` line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one `error:` line with a hint instead of the usage block."""

    def error(self, message):
        print(f"error: {message}. HINT: run `{self.prog} --help` to see every flag", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def exit_on_user_error(main):
    """Decorator for a script's main(): turns UserError into one line on stderr and exit 2."""

    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as exc:
            message = " ".join(str(exc).split("\n"))
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_BAD_INPUT) from None

    wrapper.__name__ = main.__name__
    wrapper.__doc__ = main.__doc__
    return wrapper


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # transformers' own info logs would interleave with ours; keep its warnings.
    logging.getLogger("transformers").setLevel(logging.WARNING)
    return logging.getLogger("finetune")


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


# -----------------------------------------------------------------------------
# Device and precision


def get_device(requested: str = "auto") -> torch.device:
    """CUDA, else Apple MPS, else CPU; an explicit request must be available."""
    import torch

    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible. HINT: use --device auto or cpu")
    if requested == "mps" and not mps_ok:
        raise UserError("--device mps was asked for but Apple MPS is not available. HINT: use --device auto or cpu")
    if requested not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown --device {requested!r}. HINT: choose auto, cuda, mps or cpu")
    return torch.device(requested)


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

    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"unknown --precision {requested!r}. HINT: choose auto, fp32, bf16 or fp16")
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
