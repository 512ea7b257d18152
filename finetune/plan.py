"""The plan of a run: sizes, steps, the learning-rate and evaluation schedules and a memory estimate.

Shown by --dry-run and logged at start; the training loop asks it when to evaluate.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

# `cfg` below is the training script's config (any object with its field names): the plan reads it,
# never imports it.


def steps_per_epoch(num_blocks: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch; the last step of an epoch may see fewer micro-batches."""
    per_rank = num_blocks // world_size
    micro_batches = math.ceil(per_rank / batch_size)
    return math.ceil(micro_batches / grad_accum)


@dataclass
class Plan:
    block_size: int
    train_blocks: int
    val_blocks: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tokens_per_step: int
    epochs: float
    batch_size: int = 0   # sequences per micro-batch as they run: --batch-size, at most the blocks per process
    grad_accum: int = 0   # micro-batches per step as they run: --grad-accum, at most the micro-batches per epoch
    # The schedules as periods, never as sets of steps: --max-steps 10**12 must plan as fast as 10.
    eval_every: int = 0   # --eval-every (0 = none); evaluation_steps() adds 0, each epoch end and the last step
    save_every: int = 0   # --save-every (0 = none); the last step always saves, and so does a stop

    def evaluates_at(self, step: int) -> bool:
        periods = (self.eval_every, self.steps_per_epoch)
        return step in (0, self.total_steps) or (
            0 < step <= self.total_steps and any(k and step % k == 0 for k in periods))

    def saves_at(self, step: int) -> bool:
        return step == self.total_steps or (
            0 < step <= self.total_steps and bool(self.save_every) and step % self.save_every == 0)


def make_plan(cfg, meta: dict, block_size: int, world_size: int) -> Plan:
    train_blocks = meta["splits"]["train"]["tokens"] // block_size
    val_blocks = meta["splits"]["val"]["tokens"] // block_size
    per_epoch = steps_per_epoch(train_blocks, cfg.batch_size, cfg.grad_accum, world_size)
    total = cfg.max_steps if cfg.max_steps else per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)
    # A micro-batch cannot hold more blocks than a process has, nor a step more micro-batches than an epoch.
    per_rank = train_blocks // world_size
    batch = max(1, min(cfg.batch_size, per_rank))
    accum = max(1, min(cfg.grad_accum, math.ceil(per_rank / batch)))
    sequences = max(1, min(batch * accum, per_rank))
    plan = Plan(block_size, train_blocks, val_blocks, per_epoch, total, min(warmup, total),
                sequences * world_size * block_size, total / per_epoch if per_epoch else 0.0,
                batch_size=batch, grad_accum=accum, eval_every=cfg.eval_every or 0,
                save_every=cfg.save_every or 0)
    return plan


def make_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    """transformers.get_scheduler's schedule `name`, except that no optimizer step runs at lr 0.

    Its warmup gives the optimizer step taken after `s` scheduler steps peak x s / W, so the first step
    of every run (s = 0) would train nothing. Here warmup step k of W (k = 1..W) uses peak x k / W, as
    nanoGPT does; after the warmup the schedule is transformers' own (so step W + 1 is at the peak too,
    and the decay ends where it did). Resuming stays exact: the factor is a pure function of the step.
    """
    import torch
    from transformers import get_scheduler

    # transformers' factor function, taken from a scheduler built on a throwaway one-group optimizer.
    scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    (factor,) = get_scheduler(name, scratch, num_warmup_steps=warmup_steps, num_training_steps=total_steps).lr_lambdas
    warmup = 0 if name == "constant" else warmup_steps  # transformers' "constant" has no warmup
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        warmup_from_step_one, schedule=factor, warmup_steps=warmup, total_steps=total_steps))


def warmup_from_step_one(steps_done: int, schedule, warmup_steps: int, total_steps: int) -> float:
    """The lr factor of the optimizer step taken after `steps_done` steps: during the warmup (k + 1) / W,
    one step ahead of transformers' k / W; after it, transformers' schedule; 0 once all steps are done
    (no step uses it, and transformers' polynomial schedule divides by zero there when W is every step)."""
    if steps_done >= total_steps:
        return 0.0
    return (steps_done + 1) / warmup_steps if steps_done < warmup_steps else schedule(steps_done)


def iter_evaluation_steps(cfg, plan: Plan) -> Iterator[int]:
    """The steps the loop evaluates at, ascending: 0, every --eval-every, each epoch end, the last step.
    Lazy (ranges merged), so a plan of 10**12 steps costs nothing until someone walks it."""
    periods = [k for k in (cfg.eval_every, plan.steps_per_epoch) if k]
    merged = heapq.merge(*(range(k, plan.total_steps + 1, k) for k in periods), [plan.total_steps])
    previous = 0
    yield 0
    for step in merged:
        if step > previous:
            yield step
            previous = step


