"""Assembling a run from its checked settings: the model (loaded, then converted: LoRA, FSDP, CPU dropout),
the optimizer and schedule, the data loaders, and on --resume the state the checkpoint left.
Device and precision are decided once, by the caller, and passed down.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.runtime.distributed import DistInfo

from .config import TrainConfig
from .preflight import Preflight, Resume
from .strategies import strategy_for
from .training import TrainingRun

if TYPE_CHECKING:
    import torch

log = logging.getLogger("finetune")


def build_model(cfg: TrainConfig, tokenizer, model_source: str, device: torch.device, precision: str):
    """The model to train, and how to write it: loaded, converted (LoRA), then the fast CPU dropout masks,
    last so that the dropout modules a converter adds get them too (peft puts one on each adapter's input;
    the gain is measured in docs/lora.md)."""
    from finetune.models.loading import load_model_for_training

    strategy = strategy_for(cfg)
    # LoRA and FSDP checkpoints hold no full model: the base loads from --model, the checkpoint's part after.
    # FSDP loads into CPU memory: fully_shard moves each group to the GPU and keeps only this rank's shard there.
    model = load_model_for_training(strategy.weights_source(model_source), strategy.load_device(device), tokenizer,
                                    dropout=cfg.dropout, gradient_checkpointing=cfg.gradient_checkpointing)
    model, model_files = strategy.convert(model, tokenizer, model_source, precision)
    if device.type == "cpu" and not cfg.torch_dropout:
        from finetune.models.cpu_dropout import use_fast_cpu_dropout

        use_fast_cpu_dropout(model)
    return model, model_files


def build_run(cfg: TrainConfig, preflight: Preflight, resume: Resume | None, script: Path, device: torch.device,
              precision: str, dist_info: DistInfo) -> TrainingRun:
    """Model, optimizer, schedule, precision and data, in one TrainingRun; resumed when `resume` is given."""
    import torch

    from finetune.models.loading import make_optimizer
    from finetune.runtime.device import autocast_context, seed_everything

    from .plan import make_scheduler
    from .training import make_loaders

    plan = preflight.plan
    seed_everything(cfg.seed + dist_info.rank)
    model_source = str(resume.path) if resume else cfg.model
    strategy = preflight.strategy
    model, model_files = build_model(cfg, preflight.tokenizer, model_source, device, precision)
    # before the optimizer, which steps the shards
    model, model_files = strategy.shard(model, model_files, preflight.tokenizer, device, precision, dist_info)
    optimizer = make_optimizer(model, device, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    scheduler = make_scheduler(cfg.scheduler, optimizer, plan.warmup_steps, plan.total_steps)
    train_loader, sampler, val_loader = make_loaders(cfg, preflight.meta, plan, device, dist_info,
                                                     preflight.objective)
    if cfg.compile:
        model = torch.compile(model)
    model = strategy.replicate(model, device, dist_info)
    run = TrainingRun(cfg=cfg, script=script, model=model, model_files=model_files, tokenizer=preflight.tokenizer,
                      optimizer=optimizer, scheduler=scheduler,
                      scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                      ctx=autocast_context(device, precision), device=device, dist_info=dist_info, plan=plan,
                      train_loader=train_loader, sampler=sampler, val_loader=val_loader,
                      fingerprints=preflight.fingerprints, objective=preflight.objective, strategy=strategy)
    if resume:
        resume_run(run, resume)
    run.objective.start(run, resume)  # anything computed once before step 0 (DPO: the reference)
    return run


def resume_run(run: TrainingRun, resume: Resume) -> None:
    """Optimizer, schedule, progress and RNG as the checkpoint left them; metrics.jsonl cut back to its step."""
    from finetune.formats.checkpoints import restore_training_state

    from .metrics import read_metrics, rewrite_jsonl
    from .plan import extension_note, restart_schedule

    state = resume.state
    restore_training_state(state, run.progress, run.optimizer, run.scheduler, run.scaler, run.dist_info.rank)
    run.strategy.restore(run, resume)  # FSDP: weights and AdamW state, re-sliced to this many processes
    if run.cfg.extend:  # the optimizer came back with the old schedule's lr
        lr_before = run.scheduler.get_last_lr()[0]
        restart_schedule(run.scheduler, run.progress.step)
        log.info(extension_note(run.cfg, run.plan, run.progress.step, lr_before, run.scheduler.get_last_lr()[0]))
    run.metrics = read_metrics(run.output_dir / "metrics.jsonl", run.progress.step)
    if run.dist_info.is_main:
        rewrite_jsonl(run.output_dir / "metrics.jsonl", run.metrics)
