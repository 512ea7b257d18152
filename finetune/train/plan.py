"""The plan of a run: sizes, steps, the learning-rate and evaluation schedules, a memory and a time estimate.

Shown by --dry-run and logged at start; the training loop asks it when to evaluate.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig



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
    world_size: int = 1   # processes the plan is for

    def evaluates_at(self, step: int) -> bool:
        if step in (0, self.total_steps) or not 0 < step <= self.total_steps:
            return 0 <= step <= self.total_steps
        if self.eval_every and step % self.eval_every == 0:
            return True
        return bool(self.steps_per_epoch) and step % self.steps_per_epoch == 0 and not self.near_evaluation(step)

    @property
    def epoch_end_window(self) -> int:
        """An epoch end this close to an --eval-every evaluation or the last step gets no evaluation of its
        own: a tenth of the shorter period (250 steps apart and epochs of 246: the end of the first epoch is
        4 steps before step 250, and a plan of 0, 246, 250, ... would evaluate the same model twice), and at
        least one step, so short periods never evaluate on back-to-back steps (20 and 21 with epochs of 7)."""
        periods = [k for k in (self.eval_every, self.steps_per_epoch) if k]
        return max(1, min(periods) // 10) if self.steps_per_epoch else 0

    def near_evaluation(self, step: int) -> bool:
        window = self.epoch_end_window
        offset = step % self.eval_every if self.eval_every else 0
        near_eval_every = bool(self.eval_every) and min(offset, self.eval_every - offset) <= window
        return bool(window) and (near_eval_every or self.total_steps - step <= window)

    def saves_at(self, step: int) -> bool:
        return step == self.total_steps or (
            0 < step <= self.total_steps and bool(self.save_every) and step % self.save_every == 0)


def make_plan(cfg: TrainConfig, meta: dict, block_size: int, world_size: int, blocks: tuple[int, int] | None = None) -> Plan:
    """`blocks`: (train, val) blocks when they are not the tokens cut into blocks (chat data, packed)."""
    if blocks is None:
        blocks = (meta["splits"]["train"]["tokens"] // block_size, meta["splits"]["val"]["tokens"] // block_size)
    return plan_for_blocks(cfg, blocks[0], blocks[1], block_size, world_size)


def plan_for_blocks(cfg: TrainConfig, train_blocks: int, val_blocks: int, block_size: int, world_size: int) -> Plan:
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
                save_every=cfg.save_every or 0, world_size=world_size)
    return plan


def extend_plan(cfg: TrainConfig, saved_config: dict, meta: dict, plan: Plan, world_size: int) -> tuple[Plan, list[str]]:
    """--extend: the plan of a resumed run given a larger --max-steps or --epochs than its checkpoint's.
    The warmup stays the run's own (a --warmup-ratio of the new total would move it into steps already
    taken); the rest of the schedule is planned again over the new total (see extension_note)."""
    import dataclasses

    before = plan_for_blocks(dataclasses.replace(cfg, epochs=saved_config["epochs"], max_steps=saved_config["max_steps"]),
                             plan.train_blocks, plan.val_blocks, plan.block_size, world_size)  # chat: packed blocks
    if plan.total_steps <= before.total_steps:
        return plan, [f"--extend: the run was planned for {before.total_steps:,} steps and these settings plan "
                      f"{plan.total_steps:,}, no more (HINT: pass a larger --max-steps, or more --epochs)"]
    return dataclasses.replace(plan, warmup_steps=before.warmup_steps), []


def extension_note(cfg: TrainConfig, plan: Plan, step: int, lr_before: float, lr_after: float) -> str:
    """What --extend does to the learning rate, for the log."""
    return (f"--extend: training on from step {step:,} to {plan.total_steps:,}; the {cfg.scheduler} schedule is "
            f"planned again over {plan.total_steps:,} steps with the run's {plan.warmup_steps:,} warmup steps, "
            f"so the lr goes from {lr_before:.3g} (where the checkpoint left it) to {lr_after:.3g} at step "
            f"{step + 1:,}, then follows the new schedule to its end")


def restart_schedule(scheduler, steps_done: int) -> None:
    """Set the optimizer's lr to what `scheduler` gives after `steps_done` steps. A resume restores the lr
    of the checkpoint's schedule with the optimizer's state; after --extend planned it again, that lr is
    stale (0 at the end of a linear decay)."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(steps_done)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() reads


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