def evaluation_steps(cfg, plan: Plan, limit: int | None = None) -> list[int]:
    """iter_evaluation_steps() as a list: all of them, or the first `limit`."""
    return list(itertools.islice(iter_evaluation_steps(cfg, plan), limit))


def count_evaluations(cfg, plan: Plan) -> int:
    """len(evaluation_steps()) by arithmetic: multiples of each period up to the last step, those of
    both counted once, the last step when neither period lands on it, and step 0."""
    total = plan.total_steps
    periods = [k for k in (cfg.eval_every, plan.steps_per_epoch) if k]
    count = sum(total // k for k in periods)
    if len(periods) == 2:
        count -= total // math.lcm(*periods)
    if total > 0 and not any(total % k == 0 for k in periods):
        count += 1
    return 1 + count


def eval_batches_per_process(cfg, plan: Plan) -> int | None:
    """--eval-batches (0 = all, returned as None), or by default the run's evaluations together get at
    most 1/20 of the micro-batches it trains (at least 8 each). A forward pass costs about half a training
    micro-step here (measured with bench/overhead.py), so evaluating stays near 3 % of the run whatever
    the size of the split, which a full pass at every evaluation would not (9 % in that benchmark)."""
    if cfg.eval_batches is not None:
        return cfg.eval_batches or None
    n_evals = count_evaluations(cfg, plan)
    return max(8, plan.total_steps * cfg.grad_accum // (20 * n_evals))


# The interpreter with torch, transformers and peft imported, before any weights load: 0.37-0.43 GiB
# RSS measured on Linux with torch 2.13 (CPU build). Without it the estimate of a LoRA run of gpt2-medium
# was 29 % under the measured peak (README, "Bigger models with LoRA").
RUNTIME_GIB = 0.4


def estimate_memory_gib(model_config, n_params: int, cfg, plan: Plan, precision: str,
                        lora: dict | None = None) -> float:
    """Rough training memory: fp32 weights+grads+AdamW (16 B/param) plus activations and logits, for the
    micro-batch as it runs (plan.batch_size).

    With LoRA (`lora`: the counts of lora.check_on_meta_model) only the adapters take 16 B/param; the
    frozen base takes 4 B/param, its block linears 2 B in bf16/fp16; the activations are those of full
    fine-tuning (the backward pass still runs through every layer) plus each adapter's dropped-out input.
    Loading can be the peak: the fp32 weights file is memory-mapped and every page read stays resident
    while the frozen linears are copied to bf16 (the merge of a release streams and adds little).

    Both add RUNTIME_GIB, the process itself before any weights load."""
    n_layer = getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 12)
    hidden = getattr(model_config, "n_embd", None) or getattr(model_config, "hidden_size", 768)
    heads = getattr(model_config, "n_head", None) or getattr(model_config, "num_attention_heads", 12)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    block_size = plan.block_size
    tokens = plan.batch_size * block_size
    # Activations per layer per token (Korthikanti et al. 2022), scaled from 16-bit to act_bytes.
    per_layer = tokens * (34 * hidden + 5 * heads * block_size) * act_bytes / 2
    if cfg.gradient_checkpointing:
        per_layer = tokens * hidden * act_bytes
    # The logits and the gradient next_token_loss stores for them, both in the autocast dtype.
    logits = tokens * model_config.vocab_size * 2 * act_bytes
    if lora is None:
        return RUNTIME_GIB + (16 * n_params + n_layer * per_layer + logits) / 2**30
    half = precision in ("bf16", "fp16")
    frozen = 4 * n_params - (2 * lora["frozen_linear"] if half else 0)
    adapter_inputs = tokens * lora["adapter_inputs"] * 5  # fp32 dropout output + its 1-byte mask
    training = frozen + 16 * lora["trainable"] + n_layer * per_layer + logits + adapter_inputs
    loading = 4 * n_params + (2 * lora["frozen_linear"] if half else 0)
    return RUNTIME_GIB + max(training, loading) / 2**30


def estimate_fsdp_memory_gib(model_config, n_params: int, cfg, plan: Plan, precision: str, world_size: int,
                             device_type: str = "cpu") -> float:
    """Rough memory of one --fsdp process out of `world_size`: its 1/N of the fp32 weights, gradients and
    AdamW state (16 B/param / N), plus what is whole while it runs: the root group (token and position
    embeddings, gathered for the whole forward and backward), two blocks gathered at a time (the one running
    and the one prefetched), activations and logits as in estimate_memory_gib; with --grad-accum > 1 the
    full fp32 gradients, which stay unreduced between the micro-steps. Gathered weights are bf16 on a GPU in
    bf16, fp32 otherwise. Loading can be the peak: every process loads the whole fp32 model, then shards it."""
    n_layer = getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 12)
    hidden = getattr(model_config, "n_embd", None) or getattr(model_config, "hidden_size", 768)
    positions = getattr(model_config, "n_positions", None) or 0
    root = min(n_params, (model_config.vocab_size + positions) * hidden)
    block = (n_params - root) / max(n_layer, 1)
    gathered_bytes = 2 if device_type == "cuda" and precision == "bf16" else 4
    activations = estimate_memory_gib(model_config, n_params, cfg, plan, precision) - RUNTIME_GIB - 16 * n_params / 2**30
    whole = (root + 2 * block) * (gathered_bytes + 4)  # gathered weights and their unreduced gradients
    if plan.grad_accum > 1:
        whole += 4 * n_params
    training = 16 * n_params / world_size + whole + activations * 2**30
    loading = 4 * n_params + 4 * n_params / world_size
    return RUNTIME_GIB + max(training, loading) / 2**30


