"""Fine-tune a causal language model (GPT-2 by default) on token files from prepare_data.py.

    python prepare_data.py --input book.txt
    python finetune_generative.py --model gpt2 --data-dir data --output-dir out

This file holds the config (every flag and its --help), its validation, the training loop and main().
The loop reads top to bottom: micro-steps -> clip -> check -> step -> log -> eval -> checkpoint.
Everything else lives in the finetune/ package, one room per concern (see README, "Project layout").
Checkpoints are atomic and resume exactly (`--resume`); Ctrl-C or SIGTERM saves one before exiting.
Multi-GPU: `torchrun --nproc_per_node=N finetune_generative.py ...`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import cli, fsdp, launcher, lora
from finetune.checkpoints import list_checkpoints, load_resume_checkpoint
from finetune.console import progress_display, setup_logging
from finetune.distributed import DistInfo, all_reduce_sum, barrier, setup_distributed, shutdown
from finetune.errors import (
    EXIT_DIVERGED,
    EXIT_SAVE_FAILED,
    EXIT_SIGNAL,
    SaveFailed,
    UserError,
    exit_on_user_error,
    raise_if_problems,
)
from finetune.fsdp import clip_gradients, no_gradient_sync
from finetune.loss import forward_loss, trained_tokens_of_step
from finetune.plan import Plan, extend_plan, extension_note, make_plan, make_scheduler, restart_schedule
from finetune.rundir import output_dir_overlaps
from finetune.runtime import DEVICES, PRECISIONS
from finetune.trackers import check_report_to
from finetune.training import StopRequest, TrainingDiverged, TrainingRun

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt")
SCRIPT = Path(__file__).resolve()
log = logging.getLogger("finetune")


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every setting of a run. Each field is one flag (FLAG_GROUPS below lists them); the docstring
    under a field is that flag's --help text."""

    # --- model and data
    model: str = "gpt2"
    """hub name or local folder of the causal LM to fine-tune (weights + tokenizer)"""
    data_dir: str = "data"
    """folder with train.bin, val.bin and meta.json from prepare_data.py"""
    output_dir: str = "out"
    """where checkpoints, best/, metrics.jsonl, loss.png and the final model go"""
    block_size: int | None = None
    """tokens per training sequence (default: the model's context, at most 1024)"""
    # --- schedule
    epochs: int = 3
    """passes over the training blocks"""
    max_steps: int | None = None
    """total optimizer steps; overrides --epochs"""
    batch_size: int = 8
    """sequences per micro-batch, per process"""
    grad_accum: int = 1
    """micro-batches accumulated into one optimizer step"""
    # --- optimization
    lr: float = 5e-5
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.01
    """AdamW weight decay, on weight matrices only (not biases or LayerNorm)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.999
    """AdamW beta2"""
    warmup_steps: int | None = None
    """linear warmup in optimizer steps (takes precedence over --warmup-ratio)"""
    warmup_ratio: float = 0.05
    """warmup as a fraction of all optimizer steps"""
    scheduler: str = "linear"
    """learning-rate schedule (transformers.get_scheduler): linear, cosine, cosine_with_restarts,
    polynomial, constant, constant_with_warmup or inverse_sqrt"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this; 0 disables clipping"""
    dropout: float | None = None
    """override the model's dropout probability, e.g. 0 for speed (default: keep the model's)"""
    # --- runtime
    precision: str = "auto"
    """auto (bf16 on GPUs and CPUs that support it, fp16 on older GPUs, else fp32) | fp32 | bf16 | fp16"""
    device: str = "auto"
    """auto (CUDA, else Apple MPS, else CPU) | cuda | mps | cpu"""
    num_workers: int = 2
    """training DataLoader worker processes (validation reads its few blocks in the main process)"""
    seed: int = 1337
    """seeds the shuffle order and dropout"""
    compile: bool = False
    """torch.compile the model (not always faster: measure it on your machine; see docs/performance.md)"""
    torch_dropout: bool = False
    """on CPU, draw dropout masks with torch's own (slower) kernels instead of the faster generator of
    cpu_dropout.py: same keep-probability either way, but only torch's draws the masks Trainer draws"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, slower steps"""
    device_memory_gib: float | None = None
    """memory one process may use, in GiB, that the plan's estimate is checked against (default: the
    device's: RAM on a CPU, the GPU's own); a run the estimate exceeds is refused before anything loads"""
    fsdp: bool = False
    """shard weights, gradients and AdamW state across the torchrun processes (PyTorch FSDP2): each holds
    1/N of them, for models whose full fine-tuning does not fit one device (docs/distributed.md)"""
    # --- logging, evaluation, checkpoints
    log_every: int = 10
    """optimizer steps between metrics.jsonl lines and progress-bar updates (with stderr to a file: a progress
    line every --log-every steps or 30 s, whichever is rarer)"""
    report_to: str = "none"
    """experiment trackers that get what metrics.jsonl gets, comma-separated: none, tensorboard, mlflow,
    trackio, wandb (all local, under --output-dir; each an optional pip package; see README, "Tracking runs")"""
    eval_every: int = 250
    """optimizer steps between evaluations, besides each epoch end and the end; 0 = only those"""
    eval_batches: int | None = None
    """validation batches per evaluation, spread over the split; 0 = the whole split every time (default:
    all of them, but the run's evaluations together at most 1/20 of the batches it trains, >= 8 each)"""
    save_every: int = 500
    """optimizer steps between checkpoints, besides the end; 0 = only at the end"""
    save_total_limit: int | None = 3
    """keep the newest N checkpoint-* folders (best/ is kept apart); 0 keeps all"""
    early_stopping_patience: int | None = None
    """stop after this many evaluations without a better validation loss (the base model's at step 0 counts)"""
    # --- samples during training
    sample_prompts: list[str] = field(default_factory=list)
    """prompt to sample from at each evaluation (repeatable); written to samples.jsonl"""
    sample_every: int | None = None
    """optimizer steps between samples (default: at each evaluation)"""
    sample_max_new_tokens: int = 64
    """tokens per training-time sample"""
    # --- LoRA (finetune/lora.py; needs `pip install peft`)
    lora_r: int = 0
    """LoRA rank: train low-rank adapters on the frozen base instead of every weight; 0 = off (full
    fine-tuning). Checkpoints then hold only the adapter; the final model and best/ are merged"""
    lora_alpha: float | None = None
    """LoRA scale numerator: the adapters' output is scaled by alpha / r (default: 2 x --lora-r)"""
    lora_dropout: float | None = None
    """dropout on the adapters' input (default: 0.05)"""
    lora_target_modules: list[str] = field(default_factory=list)
    """names of the layers to adapt (default: every linear layer of the transformer blocks, for GPT-2
    c_attn, c_proj and c_fc; never the tied token embedding / lm_head)"""
    # --- run control (not part of what a resume must match)
    resume: str | None = None
    """continue from the newest checkpoint in --output-dir, or from the CHECKPOINT folder given"""
    skip_damaged_checkpoints: bool = False
    """with --resume: if the newest checkpoint is damaged, say so and continue from the newest one that loads"""
    extend: bool = False
    """with --resume: allow a larger --max-steps or --epochs than the checkpoint's, to train a run on past its
    planned end (nothing else may change); the lr schedule is planned again over the new total with the run's
    warmup, so the lr steps up from where it was (logged)"""
    overwrite: bool = False
    """replace an earlier run in --output-dir"""
    dry_run: bool = False
    """print the plan (sizes, steps, memory) and exit (exit 2 when the run would be refused)"""
    ignore_memory_estimate: bool = False
    """start even when the plan's memory estimate is above the device's memory (the estimate can be wrong)"""
    nproc: int | None = None
    """train in this many processes on this machine, started by this command (as torchrun --standalone
    --nproc_per_node N would; Ctrl-C or SIGTERM stops them all after a checkpoint); with --dry-run: plan for
    this many processes (default: the torchrun processes, or 1), with memory per process for DDP and --fsdp"""


