"""Device, precision, seeds and library versions: decided once at start, passed down."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.core.errors import UserError
from finetune.core.flags import DEVICES, PRECISIONS

if TYPE_CHECKING:  # torch is imported lazily so that --help and usage errors stay fast
    import torch


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


def resolve_precision(requested: str, device: torch.device, hidden_size: int | None = None,
                      log: logging.Logger | None = None) -> str:
    """Map --precision auto|fp32|bf16|fp16 to what runs on this device.

    auto: bf16 on CUDA that supports it, fp16 (with a GradScaler when training) on older
    CUDA; on a CPU with native bf16 instructions, bf16 only where a short matmul probe of the model's
    shapes (`hidden_size`) shows it faster than fp32 there (cpu_bf16_is_faster), else fp32. On Apple MPS
    auto picks fp32: MPS autocast support varies across macOS/PyTorch releases, and fp32 is always right.
    """
    import torch

    if requested not in PRECISIONS:
        raise UserError(f"unknown --precision {requested!r}. HINT: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16" if cpu_bf16_is_faster(hidden_size or 768, log or logging.getLogger("finetune")) else "fp32"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on CPU. HINT: use --precision bf16 or fp32")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16. HINT: use --precision fp16 or fp32")
    return requested


# -----------------------------------------------------------------------------
# Is bf16 faster than fp32 on this CPU? Measured, not read from a flag: Xeons with avx512_bf16 but no AMX ran a
# GPT-2-shaped bf16 matmul at 164 GFLOP/s against fp32's 293 (torch 2.13), an AMD EPYC's bf16 at 4x its fp32.

PROBE_TOKENS = 1024        # rows of the probe's activations: a micro-batch of 4 x 256 tokens
PROBE_SECONDS = 0.1        # per precision: the probe costs a fraction of a second, once per machine
BF16_MARGIN = 1.1          # bf16 must be this much faster: a close call stays fp32 (exact, and no rounding)


def cpu_bf16_is_faster(hidden_size: int, log: logging.Logger) -> bool:
    """Time an MLP-shaped matmul (PROBE_TOKENS x h @ h x 4h) in fp32 and in bf16; remembered per CPU model,
    thread count, library versions and shape in $XDG_CACHE_HOME/finetune/cpu-precision.json."""
    import torch

    key = "|".join([cpu_model(), f"threads {torch.get_num_threads()}", f"hidden {hidden_size}",
                    *(f"{k} {v}" for k, v in library_versions().items())])
    cache = probe_cache_file()
    known = read_json(cache)
    found = known.get(key)
    if found is None:
        found = {name: matmul_gflops(hidden_size, dtype) for name, dtype in
                 (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        found["measured"] = time.strftime("%Y-%m-%d")
        with contextlib.suppress(OSError):  # an unwritable cache only means measuring again next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".tmp-{cache.name}-{os.getpid()}")
            tmp.write_text(json.dumps({**known, key: found}, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, cache)
    faster = found["bf16"] > BF16_MARGIN * found["fp32"]
    log.info("precision auto: on this CPU a %dx%d @ %dx%d matmul runs at %.0f GFLOP/s in bf16, %.0f in fp32%s: "
             "%s (--precision %s to choose)", PROBE_TOKENS, hidden_size, hidden_size, 4 * hidden_size,
             found["bf16"], found["fp32"], probe_origin(found, cached=found is known.get(key), cache=cache),
             "bf16" if faster else "fp32", "fp32" if faster else "bf16")
    return faster


def probe_origin(found: dict, cached: bool, cache: Path) -> str:
    """Where the probe's figures come from: this run, or the cache (then its figures repeat from run to run,
    unlike the time estimate's probe, which measures the machine as loaded now)."""
    if not cached:
        return " (measured now)"
    when = f" on {found['measured']}" if isinstance(found.get("measured"), str) else " earlier"
    return f" (measured{when}, remembered in {cache}; delete it to measure again)"


def matmul_gflops(hidden_size: int, dtype, rows: int = PROBE_TOKENS, device=None,
                  seconds: float = PROBE_SECONDS) -> float:
    """GFLOP/s of a rows x h @ h x 4h matmul (a block's MLP) in `dtype` on `device` (default: the CPU), run
    back to back for about `seconds` after a warm-up."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, hidden_size, generator=generator).to(dtype=dtype, device=device)
    b = torch.randn(hidden_size, 4 * hidden_size, generator=generator).to(dtype=dtype, device=device)
    synchronize = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: kernel selection, first-touch of the output
    synchronize()
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 1:
        torch.mm(a, b)
        runs += 1
        if runs % 8 == 0 or elapsed >= seconds:
            synchronize()  # queued GPU work counts once it has run
    synchronize()
    elapsed = time.perf_counter() - started
    return runs * 2 * rows * hidden_size * 4 * hidden_size / elapsed / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "finetune" / "cpu-precision.json"


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


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
