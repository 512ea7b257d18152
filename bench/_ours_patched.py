"""finetune_generative.py with speed levers toggled by monkeypatching, for measurement only.
A patch whose target no longer exists stops the run (see patch()).

    BENCH_PATCHES=old_gelu,hf_loss python bench/_ours_patched.py <finetune_generative.py flags>

Runs the script's own main() with the named changes; no patch = the script as it is. The patches turn
levers the script already pulls back OFF (to measure what each one buys), or try new ones:

  torch_dropout
               run with --torch-dropout (torch's own CPU dropout masks and SDPA's math path).
  grad_ckpt    run with --gradient-checkpointing (the memory/speed trade-off, side by side).
  old_gelu     keep transformers' NewGELUActivation ("gelu_new": a chain of ~8 element-wise ops)
               instead of the script's fuse_tanh_gelu() swap to torch.nn.GELU(approximate="tanh").
  hf_loss      training loss by transformers' ForCausalLMLoss (fp32 copy of the whole batch's logits,
               fp32 log-probabilities kept for backward) instead of the script's chunked next_token_loss.
  with_cache   let the training forward build transformers' DynamicCache (GPT-2's config has
               use_cache=true) instead of the script's use_cache=False.
  loop_adamw   AdamW without fused=True (on CPU: the per-tensor loop, as the Trainer's adamw_torch).
  eager_attn   load the model with attn_implementation="eager" instead of SDPA (with dropout > 0 the
               CPU SDPA falls back to its math path).
  no_eval0     skip the step-0 evaluation of the base model - start-up lever.

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
KNOWN = {"torch_dropout", "grad_ckpt", "old_gelu", "hf_loss", "with_cache", "loop_adamw", "eager_attn", "no_eval0"}


def install_first_step_probe(path: str) -> None:
    import psutil
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def hook(optimizer, args, kwargs):
        Path(path).write_text(json.dumps({"kind": "ours", "process_start": psutil.Process().create_time(),
                                          "first_step_done": time.time()}))
        for child in psutil.Process().children(recursive=True):  # DataLoader workers
            child.kill()
        os._exit(0)

    register_optimizer_step_post_hook(hook)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def install_hwm_log(path: str) -> None:
    import atexit

    from torch.optim.optimizer import register_optimizer_step_post_hook

    counter = {"step": 0}

    def hook(optimizer, args, kwargs):
        counter["step"] += 1
        with open(path, "a") as f:
            f.write(json.dumps({"after_step": counter["step"], "hwm_mib": vm_hwm_mib()}) + "\n")

    register_optimizer_step_post_hook(hook)
    atexit.register(lambda: open(path, "a").write(json.dumps({"at_exit": True, "hwm_mib": vm_hwm_mib()}) + "\n"))


def patch(owner, name: str, replacement) -> None:
    """Replace owner.name, or stop loudly when it does not exist (a patch that patched nothing would
    silently measure the unpatched script)."""
    if not hasattr(owner, name):
        raise SystemExit(f"bench patch target {getattr(owner, '__name__', owner)}.{name} does not exist: "
                         f"the code moved; update bench/_ours_patched.py")
    setattr(owner, name, replacement)


def apply_patches(fg) -> None:
    import torch

    from finetune.models import loading as models
    from finetune.train import loss, training

    if "old_gelu" in PATCHES:
        patch(models, "fuse_tanh_gelu", lambda model: 0)
    if "hf_loss" in PATCHES:
        from transformers.loss.loss_utils import ForCausalLMLoss

        def hf_next_token_loss(logits, input_ids, rows_per_chunk=64):
            return ForCausalLMLoss(logits, input_ids, vocab_size=logits.shape[-1])

        patch(loss, "next_token_loss", hf_next_token_loss)  # what the text objective calls (training and evaluation)
    if "loop_adamw" in PATCHES:
        original_make_optimizer = models.make_optimizer

        def make_optimizer(model, device, *, lr, weight_decay, betas):
            opt = original_make_optimizer(model, device, lr=lr, weight_decay=weight_decay, betas=betas)
            return torch.optim.AdamW(opt.param_groups, lr=lr, betas=betas, eps=1e-8, foreach=False)

        patch(models, "make_optimizer", make_optimizer)
    if "eager_attn" in PATCHES:
        from transformers import AutoModelForCausalLM

        original_from_pretrained = AutoModelForCausalLM.from_pretrained

        def from_pretrained(*args, **kwargs):
            kwargs.setdefault("attn_implementation", "eager")
            return original_from_pretrained(*args, **kwargs)

        patch(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    if "with_cache" in PATCHES:
        original_load_model = models.load_model_for_training

        def load_model(*args, **kwargs):
            model = original_load_model(*args, **kwargs)
            forward = model.forward

            def cached_forward(*a, **kw):
                if torch.is_grad_enabled():
                    kw["use_cache"] = True
                return forward(*a, **kw)

            model.forward = cached_forward
            return model

        patch(models, "load_model_for_training", load_model)
    if "no_eval0" in PATCHES:
        original_evaluate = training.TrainingRun.evaluate_and_track

        def evaluate_and_track(self, stop=None):
            return float("nan") if self.progress.step == 0 else original_evaluate(self, stop)

        patch(training.TrainingRun, "evaluate_and_track", evaluate_and_track)


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

    apply_patches(fg)
    if PATCHES:
        print(f"bench patches: {', '.join(PATCHES)}", file=sys.stderr)
    flags = {"torch_dropout": "--torch-dropout", "grad_ckpt": "--gradient-checkpointing"}
    return fg.main(sys.argv[1:] + [flag for patch, flag in flags.items() if patch in PATCHES])


if __name__ == "__main__":
    sys.exit(main())