# Every flag, by group, in --help order. A flag sets the field of its name (`--max-steps` -> max_steps).
FLAG_GROUPS = {
    "model and data": ("--model", "--data-dir", "--output-dir", "--block-size"),
    "schedule": ("--epochs", "--max-steps", "--batch-size", "--grad-accum"),
    "optimization": ("--lr", "--weight-decay", "--beta1", "--beta2", "--warmup-steps", "--warmup-ratio",
                     "--scheduler", "--max-grad-norm", "--dropout"),
    "runtime": ("--precision", "--device", "--num-workers", "--seed", "--compile", "--torch-dropout",
                "--gradient-checkpointing", "--fsdp", "--device-memory-gib"),
    "logging, evaluation and checkpoints": ("--log-every", "--eval-every", "--eval-batches", "--save-every",
                                            "--save-total-limit", "--early-stopping-patience", "--report-to"),
    "samples during training": ("--sample-prompt", "--sample-every", "--sample-max-new-tokens"),
    "LoRA": ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules"),
    "run control": ("--resume", "--extend", "--skip-damaged-checkpoints", "--overwrite", "--dry-run",
                    "--ignore-memory-estimate", "--nproc"),
}
FLAG_OPTIONS = {
    "--sample-prompt": dict(action="append", dest="sample_prompts", metavar="TEXT"),
    "--resume": dict(nargs="?", const="latest", metavar="CHECKPOINT"),
    "--report-to": dict(metavar="NAME[,NAME]"),
    "--precision": dict(choices=PRECISIONS),
    "--device": dict(choices=DEVICES),
    "--lora-target-modules": dict(nargs="+", metavar="NAME"),
}
# Settings that decide the data order and the schedule: a resume must keep them.
RESUME_MUST_MATCH = ("model", "block_size", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                     "weight_decay", "beta1", "beta2", "warmup_steps", "warmup_ratio", "scheduler",
                     "max_grad_norm", "dropout", "seed", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_target_modules")
# Flags about this invocation only: a resume takes them from the command line, never from the checkpoint.
RUN_CONTROL = {"resume", "extend", "skip_damaged_checkpoints", "overwrite", "dry_run", "device_memory_gib",
               "ignore_memory_estimate", "nproc"}


def build_arg_parser(suppress_defaults: bool = False):
    return cli.build_arg_parser(TrainConfig, FLAG_GROUPS, FLAG_OPTIONS, suppress_defaults=suppress_defaults,
                                description="Fine-tune a causal LM on token files from prepare_data.py.")


def parse_config(argv=None) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the fields whose flags were given (a resume keeps the others)."""
    cfg, explicit = cli.parse_config(TrainConfig, build_arg_parser, argv)
    return with_absolute_paths(cfg), explicit


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Folders as absolute paths, so the checkpoint's config and the printed resume command work from any
    working directory (a hub name for --model stays a name)."""
    paths = {"data_dir": str(Path(cfg.data_dir).expanduser().resolve()),
             "output_dir": str(Path(cfg.output_dir).expanduser().resolve())}
    if Path(cfg.model).expanduser().exists():
        paths["model"] = str(Path(cfg.model).expanduser().resolve())
    return dataclasses.replace(cfg, **paths)


def validate_config(cfg: TrainConfig) -> list[str]:
    """Every problem with the settings that can be seen before anything is loaded."""
    problems = []
    def positive(name, value, allow_none=False, allow_zero=False):
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not allow_zero):
            problems.append(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    positive("epochs", cfg.epochs)
    positive("max_steps", cfg.max_steps, allow_none=True)
    positive("batch_size", cfg.batch_size)
    positive("grad_accum", cfg.grad_accum)
    positive("block_size", cfg.block_size, allow_none=True)
    positive("lr", cfg.lr)
    positive("log_every", cfg.log_every)
    positive("eval_every", cfg.eval_every, allow_zero=True)
    positive("eval_batches", cfg.eval_batches, allow_none=True, allow_zero=True)
    positive("save_every", cfg.save_every, allow_zero=True)
    positive("save_total_limit", cfg.save_total_limit, allow_none=True, allow_zero=True)
    positive("early_stopping_patience", cfg.early_stopping_patience, allow_none=True)
    positive("sample_every", cfg.sample_every, allow_none=True)
    positive("sample_max_new_tokens", cfg.sample_max_new_tokens)
    positive("num_workers", cfg.num_workers, allow_zero=True)
    positive("weight_decay", cfg.weight_decay, allow_zero=True)
    positive("max_grad_norm", cfg.max_grad_norm, allow_zero=True)
    positive("warmup_steps", cfg.warmup_steps, allow_none=True, allow_zero=True)
    positive("device_memory_gib", cfg.device_memory_gib, allow_none=True)
    positive("nproc", cfg.nproc, allow_none=True)
    problems += launcher.nproc_problems(cfg.nproc, cfg.dry_run)
    if cfg.block_size is not None and cfg.block_size == 1:
        problems.append("--block-size must be at least 2 (one token predicts the next)")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.extend and not cfg.resume:
        problems.append("--extend is for a run continued with --resume (HINT: add --resume, or drop --extend)")
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler {cfg.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if any(not p.strip() for p in cfg.sample_prompts):
        problems.append("--sample-prompt must not be empty")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"--output-dir {cfg.output_dir} exists and is a file, not a folder")
    problems += output_dir_overlaps(cfg.output_dir, {"--model": cfg.model, "--data-dir": cfg.data_dir})
    problems += lora.settings_problems(cfg)
    problems += fsdp.settings_problems(cfg)
    problems += check_report_to(cfg.report_to)
    return problems


# -----------------------------------------------------------------------------
# The training loop


def train(run: TrainingRun, stop: StopRequest) -> int:
    """The loop, with a progress bar; returns the process exit code (0 done, 130/143 stopped by a signal)."""
    bar = progress_display(run.plan.total_steps, run.progress.step, run.dist_info.is_main, log)
    try:
        return train_loop(run, stop, bar)
    finally:
        bar.close()  # before any error line, so it starts on a line of its own


def train_loop(run: TrainingRun, stop: StopRequest, bar) -> int:
    cfg, plan, progress, dist_info = run.cfg, run.plan, run.progress, run.dist_info
    run.model.train()
    # tokens/s counts time spent fetching data and stepping, not evaluating or saving.
    log_losses, log_tokens, log_seconds = [], 0, 0.0
    while progress.step < plan.total_steps:
        run.sampler.set_epoch(progress.epoch)
        run.sampler.set_start(progress.samples_in_epoch)
        batches = iter(run.train_loader)
        step_start = time.perf_counter()
        while window := next_window(batches, cfg.grad_accum):
            # ---- forward/backward, clip, check, step
            lr = run.scheduler.get_last_lr()[0]
            window_samples = sum(b["input_ids"].shape[0] for b in window)
            step_loss, grad_norm, stopping = train_step(run, window, window_samples, stop, lr)
            # ---- bookkeeping
            window_tokens = window_samples * plan.block_size * dist_info.world_size
            progress.step += 1
            progress.tokens_seen += window_tokens
            progress.samples_in_epoch += window_samples
            if progress.samples_in_epoch >= run.sampler.samples_per_replica():
                progress.epoch, progress.samples_in_epoch = progress.epoch + 1, 0
            finished = progress.step >= plan.total_steps
            log_losses.append(step_loss)
            log_tokens += window_tokens
            log_seconds += time.perf_counter() - step_start
            bar.update(1)
            # ---- log
            if progress.step % cfg.log_every == 0 or finished:
                tokens_per_s = log_tokens / log_seconds if log_seconds > 0 else None
                mean_loss = sum(log_losses) / len(log_losses)
                run.record({"kind": "train", "step": progress.step, "epoch": progress.epoch,
                            "tokens": progress.tokens_seen, "loss": mean_loss,
                            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                                gnorm=f"{grad_norm:.2f}", tok_s=f"{tokens_per_s or 0:,.0f}")
                log_losses, log_tokens, log_seconds = [], 0, 0.0
            # ---- evaluate (the plan says when: --eval-every, each epoch end, the end)
            sampled = False
            if plan.evaluates_at(progress.step):
                val_loss = run.evaluate_and_track(stop)
                stopping = stopping or val_loss is None  # a stop during the evaluation (agreed): save now
                finished = finished or (val_loss is not None and run.should_stop_early())
                if cfg.sample_prompts and cfg.sample_every is None and val_loss is not None:
                    run.write_samples(val_loss, stop)
                    sampled = True
            if cfg.sample_prompts and cfg.sample_every and (progress.step % cfg.sample_every == 0 or finished):
                run.write_samples(None, stop)
                sampled = True
            if sampled and not stopping:  # a stop while rank 0 sampled: every process agrees, then saves now
                stopping = stop_agreed(run, stop)
            # ---- checkpoint
            if finished or stopping or plan.saves_at(progress.step):
                run.checkpoint()
            if stopping:
                if dist_info.is_main:
                    log.warning("stopped at step %d; continue with:\n  %s", progress.step, run.resume_command())
                return EXIT_SIGNAL[stop.signum]
            if finished:
                return 0
            step_start = time.perf_counter()
    return 0


def next_window(batches, grad_accum: int) -> list:
    """Up to grad_accum micro-batches; fewer at the end of an epoch, none when it is over."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == grad_accum:
            break
    return window


def train_step(run: TrainingRun, window: list, window_samples: int, stop: StopRequest,
               lr: float) -> tuple[float, float, bool]:
    """One optimizer step over the micro-batches of `window` (`window_samples` sequences in all):
    (loss, grad norm, whether to stop after it).

    The loss of a step is the mean over all its predicted tokens: each micro-batch is weighted by its share
    of the predictions, so a short last micro-batch of an epoch counts per token, not per batch. Chat data:
    the mean over the step's trained tokens (finetune/loss.py, trained_tokens_of_step).
    """
    import torch

    cfg, model, device, dist_info, scaler = run.cfg, run.model, run.device, run.dist_info, run.scaler
    window_predictions = window_samples * (run.plan.block_size - 1)
    # chat data: each micro-batch's loss is a sum over its trained tokens, divided by those of the whole step
    # (x processes: DDP averages the gradients); a micro-batch with none adds 0
    step_targets = trained_tokens_of_step(window, device, dist_info) if "position_ids" in window[0] else None
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(window):
        # Gradients are all-reduced only on the last micro-step.
        sync = contextlib.nullcontext() if not dist_info.enabled or i == len(window) - 1 else no_gradient_sync(model)
        with sync:
            with run.ctx:
                loss, predictions = forward_loss(model, batch, device)
            share = predictions / window_predictions if step_targets is None else dist_info.world_size / step_targets
            scaler.scale(loss * share).backward()
        loss_sum += loss.detach() * share
    scaler.unscale_(run.optimizer)
    grad_norm = clip_gradients(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    stats = torch.stack([loss_sum.float(), grad_norm.float().to(device),
                         torch.tensor(float(stop.requested), device=device)])
    if dist_info.enabled:  # mean loss over processes; a signal on any rank stops them all
        all_reduce_sum(stats, dist_info)
        stats[:2] /= dist_info.world_size
    step_loss, step_grad_norm, stop_votes = stats.tolist()  # the one host sync per step
    # Decided here, where all ranks agree: a signal arriving later waits for the next step.
    if stop_votes > 0 and not stop.requested:
        stop.signum = signal.SIGTERM
    bad = "loss" if not math.isfinite(step_loss) else "gradient norm" if (
        not scaler.is_enabled() and not math.isfinite(step_grad_norm)) else None
    if bad:
        raise TrainingDiverged(f"{bad} is {step_loss if bad == 'loss' else step_grad_norm} at step "
                               f"{run.progress.step + 1} (lr {lr:.3g}); stopped before the optimizer step")
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return step_loss, step_grad_norm, stop_votes > 0


# -----------------------------------------------------------------------------
# Setting up a run


def check_before_loading(cfg: TrainConfig, explicit: set[str], dist_info: DistInfo, resume_path, state):
    """Everything that can be checked from meta.json, the model config and the tokenizer, before the weights
    load. Returns (meta, tokenizer, model_config, plan, fingerprints) or raises one UserError listing every
    problem."""
    from finetune.checkpoints import check_resume_compatible
    from finetune.data import DataError, check_data_matches_model, data_fingerprint, load_meta, tokenizer_fingerprint
    from finetune.models import load_config, load_tokenizer, load_tokenizer_and_config, model_context_length
    from finetune.packing import is_chat, packed_blocks

    try:
        meta = load_meta(cfg.data_dir)
    except DataError as exc:
        raise UserError(str(exc)) from None
    if cfg.lora_r and resume_path:  # a LoRA checkpoint holds the adapter and tokenizer; the config is the base's
        tokenizer, model_config = load_tokenizer(str(resume_path)), load_config(cfg.model)
    else:
        tokenizer, model_config = load_tokenizer_and_config(str(resume_path) if resume_path else cfg.model)
    problems = check_data_matches_model(meta, model_config.vocab_size, tokenizer, data_dir=cfg.data_dir)
    context = model_context_length(model_config)
    block_size = cfg.block_size or min(context or 1024, 1024)
    if context and block_size > context:
        problems.append(f"--block-size {block_size} is longer than the model's context of {context} tokens "
                        f"(HINT: use --block-size {context} or less)")
    chat = is_chat(meta)
    if chat:  # the template trained with goes into every tokenizer saved (checkpoints, best/, the final model)
        tokenizer.chat_template = meta["chat"]["template"]
    try:
        blocks = packed_blocks(cfg.data_dir, meta, block_size) if chat else None
    except DataError as exc:
        raise UserError(str(exc)) from None
    world_size = cfg.nproc or dist_info.world_size  # --nproc: the processes --dry-run plans for
    plan = make_plan(cfg, meta, block_size, world_size, blocks)
    if chat and plan.train_blocks < world_size:
        problems.append(f"the train split packs into {plan.train_blocks} block(s) of {block_size} tokens with something "
                        f"to train, fewer than the {world_size} process(es) (HINT: add examples with "
                        "replies, or raise --block-size if they are longer than a block)")
    if chat and plan.val_blocks == 0:
        problems.append(f"the val split holds no example with a trained token in its first {block_size} tokens "
                        "(HINT: raise prepare_data.py --val-fraction, or --block-size)")
    if not chat and (plan.train_blocks < world_size or plan.train_blocks == 0):
        problems.append(f"the train split ({meta['splits']['train']['tokens']} tokens) holds no full block of "
                        f"{block_size} tokens per process (HINT: lower --block-size or add text)")
    if not chat and plan.val_blocks == 0:
        problems.append(f"the val split ({meta['splits']['val']['tokens']} tokens) holds no full block of "
                        f"{block_size} tokens (HINT: lower --block-size or raise prepare_data.py --val-fraction)")
    fingerprints = {"data_fingerprint": data_fingerprint(meta, cfg.data_dir),
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    if state is not None:
        extendable = ("max_steps", "epochs") if cfg.extend else ()
        given = {name: getattr(cfg, name) for name in RESUME_MUST_MATCH if name in explicit and name not in extendable}
        problems += check_resume_compatible(state, given, cfg.data_dir, fingerprints["data_fingerprint"],
                                            fingerprints["tokenizer_fingerprint"], dist_info.world_size,
                                            reshards=cfg.fsdp and bool(state.get("sharded")))
        problems += fsdp.resume_problems(cfg, state)
        if cfg.extend:
            plan, extend_problems = extend_plan(cfg, state["config"], meta, plan, dist_info.world_size)
            problems += extend_problems
    if cfg.fsdp:
        problems += fsdp.check_on_meta_model(model_config)
    lora_counts = None
    if cfg.lora_r:  # wrong targets, a model peft cannot wrap, another base: all before the weights load
        lora_problems, lora_counts = lora.check_on_meta_model(cfg, model_config)
        problems += lora_problems
        fingerprints["base_fingerprint"] = lora.base_fingerprint(cfg.model)
        if state is not None:
            problems += lora.resume_problems(state, fingerprints["base_fingerprint"], cfg.model)
    raise_if_problems(problems)
    return meta, tokenizer, model_config, plan, fingerprints, lora_counts


def changed_settings(cfg: TrainConfig) -> str:
    """The settings that differ from the defaults, one `--flag value` per line (the full config is in
    train_config.json in --output-dir)."""
    defaults, changed = TrainConfig(), []
    flags = {cli.field_of(flag, FLAG_OPTIONS): flag for flags in FLAG_GROUPS.values() for flag in flags}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        for v in value if isinstance(value, list) else [value]:  # --sample-prompt: one line per prompt
            shown = "" if v is True else f" {shlex.quote(v)}" if isinstance(v, str) else f" {v}"
            changed.append(f"  {flags[f.name]}{shown}")
    return "\n".join(changed) or "  (all defaults)"


def build_model(cfg: TrainConfig, tokenizer, model_source: str, device, precision: str):
    """The model to train, and how to write it: loaded, converted (LoRA), then the fast CPU dropout masks,
    last so that the dropout modules a converter adds get them too (peft puts one on each adapter's input;
    the gain is measured in docs/lora.md)."""
    import torch

    from finetune.models import load_model_for_training
    from finetune.training import ModelFiles

    # LoRA and FSDP checkpoints hold no full model: the base loads from --model, the checkpoint's part after.
    # FSDP loads into CPU memory: fully_shard moves each group to the GPU and keeps only this rank's shard there.
    model = load_model_for_training(cfg.model if cfg.lora_r or cfg.fsdp else model_source,
                                    torch.device("cpu") if cfg.fsdp else device, tokenizer,
                                    dropout=cfg.dropout, gradient_checkpointing=cfg.gradient_checkpointing)
    model_files = ModelFiles(tokenizer)
    if cfg.lora_r:  # the base frozen, adapters added (from the checkpoint on a resume)
        model, model_files = lora.to_lora(model, cfg, tokenizer, model_source, precision)
    if device.type == "cpu" and not cfg.torch_dropout:
        from finetune.cpu_dropout import use_fast_cpu_dropout

        use_fast_cpu_dropout(model)
    return model, model_files


def build_run(cfg: TrainConfig, meta: dict, tokenizer, plan: Plan, fingerprints: dict, model_source: str,
              device, precision: str, dist_info: DistInfo) -> TrainingRun:
    """Model, optimizer, schedule, precision and data: decided once here, passed down in the run."""
    import torch

    from finetune.models import make_optimizer
    from finetune.packing import is_chat
    from finetune.runtime import autocast_context, seed_everything
    from finetune.training import make_loaders

    seed_everything(cfg.seed + dist_info.rank)
    model, model_files = build_model(cfg, tokenizer, model_source, device, precision)
    if cfg.fsdp:  # before the optimizer, which steps the shards
        model, model_files = fsdp.shard_model(model, device, precision), fsdp.ShardedModelFiles(tokenizer, dist_info)
    optimizer = make_optimizer(model, device, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               betas=(cfg.beta1, cfg.beta2))
    scheduler = make_scheduler(cfg.scheduler, optimizer, plan.warmup_steps, plan.total_steps)
    train_loader, sampler, val_loader = make_loaders(cfg, meta, plan, device, dist_info)
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainingRun(cfg=cfg, script=SCRIPT, model=model, model_files=model_files, tokenizer=tokenizer,
                       optimizer=optimizer, scheduler=scheduler,
                       scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                       ctx=autocast_context(device, precision), device=device, dist_info=dist_info, plan=plan,
                       train_loader=train_loader, sampler=sampler, val_loader=val_loader, fingerprints=fingerprints,
                       chat=is_chat(meta))


def resume_run(run: TrainingRun, state: dict, checkpoint: Path) -> None:
    """Optimizer, schedule, progress and RNG as the checkpoint left them; metrics.jsonl cut back to its step."""
    from finetune.checkpoints import restore_training_state
    from finetune.metrics import read_metrics, rewrite_jsonl

    restore_training_state(state, run.progress, run.optimizer, run.scheduler, run.scaler, run.dist_info.rank)
    if run.model_files.sharded:  # weights and AdamW state, re-sliced to this many processes
        run.model_files.load_shards(run.model, run.optimizer, checkpoint)
        # The position in the epoch, per process: the same samples consumed in all, spread over this many.
        run.progress.samples_in_epoch = run.progress.samples_in_epoch * state["world_size"] // run.dist_info.world_size
    if run.cfg.extend:  # the optimizer came back with the old schedule's lr
        lr_before = run.scheduler.get_last_lr()[0]
        restart_schedule(run.scheduler, run.progress.step)
        log.info(extension_note(run.cfg, run.plan, run.progress.step, lr_before, run.scheduler.get_last_lr()[0]))
    run.metrics = read_metrics(run.output_dir / "metrics.jsonl", run.progress.step)
    if run.dist_info.is_main:
        rewrite_jsonl(run.output_dir / "metrics.jsonl", run.metrics)


def stop_agreed(run: TrainingRun, stop: StopRequest) -> bool:
    """Whether any process was asked to stop; all of them agree (one all-reduce), so all stop together."""
    import torch

    votes = all_reduce_sum(torch.tensor(float(stop.requested), device=run.device), run.dist_info).item()
    if votes > 0 and not stop.requested:
        stop.signum = signal.SIGTERM
    return votes > 0


def end_of_run_summary(run: TrainingRun) -> str:
    """The validation loss before -> after, where the models are, and the commands to run next."""
    from finetune.rundir import next_commands

    evals = [m for m in run.metrics if m["kind"] == "eval"]  # step 0 first (a resume reads it back), then on
    before, after = evals[0], evals[-1]
    best = run.output_dir / "best"
    if best.is_dir():
        best_eval = min(evals, key=lambda m: m["val_loss"])
        kept = f"best model (val loss {best_eval['val_loss']:.4f}, step {best_eval['step']}) in {best}"
    else:
        kept = "and no best/: no evaluation beat the base model's val loss at step 0"
    prompt = run.cfg.sample_prompts[0] if run.cfg.sample_prompts else "Once upon a time"
    commands = "".join(f"\n  {what + ':':<23}{command}"
                       for what, command in next_commands(run.script, run.output_dir, prompt).items())
    return (f"done: val loss {before['val_loss']:.4f} at step {before['step']} -> {after['val_loss']:.4f} at step "
            f"{after['step']}; final model in {run.output_dir}, {kept}\nnext:{commands}")


def run_to_the_end(run: TrainingRun, stop: StopRequest, from_scratch: bool) -> int:
    """Step 0 (a new run), the loop, the final model; each way of stopping gets its line and exit code."""
    cfg = run.cfg
    try:
        if from_scratch:  # step 0: the base model's validation loss and samples, the "before" of the run
            if not stop.requested:  # a signal while the model loaded: no need to evaluate it
                val_loss = run.evaluate_and_track(stop)  # None: stopped within one batch
                if cfg.sample_prompts and val_loss is not None:
                    run.write_samples(val_loss, stop)
            if stop_agreed(run, stop):  # every process stops here, or none
                if run.dist_info.is_main:
                    log.warning("%s: stopped before the first training step, so nothing was trained and there is "
                                "nothing to resume; the same command starts the run again", signal.Signals(stop.signum).name)
                return EXIT_SIGNAL[stop.signum]
        exit_code = train(run, stop)
        if exit_code == 0:
            run.save_final_model()
            log.info(end_of_run_summary(run))
        return exit_code
    except TrainingDiverged as exc:
        checkpoints = list_checkpoints(run.output_dir)
        kept = f"the last checkpoint, {checkpoints[-1]}, is untouched" if checkpoints else "no checkpoint was written"
        print(f"error: {exc}; {kept}. HINT: lower --lr (now {cfg.lr:g}), raise --warmup-steps, "
              f"or use --precision fp32", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except SaveFailed as exc:
        checkpoints = list_checkpoints(run.output_dir)
        if checkpoints:
            kept = f"the newest complete checkpoint, {checkpoints[-1]}, is intact"
            then = f"continue with `{run.resume_command()}`"
        else:
            kept, then = "no complete checkpoint exists yet", "start again with --overwrite"
        print(f"error: {exc}; {kept}. HINT: free disk space (or lower --save-total-limit), then {then}",
              file=sys.stderr, flush=True)
        return EXIT_SAVE_FAILED
    except KeyboardInterrupt:
        print("error: aborted by a second interrupt; the newest complete checkpoint is intact",
              file=sys.stderr, flush=True)
        return EXIT_SIGNAL[signal.SIGINT]
    finally:
        run.close()


# -----------------------------------------------------------------------------
# main


@exit_on_user_error
def main(argv=None) -> int:
    from finetune.models import count_parameters
    from finetune.plan import describe_plan, estimate_fsdp_memory_gib, estimate_memory_gib, memory_refusal, sharding_line
    from finetune.rundir import check_output_dir, locked_output_dir, prepare_output_dir
    from finetune.runtime import get_device, library_versions, resolve_precision

    # ---- settings: validated before anything loads; a resume keeps the checkpoint's unless given
    cfg, explicit = parse_config(argv)
    raise_if_problems(validate_config(cfg))
    if launcher.wanted(cfg.nproc, cfg.dry_run):  # --nproc N: this process starts the N that train, and waits
        return launcher.launch(cfg.nproc, str(SCRIPT), sys.argv[1:] if argv is None else list(map(str, argv)), cfg.device)
    dist_info = setup_distributed(cfg.device)
    setup_logging("finetune", dist_info.is_main)
    resume_path, state = load_resume_checkpoint(cfg.resume, Path(cfg.output_dir), cfg.skip_damaged_checkpoints)
    if state is not None:
        cfg = cli.merge_resumed_config(cfg, state["config"], explicit, RUN_CONTROL)
        if cfg.fsdp and state.get("sharded"):  # another number of processes: the same global batch
            cfg, problem = fsdp.rescaled_for_world_size(cfg, state, dist_info.world_size, explicit)
            raise_if_problems([problem] if problem else [])
    meta, tokenizer, model_config, plan, fingerprints, lora_counts = check_before_loading(
        cfg, explicit, dist_info, resume_path, state)
    if cfg.extend:  # the warmup the plan kept, in the config the checkpoints record (a later --resume plans the same)
        cfg = dataclasses.replace(cfg, warmup_steps=plan.warmup_steps)
    device = get_device(cfg.device, dist_info.local_rank if dist_info.enabled else None)
    precision = resolve_precision(cfg.precision, device, getattr(model_config, "hidden_size", None))  # a probe's shape
    if cfg.fsdp and precision == "fp16":
        raise UserError("--fsdp runs in fp32 or bf16, not fp16 (the loss scaler of fp16 does not take sharded "
                        "gradients here). HINT: --precision bf16 on a GPU that has it, else --precision fp32")
    n_params = count_parameters(model_config)
    world_size = cfg.nproc or dist_info.world_size
    memory_gib = estimate_memory_gib(model_config, n_params, cfg, plan, precision, lora=lora_counts)  # DDP's
    sharding = None
    if not cfg.lora_r and (cfg.fsdp or world_size > 1):  # what each engine needs per process, side by side
        fsdp_gib = estimate_fsdp_memory_gib(model_config, n_params, cfg, plan, precision, world_size, device.type)
        sharding = sharding_line(memory_gib, fsdp_gib, world_size, cfg.fsdp, device)
        memory_gib = fsdp_gib if cfg.fsdp else memory_gib
    plan_text = describe_plan(plan, cfg, meta, n_params, memory_gib, device, precision, world_size,
                              lora=lora_counts, sharding=sharding)
    large_adapter = lora.size_warning(lora_counts) if lora_counts else None
    if large_adapter:  # worth a word, not a refusal: a large rank can be meant
        log.warning(large_adapter)
    too_big = memory_refusal(cfg, plan, memory_gib, device, lora_counts)
    if cfg.dry_run and dist_info.is_main:
        print(plan_text)
    if too_big:  # before the weights load, not at the wall (the dry run says so by its exit code too)
        raise UserError(too_big)
    if cfg.dry_run:
        return 0

    # ---- the output folder: one run at a time, an earlier run only replaced on request
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir, resume=state is not None, overwrite=cfg.overwrite,
                     script=SCRIPT.name if dist_info.is_main else None)
    barrier(dist_info)  # every rank has checked before rank 0 writes there
    with locked_output_dir(output_dir, SCRIPT.name) if dist_info.is_main else contextlib.nullcontext():
        if dist_info.is_main:
            prepare_output_dir(output_dir, cfg.overwrite and state is None,
                               json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        log.info("settings (not at their defaults; all of them in %s):\n%s", output_dir / "train_config.json",
                 changed_settings(cfg))
        log.info("versions %s", json.dumps(library_versions()))
        log.info("device %s, precision %s, %d process(es)%s", device, precision, dist_info.world_size,
                 f", resuming from {resume_path}" if resume_path else "")
        log.info("plan\n%s", plan_text)

        # ---- model, optimizer, data; then step 0, the loop and the final model. A signal from here on
        # (the model loading, step 0 included) stops the run with its own message, not a traceback.
        stop = StopRequest()
        previous_handlers = stop.install()
        try:
            run = build_run(cfg, meta, tokenizer, plan, fingerprints, str(resume_path or cfg.model), device,
                            precision, dist_info)
            if state is not None:
                resume_run(run, state, resume_path)
            run.start_trackers(state)
            return run_to_the_end(run, stop, from_scratch=state is None)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            shutdown(dist_info)

if __name__ == "__main__":
    sys.exit(main())
