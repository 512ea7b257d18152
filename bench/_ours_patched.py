"""finetune_generative.py with prototype speed-ups applied by monkeypatching, for measurement only.

    BENCH_PATCHES=gelu_tanh,chunked_ce python bench/_ours_patched.py <finetune_generative.py flags>

Patches (comma-separated in BENCH_PATCHES; none = the unmodified script):
  gelu_tanh    replace transformers' NewGELUActivation modules ("gelu_new": a chain of ~8 element-wise
               ops) by torch.nn.GELU(approximate="tanh"): the same tanh formula in one kernel. The model's
               saved config is not touched. Values agree to rounding (the fused kernel rounds once).
  chunked_ce   training loss from the logits by a chunked cross-entropy (bench/_losses.py) instead of
               transformers' ForCausalLMLoss, which upcasts the whole (batch, seq, 50k) logits to fp32 and
               keeps fp32 log-probabilities for the backward pass. Same values (fp32 log-softmax of the same
               logits, mean over the same predictions); evaluation keeps the model's own loss.
  no_cache     pass use_cache=False to the training/evaluation forward: transformers otherwise builds a DynamicCache
               of every layer's keys/values on each training step (GPT-2's config has use_cache=true),
               which torch.compile guards on per layer (recompiles, then gives up at its limit).
Other environment variables:
  BENCH_THREADS / BENCH_INTEROP_THREADS   torch.set_num_threads / set_num_interop_threads
  BENCH_HWM_LOG=path                      append the process's RSS high-water mark (VmHWM, MiB) after
                                          every optimizer step and at exit: where the peak happens
  BENCH_FIRST_STEP_RESULT=path            write {process_start, first_step_done} there at the first
                                          optimizer step and exit at once (start-up benchmark)
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PATCHES = [p for p in os.environ.get("BENCH_PATCHES", "").split(",") if p]
KNOWN = {"gelu_tanh", "chunked_ce", "no_cache"}


def install_first_step_probe(path: str) -> None:
    import psutil
    import torch

    def hook(optimizer, args, kwargs):
        Path(path).write_text(json.dumps({"kind": "ours", "process_start": psutil.Process().create_time(),
                                          "first_step_done": time.time()}))
        for child in psutil.Process().children(recursive=True):  # DataLoader workers
            child.kill()
        os._exit(0)

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(hook)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def install_hwm_log(path: str) -> None:
    import atexit

    import torch

    counter = {"step": 0}

    def hook(optimizer, args, kwargs):
        counter["step"] += 1
        with open(path, "a") as f:
            f.write(json.dumps({"after_step": counter["step"], "hwm_mib": vm_hwm_mib()}) + "\n")

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(hook)
    atexit.register(lambda: open(path, "a").write(json.dumps({"at_exit": True, "hwm_mib": vm_hwm_mib()}) + "\n"))


def swap_gelu(model) -> int:
    """Now part of finetune_generative.load_model (a no-op there after the first swap); kept for A/B runs."""
    from finetune_generative import fuse_tanh_gelu

    return fuse_tanh_gelu(model)


def wrap_forward(model, chunked_loss: bool, no_cache: bool) -> None:
    """Calls with labels (training and evaluation; generation passes none): use_cache=False (no_cache),
    and in training (grad enabled) the loss from causal_lm_loss (chunked_loss)."""
    import torch

    from _losses import causal_lm_loss

    original = model.forward
    # Under --compile the loss stays outside the compiled graph, as it would if train_loop computed it
    # from the logits itself.
    loss_fn = torch.compiler.disable(causal_lm_loss)

    def forward(*args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        if no_cache:
            kwargs.setdefault("use_cache", False)
        if not chunked_loss or not torch.is_grad_enabled():
            return original(*args, labels=labels, **kwargs)
        out = original(*args, **kwargs)
        out.loss = loss_fn(out.logits, labels)
        return out

    model.forward = forward


def main() -> int:
    unknown = set(PATCHES) - KNOWN
    if unknown:
        raise SystemExit(f"unknown BENCH_PATCHES {sorted(unknown)}; known: {sorted(KNOWN)}")
    import torch

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    if os.environ.get("BENCH_INTEROP_THREADS"):
        torch.set_num_interop_threads(int(os.environ["BENCH_INTEROP_THREADS"]))
    if os.environ.get("BENCH_HWM_LOG"):
        install_hwm_log(os.environ["BENCH_HWM_LOG"])
    if os.environ.get("BENCH_FIRST_STEP_RESULT"):
        install_first_step_probe(os.environ["BENCH_FIRST_STEP_RESULT"])

    import finetune_generative as fg

    original_load_model = fg.load_model

    def load_model(*args, **kwargs):
        model = original_load_model(*args, **kwargs)
        if "gelu_tanh" in PATCHES:
            print(f"bench patch: {swap_gelu(model)} gelu_new -> GELU(tanh) modules", file=sys.stderr)
        if "chunked_ce" in PATCHES or "no_cache" in PATCHES:
            wrap_forward(model, "chunked_ce" in PATCHES, "no_cache" in PATCHES)
            print(f"bench patch: training forward with chunked loss={'chunked_ce' in PATCHES}, "
                  f"use_cache=False: {'no_cache' in PATCHES}", file=sys.stderr)
        return model

    fg.load_model = load_model
    return fg.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