def sharding_line(ddp_gib: float, fsdp_gib: float, world_size: int, fsdp: bool, device) -> str:
    """DDP and FSDP side by side for `world_size` processes, and which of them fits this device."""
    available = machine_memory_gib(device)
    fits = "" if available is None else "; " + (
        "both fit" if max(ddp_gib, fsdp_gib) <= available else "only FSDP fits" if fsdp_gib <= available
        else "only DDP fits" if ddp_gib <= available else "neither fits") + f" this machine's {available:.1f} GiB"
    return (f"sharding         at {world_size} process(es) ~{ddp_gib:.2f} GiB per process with DDP, "
            f"~{fsdp_gib:.2f} GiB with --fsdp (this run: {'FSDP' if fsdp else 'DDP'}){fits}")


def machine_memory_gib(device) -> float | None:
    """RAM on a CPU (Linux/macOS), memory of the GPU; None where it cannot be asked."""
    import os

    try:
        if device.type == "cuda":
            import torch
            return torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return None


def count_parameters(model_config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory, no weights read
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def eval_description(plan: Plan, cfg, world_size: int) -> str:
    batches = eval_batches_per_process(cfg, plan)
    blocks = plan.val_blocks if batches is None else min(plan.val_blocks, batches * cfg.batch_size * world_size)
    steps, count = evaluation_steps(cfg, plan, limit=6), count_evaluations(cfg, plan)
    shown = ", ".join(map(str, steps)) + (f", ... ({count:,} in all)" if count > 6 else "")
    return f"{blocks:,} of {plan.val_blocks:,} val blocks, at steps {shown}"


def batch_capped(plan: Plan, cfg, world_size: int) -> str:
    """What the batch line says when the flags ask for more than the train split holds."""
    capped = []
    if plan.batch_size < cfg.batch_size:
        capped.append(f"--batch-size {cfg.batch_size}")
    if plan.grad_accum < cfg.grad_accum:
        capped.append(f"--grad-accum {cfg.grad_accum}")
    if not capped:
        return ""
    return (f" ({' and '.join(capped)} cut to what runs: the train split holds "
            f"{plan.train_blocks // world_size:,} blocks per process)")


def describe_plan(plan: Plan, cfg, meta: dict, n_params: int, memory_gib: float,
                  device, precision: str, world_size: int, lora: dict | None = None,
                  sharding: str | None = None) -> str:
    lines = [
        f"model            {cfg.model} ({n_params / 1e6:.1f}M parameters)",
        f"data             {cfg.data_dir}: {meta['splits']['train']['tokens']:,} train tokens, "
        f"{meta['splits']['val']['tokens']:,} val tokens",
        f"blocks           {plan.train_blocks:,} train, {plan.val_blocks:,} val, of {plan.block_size} tokens",
        f"batch            {plan.batch_size} x {plan.grad_accum} accum x {world_size} process(es), "
        f"{plan.tokens_per_step // plan.block_size:,} sequences, {plan.tokens_per_step:,} tokens per step"
        f"{batch_capped(plan, cfg, world_size)}",
        f"steps            {plan.steps_per_epoch:,} per epoch, {plan.total_steps:,} total "
        f"({plan.epochs:.2f} epochs), {plan.warmup_steps:,} warmup, scheduler {cfg.scheduler}",
        f"evaluation       {eval_description(plan, cfg, world_size)}",
        f"device           {device}, precision {precision}",
        f"memory estimate  ~{memory_gib:.2f} GiB per process (weights, grads, AdamW, activations)",
    ]
    if lora is not None:
        lines.insert(1, f"LoRA             r {cfg.lora_r}, alpha {cfg.lora_alpha or 2 * cfg.lora_r:g}, on "
                        f"{', '.join(lora['targets'])}: {lora['trainable']:,} trainable of {lora['total']:,} "
                        f"parameters ({100 * lora['trainable'] / lora['total']:.2f} %)")
    if sharding:
        lines.append(sharding)
    available = machine_memory_gib(device)
    if available is not None and memory_gib > available:
        hint = "try --lora-r 16" if lora is None else "lower --batch-size or --block-size"
        lines.append(f"                 more than this machine's {available:.1f} GiB of {device.type} memory: "
                     f"it will not fit (HINT: {hint}, or --gradient-checkpointing)")
    return "\n".join(lines)