def iter_evaluation_steps(cfg: TrainConfig, plan: Plan) -> Iterator[int]:
    """The steps the loop evaluates at, ascending: 0, every --eval-every, each epoch end, the last step.
    Lazy (ranges merged), so a plan of 10**12 steps costs nothing until someone walks it."""
    periods = [k for k in (cfg.eval_every, plan.steps_per_epoch) if k]
    merged = heapq.merge(*(range(k, plan.total_steps + 1, k) for k in periods), [plan.total_steps])
    previous = 0
    yield 0
    for step in merged:
        if step > previous and plan.evaluates_at(step):
            yield step
            previous = step


def evaluation_steps(cfg: TrainConfig, plan: Plan, limit: int | None = None) -> list[int]:
    """iter_evaluation_steps() as a list: all of them, or the first `limit`."""
    return list(itertools.islice(iter_evaluation_steps(cfg, plan), limit))


def count_evaluations(cfg: TrainConfig, plan: Plan) -> int:
    """len(evaluation_steps()) by arithmetic: multiples of each period up to the last step, those of
    both counted once, the last step when neither period lands on it, and step 0."""
    total = plan.total_steps
    periods = [k for k in (cfg.eval_every, plan.steps_per_epoch) if k]
    count = sum(total // k for k in periods)
    if len(periods) == 2:
        count -= total // math.lcm(*periods)
    if total > 0 and not any(total % k == 0 for k in periods):
        count += 1
    return 1 + count - count_epoch_ends_dropped(plan)


def count_epoch_ends_dropped(plan: Plan) -> int:
    """The epoch ends before the last step that plan.near_evaluation() leaves out, by arithmetic: those
    within the window of an --eval-every multiple, and the others within it of the last step."""
    window, every, epoch = plan.epoch_end_window, plan.eval_every, plan.steps_per_epoch
    if not window:
        return 0

    def count(first: int, last: int, low: int, high: int) -> int:  # epoch ends j = first..last at those offsets
        return (epoch_ends_with_offset(last, epoch, every, low, high)
                - epoch_ends_with_offset(first - 1, epoch, every, low, high)) if first <= last else 0

    def near_eval_every(first: int, last: int) -> int:  # offsets 1..window and every-window..every-1, once each
        below = min(window, every - 1)
        return count(first, last, 1, below) + count(first, last, max(below + 1, every - window), every - 1)

    last = (plan.total_steps - 1) // epoch  # the epoch ends before the last step: j * epoch, j = 1..last
    near_end = max(1, -(-(plan.total_steps - window) // epoch))  # j from here on: within the window of the end
    if not every:  # no --eval-every: only the epoch ends just before the last step are left out
        return max(0, last - near_end + 1)
    others_near_end = (max(0, last - near_end + 1) - near_eval_every(near_end, last)
                       - count(near_end, last, 0, 0))  # an --eval-every multiple itself is evaluated anyway
    return near_eval_every(1, last) + others_near_end


def epoch_ends_with_offset(n: int, epoch: int, every: int, low: int, high: int) -> int:
    """How many of j * epoch (j = 1..n) lie `low`..`high` (0 <= low <= high < every) after a multiple of
    `every`: the sum of floor((j*epoch - low) / every) - floor((j*epoch - high - 1) / every), two floor sums."""
    if n <= 0:
        return 0
    def floor_sum_from_one(c: int) -> int:  # sum over j = 1..n of floor((j * epoch + c) / every)
        c += epoch  # as i = j - 1 = 0..n-1
        return floor_sum(n, every, epoch, c % every) + n * (c // every)
    return floor_sum_from_one(-low) - floor_sum_from_one(-high - 1)


def floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum of floor((a*i + b) / m) for i = 0..n-1 (a, b >= 0), in O(log m) steps (the Euclid-like
    reduction of the AtCoder library), so a plan of 10**12 steps is counted as fast as one of 10."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b = y_max // m, y_max % m
        m, a = a, m


def eval_batches_per_process(cfg: TrainConfig, plan: Plan) -> int | None:
    """--eval-batches (0 = all, returned as None), or by default the run's evaluations together get at
    most 1/20 of the micro-batches it trains (at least 8 each). A forward pass costs about half a training
    micro-step, so evaluating stays a few % of the run whatever the size of the split, which a full pass
    at every evaluation would not (bench/overhead.py measures both; docs/performance.md)."""
    if cfg.eval_batches is not None:
        return cfg.eval_batches or None
    n_evals = count_evaluations(cfg, plan)
    return max(8, plan.total_steps * cfg.grad_accum // (20 * n_evals))


def eval_blocks(cfg: TrainConfig, plan: Plan) -> int:
    """Validation blocks per evaluation, the same whatever the number of processes (they are split across
    the processes and the losses summed, so best/ and early stopping do not depend on it): --eval-batches x
    --batch-size, or by default eval_batches_per_process's budget for these settings in one process; every
    block with --eval-batches 0 or when the split holds fewer."""
    one_process = plan if plan.world_size == 1 else plan_for_blocks(cfg, plan.train_blocks, plan.val_blocks,
                                                                    plan.block_size, 1)
    batches = eval_batches_per_process(cfg, one_process)
    return plan.val_blocks if batches is None else min(plan.val_blocks, batches * cfg.batch_size)


# The interpreter with torch, transformers and peft imported, before any weights load: 0.37-0.43 GiB
# RSS measured on Linux with torch 2.13 (CPU build). Without it the estimate of a LoRA run of gpt2-medium
# was 29 % under the measured peak (README, "Bigger models with LoRA").
RUNTIME_GIB = 0.4


def estimate_memory_gib(model_config, n_params: int, cfg: TrainConfig, plan: Plan, precision: str,
                        lora: dict | None = None, device_type: str = "cpu") -> float:
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
    # Activations per layer per token (Korthikanti et al. 2022), scaled from 16-bit to act_bytes; of attention's
    # (query, key) pairs, torch's dropout keeps scores, softmax and mask (5 B at 16-bit), while the fast CPU
    # dropout keeps the fp32 softmax output and recomputes the rest (models/cpu_dropout.py): 6 B per pair fit
    # the measured peak (GPT-2 124M, 8 x 1024, fp32: 16.85 GiB).
    fast_cpu_dropout = device_type == "cpu" and not cfg.torch_dropout
    pair_bytes = 6 if fast_cpu_dropout else 5 * act_bytes / 2
    per_layer = tokens * (34 * hidden * act_bytes / 2 + heads * block_size * pair_bytes)
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


def estimate_fsdp_memory_gib(model_config, n_params: int, cfg: TrainConfig, plan: Plan, precision: str, world_size: int,
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
    activations = estimate_memory_gib(model_config, n_params, cfg, plan, precision, device_type=device_type) - \
        RUNTIME_GIB - 16 * n_params / 2**30
    whole = (root + 2 * block) * (gathered_bytes + 4)  # gathered weights and their unreduced gradients
    if plan.grad_accum > 1:
        whole += 4 * n_params
    training = 16 * n_params / world_size + whole + activations * 2**30
    loading = 4 * n_params + 4 * n_params / world_size
    return RUNTIME_GIB + max(training, loading) / 2**30


def sharding_line(ddp_gib: float, fsdp_gib: float, world_size: int, fsdp: bool, device, sharing: int = 1) -> str:
    """DDP and FSDP side by side for `world_size` processes, and which of them fits this device (whose memory
    `sharing` of the processes draw on together: see processes_sharing_memory)."""
    available = machine_memory_gib(device)
    ddp_total, fsdp_total = ddp_gib * sharing, fsdp_gib * sharing
    fits = "" if available is None else "; " + (
        "both fit" if max(ddp_total, fsdp_total) <= available else "only FSDP fits" if fsdp_total <= available
        else "only DDP fits" if ddp_total <= available else "neither fits") + f" this machine's {available:.1f} GiB"
    if sharing > 1 and available is not None:
        fits += f" (shared by its {sharing} processes)"
    return (f"sharding         at {world_size} process(es) ~{ddp_gib:.2f} GiB per process with DDP, "
            f"~{fsdp_gib:.2f} GiB with --fsdp (this run: {'FSDP' if fsdp else 'DDP'}){fits}")


def processes_sharing_memory(cfg: TrainConfig, world_size: int, device) -> int:
    """How many of the run's processes draw on the memory the estimate is checked against: on a CPU, every
    process on this machine (--nproc N starts N; under torchrun, LOCAL_WORLD_SIZE), since they share its RAM;
    on a GPU each process has its own."""
    import os

    if getattr(device, "type", device) != "cpu":
        return 1
    return cfg.nproc or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


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


# -----------------------------------------------------------------------------
# Time estimate: the run's matmul work, divided by this machine's measured matmul speed at this model's shapes
# and by the share of that speed a whole training step reaches (the rest: layer norms, GELU, the loss, AdamW),
# plus the attention itself (scores, softmax, dropout, weighted values), timed as the run will compute it. The
# shares are what bench/train_throughput.py measured for GPT-2 124M on a CPU (docs/performance.md: 47-52 % of
# the bf16 matmul peak, 74 % of the fp32 one), rounded down. Attention is timed rather than counted because its
# speed depends on the kernel more than on its FLOPs: with attention dropout, a CPU runs it through plain
# matmuls, a softmax and a mask over every (query, key) pair (a 1024-token block: 3x the time of the flash
# kernel used without dropout, docs/performance.md).

STEP_SHARE_OF_MATMUL_SPEED = {"bf16": 0.45, "fp16": 0.45, "fp32": 0.7}
LONG_RUN_SECONDS = 30 * 60  # a CPU run longer than this gets the settings that shorten it, with their times


@dataclass
class SpeedProbe:
    gflops: float   # matmul GFLOP/s measured at the model's shapes, in the run's precision
    seconds: float  # what the measurement took
    rows: int       # the probe's X rows (tokens), X @ W with W of hidden x 4*hidden (the MLP's first matrix)
    # one block's causal attention in one layer, forward and backward, as the run computes it; 0: not timed
    # (the attention's matmul FLOPs then count at the matmul speed)
    attention_seconds: float = 0.0
    attention_block: int = 0  # the block size it was timed at


def measure_speed(model_config, cfg: TrainConfig, plan: Plan, precision: str, device) -> SpeedProbe:
    """This machine's speed for this run now (load from other processes included): a matmul of the model's
    shape (runtime.matmul_gflops, the precision probe's own) for ~0.25 s, then one block's attention."""
    import time

    import torch

    from finetune.runtime.device import matmul_gflops

    hidden = getattr(model_config, "n_embd", None) or getattr(model_config, "hidden_size", 768)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    rows = min(plan.batch_size * plan.block_size, 1024)
    started = time.perf_counter()
    gflops = matmul_gflops(hidden, dtype, rows=rows, device=device, seconds=0.25)
    attention = attention_seconds(model_config, plan.block_size, dtype, device, attention_dropout(model_config, cfg),
                                  fast_cpu_dropout=device.type == "cpu" and not cfg.torch_dropout)
    return SpeedProbe(gflops, time.perf_counter() - started, rows, attention, plan.block_size)


def attention_dropout(model_config, cfg: TrainConfig) -> float:
    """The dropout on attention probabilities the run trains with: --dropout, else the model config's."""
    if cfg.dropout is not None:
        return cfg.dropout
    for key in ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"):
        if isinstance(value := getattr(model_config, key, None), float):
            return value
    return 0.0


def attention_seconds(model_config, block_size: int, dtype, device, dropout: float, fast_cpu_dropout: bool,
                      seconds: float = 0.15) -> float:
    """Seconds of one block's causal self-attention in one layer, forward and backward, through the function
    the run will use: models.cpu_dropout's with dropout on a CPU (unless --torch-dropout), else torch's
    scaled_dot_product_attention (its math path with dropout on a CPU, a fused kernel otherwise), for about
    `seconds` or 20 runs. Timed on at most 2 heads and scaled to all of them: every head costs the same."""
    import time
    import types

    import torch

    from finetune.models.cpu_dropout import attention_with_cpu_dropout

    hidden = getattr(model_config, "n_embd", None) or getattr(model_config, "hidden_size", 768)
    heads = getattr(model_config, "n_head", None) or getattr(model_config, "num_attention_heads", 12)
    timed_heads = min(heads, 2)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, timed_heads, block_size, hidden // heads, generator=generator)
               .to(dtype=dtype, device=device).requires_grad_() for _ in range(3))
    module = types.SimpleNamespace(fast_cpu_dropout=True, training=True, is_causal=True)

    def forward_and_backward():
        if fast_cpu_dropout and dropout > 0:
            out = attention_with_cpu_dropout(module, q, k, v, None, dropout=dropout)[0]
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the dropout masks draw from the default generator: on a fork of it, so the run's random stream is as
    # without the probe
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        forward_and_backward()  # warm-up: kernel selection, first-touch of the buffers
        runs, started = 0, time.perf_counter()
        while ((elapsed := time.perf_counter() - started) < seconds and runs < 20) or runs < 1:
            forward_and_backward()
            runs += 1
    return elapsed / runs * heads / timed_heads


def training_flops_per_token(model_config, n_params: int, block_size: int, lora: bool = False,
                             gradient_checkpointing: bool = False, attention: bool = True) -> float:
    """Forward and backward FLOPs per trained token: 2 per weight forward, 4 backward (2 without the weights'
    own gradients: LoRA's frozen base), 2 more with recomputed activations; plus (attention=True) attention's
    QK^T and AV, 12 x layers x hidden x block (the nanoGPT / PaLM count)."""
    n_layer = getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 12)
    hidden = getattr(model_config, "n_embd", None) or getattr(model_config, "hidden_size", 768)
    per_weight = (4 if lora else 6) + (2 if gradient_checkpointing else 0)
    return per_weight * n_params + (12 * n_layer * hidden * block_size if attention else 0)


def run_seconds(cfg: TrainConfig, plan: Plan, model_config, n_params: int, speed: SpeedProbe, precision: str,
                world_size: int, device, lora: bool) -> float:
    """Training plus evaluation, at the measured speed. On a CPU the processes share its cores, so the work of
    all of them runs at the machine's speed; on GPUs each process has its own."""
    rate = speed.gflops * 1e9 * STEP_SHARE_OF_MATMUL_SPEED.get(precision, 0.45)
    parallel = world_size if device.type == "cuda" else 1
    tokens = plan.total_steps * plan.tokens_per_step
    timed = speed.attention_seconds > 0
    train = tokens * training_flops_per_token(model_config, n_params, plan.block_size, lora,
                                              cfg.gradient_checkpointing, attention=not timed) / rate
    if timed:  # each block's attention in every layer; recomputed activations add a forward, a third of it
        n_layer = getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 12)
        per_block = speed.attention_seconds * (plan.block_size / speed.attention_block) ** 2  # (query, key) pairs
        train += tokens / plan.block_size * n_layer * per_block * (4 / 3 if cfg.gradient_checkpointing else 1)
    evaluation = count_evaluations(cfg, plan) * eval_blocks(cfg, plan) * plan.block_size * \
        training_flops_per_token(model_config, n_params, plan.block_size) / 3 / rate  # a forward pass: a third
    return (train + evaluation) / parallel


def time_estimate_lines(cfg: TrainConfig, plan: Plan, model_config, n_params: int, speed: SpeedProbe,
                        precision: str, world_size: int, device, lora: bool) -> list[str]:
    """The plan's time line, and on a CPU, when the run is long, the settings that shorten it with their times."""
    from finetune.core.console import format_duration

    def seconds_for(changed: TrainConfig, changed_plan: Plan, with_lora: bool = lora) -> float:
        return run_seconds(changed, changed_plan, model_config, n_params, speed, precision, world_size, device,
                           with_lora)

    total = seconds_for(cfg, plan)
    per_step = total / max(plan.total_steps, 1)
    did = f"did {speed.gflops:,.0f}" if speed.gflops >= 10 else f"did {speed.gflops:.2g}"
    lines = [f"time estimate    ~{format_duration(total)} ({format_duration(per_step)} per step; this {device.type} "
             f"{did} GFLOP/s of {precision} matmuls at this model's shapes in a "
             f"{speed.seconds:.1f} s probe just now; rough, within about 2x)"]
    if device.type != "cpu" or total <= LONG_RUN_SECONDS:
        return lines
    shorter = []
    steps = max(1, int(10 * 60 / per_step))
    if steps < plan.total_steps:
        fewer = dataclasses_replace(plan, total_steps=steps)
        shorter.append(f"--max-steps {steps:,} ~{format_duration(seconds_for(cfg, fewer))}")
    if not lora:
        shorter.append(f"--lora-r 16 ~{format_duration(seconds_for(cfg, plan, True))}")
    if plan.block_size > 256:  # the same tokens (epochs) in shorter blocks: less attention work per token
        small = dataclasses_replace(plan, block_size=256)
        shorter.append(f"--block-size 256 ~{format_duration(seconds_for(cfg, small))}")
    if shorter:
        lines.append(f"                 long for a CPU; shorter: {'; '.join(shorter)}")
    return lines


def dataclasses_replace(plan: Plan, **changes) -> Plan:
    """The plan with other steps or blocks, the tokens it trains on per step following the block size."""
    import dataclasses

    if "block_size" in changes:
        changes["tokens_per_step"] = plan.tokens_per_step // plan.block_size * changes["block_size"]
        # the same tokens in all: as many more steps as the blocks are shorter
        changes.setdefault("total_steps", plan.total_steps * plan.block_size // changes["block_size"])
    return dataclasses.replace(plan, **changes)


def eval_description(plan: Plan, cfg: TrainConfig, world_size: int) -> str:
    blocks = eval_blocks(cfg, plan)
    steps, count = evaluation_steps(cfg, plan, limit=6), count_evaluations(cfg, plan)
    shown = ", ".join(map(str, steps)) + (f", ... ({count:,} in all)" if count > 6 else "")
    return f"{blocks:,} of {plan.val_blocks:,} val blocks, at steps {shown}"


def batch_capped(plan: Plan, cfg: TrainConfig, world_size: int) -> str:
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


def describe_plan(plan: Plan, cfg: TrainConfig, meta: dict, n_params: int, memory_gib: float,
                  device, precision: str, world_size: int, lora: dict | None = None,
                  sharding: str | None = None, sharing: int = 1, time_lines: list[str] = ()) -> str:
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
        f"memory estimate  ~{memory_gib:.2f} GiB per process (weights, grads, AdamW, activations)"
        f"{shared_memory_note(memory_gib, sharing)}",
    ]
    if lora is not None:
        lines.insert(1, f"LoRA             r {cfg.lora_r}, alpha {cfg.lora_alpha or 2 * cfg.lora_r:g}, on "
                        f"{', '.join(lora['targets'])}: {lora['trainable']:,} trainable of {lora['total']:,} "
                        f"parameters ({100 * lora['trainable'] / lora['total']:.2f} %)")
    if sharding:
        lines.append(sharding)
    lines += time_lines
    available = memory_limit_gib(cfg, device)
    if available is not None and memory_gib * sharing > available:
        anyway = "; starting anyway (--ignore-memory-estimate)" if cfg.ignore_memory_estimate else ""
        lines.append(f"                 more than {memory_limit_description(cfg, available, device)}: "
                     f"it will not fit{anyway}")
    return "\n".join(lines)


def shared_memory_note(memory_gib: float, sharing: int) -> str:
    return f", ~{memory_gib * sharing:.2f} GiB for the {sharing} processes that share this machine's memory" \
        if sharing > 1 else ""


def memory_limit_gib(cfg: TrainConfig, device) -> float | None:
    """What the memory estimate is checked against: --device-memory-gib, else the device's own memory."""
    return cfg.device_memory_gib or machine_memory_gib(device)


def memory_limit_description(cfg: TrainConfig, available: float, device) -> str:
    where = "(--device-memory-gib)" if cfg.device_memory_gib else "on this machine"
    return f"the {available:.1f} GiB of {device.type} memory {where}"


def memory_refusal(cfg: TrainConfig, plan: Plan, memory_gib: float, device, lora: dict | None,
                   sharing: int = 1) -> str | None:
    """Why the run is refused before anything loads: the estimate (times the `sharing` processes that draw on
    the same memory) is above the device's memory (None when it fits, when the memory is unknown, or with
    --ignore-memory-estimate). The HINT names every lever that lowers the estimate and is not already pulled."""
    available = memory_limit_gib(cfg, device)
    if cfg.ignore_memory_estimate or available is None or memory_gib * sharing <= available:
        return None
    levers = [f"run fewer processes (now {sharing} on this machine)"] if sharing > 1 else []
    levers += [] if lora is not None else ["train LoRA adapters instead (--lora-r 16)"]
    if not cfg.gradient_checkpointing:
        levers.append("add --gradient-checkpointing")
    smaller = [f"--batch-size (now {cfg.batch_size})"] if cfg.batch_size > 1 else []
    levers.append("lower " + " or ".join(smaller + [f"--block-size (now {plan.block_size})"]))
    if lora is None and sharing == 1:  # more processes on one CPU add memory: they share its RAM
        levers.append("shard the model over more processes with --fsdp (torchrun --nproc_per_node=N)")
    shown = ", ".join(levers[:-1]) + (", or " if len(levers) > 1 else "") + levers[-1]
    return (f"the plan's memory estimate, ~{memory_gib:.2f} GiB per process"
            f"{shared_memory_note(memory_gib, sharing)}, is more than "
            f"{memory_limit_description(cfg, available, device)}, so the run would not fit and was not started. "
            f"HINT: {shown}; or add --ignore-memory-estimate to start it anyway")
