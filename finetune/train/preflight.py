"""Everything a run checks before its weights load: the settings, the checkpoint a --resume continues, the data
against the model's config and tokenizer, the plan and its memory. Problems are collected, then raised as one
UserError (every line at once), so a bad run costs seconds, not a model load.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.core.errors import UserError, raise_if_problems
from finetune.formats.checkpoints import check_resume_compatible, load_resume_checkpoint
from finetune.runtime import launcher
from finetune.runtime.distributed import DistInfo

from . import lora, strategies
from .config import RESUME_MUST_MATCH, RUN_CONTROL, TrainConfig, validate_config
from .objectives import Objective
from .plan import Plan, extend_plan, make_plan
from .rundir import output_dir_overlaps
from .strategies import Strategy, strategy_for
from .trackers import check_report_to

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


def settings_problems(cfg: TrainConfig) -> list[str]:
    """The settings' own problems and those of each feature's flags: nothing is read from disk yet."""
    return (validate_config(cfg) + launcher.nproc_problems(cfg.nproc, cfg.dry_run)
            + output_dir_overlaps(cfg.output_dir, {"--model": cfg.model, "--data-dir": cfg.data_dir})
            + strategies.settings_problems(cfg) + check_report_to(cfg.report_to))


@dataclass
class Resume:
    """The checkpoint a --resume continues from, and its training state."""
    path: Path
    state: dict


def resumed_config(cfg: TrainConfig, explicit: set[str], dist_info: DistInfo) -> tuple[TrainConfig, Resume | None]:
    """With --resume: the checkpoint, and the config it recorded with the flags given now on top of it."""
    from finetune.core.cli import merge_resumed_config

    path, state = load_resume_checkpoint(cfg.resume, Path(cfg.output_dir), cfg.skip_damaged_checkpoints)
    if state is None:
        return cfg, None
    cfg = merge_resumed_config(cfg, state["config"], explicit, RUN_CONTROL)
    raise_if_problems(strategies.settings_problems(cfg))  # --fsdp given now, on a LoRA checkpoint: refused here
    cfg, problem = strategy_for(cfg).resumed_config(cfg, state, dist_info.world_size, explicit)
    raise_if_problems([problem] if problem else [])
    return cfg, Resume(path, state)


@dataclass
class Preflight:
    """What the checks found, passed on to the set-up: the run is built from it."""
    meta: dict                        # the data's meta.json
    tokenizer: PreTrainedTokenizerBase
    model_config: PretrainedConfig
    plan: Plan
    fingerprints: dict                # data, tokenizer (and LoRA base) fingerprints a resume is checked against
    lora_counts: dict | None          # parameter counts of the adapters (lora.check_on_meta_model), LoRA runs only
    objective: Objective              # what the data asks to train: text, chat, preference (finetune/train/objectives/)
    strategy: Strategy                # how the weights train: full, LoRA, FSDP (finetune/train/strategies/)


def check_before_loading(cfg: TrainConfig, explicit: set[str], dist_info: DistInfo, resume: Resume | None) -> Preflight:
    """Everything that can be checked from meta.json, the model config and the tokenizer, before the weights
    load; raises one UserError listing every problem."""
    from finetune.data.dataset import DataError, check_data_matches_model, data_fingerprint, load_meta, tokenizer_fingerprint
    from finetune.models.loading import model_context_length

    from .objectives import objective_for

    state = resume.state if resume else None
    strategy = strategy_for(cfg)
    try:
        meta = load_meta(cfg.data_dir, cfg.model)
    except DataError as exc:
        raise UserError(str(exc)) from None
    tokenizer, model_config = strategy.tokenizer_and_config(resume.path if resume else None)
    problems = check_data_matches_model(meta, model_config.vocab_size, tokenizer, data_dir=cfg.data_dir)
    context = model_context_length(model_config)
    block_size = cfg.block_size or min(context or 1024, 1024)
    if context and block_size > context:
        problems.append(f"--block-size {block_size} is longer than the model's context of {context} tokens "
                        f"(HINT: use --block-size {context} or less)")
    objective = objective_for(meta, cfg)
    objective.prepare_tokenizer(tokenizer, meta)
    if objective.chat_samples:  # samples are replies rendered with the data's template: it must render them
        problems += sample_prompt_problems(cfg, tokenizer)
    try:
        blocks = objective.packed_blocks(cfg.data_dir, meta, block_size)
    except DataError as exc:
        raise UserError(str(exc)) from None
    world_size = cfg.nproc or dist_info.world_size  # --nproc: the processes --dry-run plans for
    plan = make_plan(cfg, meta, block_size, world_size, blocks)
    problems += objective.data_size_problems(meta, plan, block_size, world_size)
    fingerprints = {"data_fingerprint": data_fingerprint(meta, cfg.data_dir),
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "objective": objective.kind}
    if state is not None:
        problems += objective.resume_problems(state)
        extendable = ("max_steps", "epochs") if cfg.extend else ()
        given = {name: getattr(cfg, name) for name in RESUME_MUST_MATCH if name in explicit and name not in extendable}
        problems += check_resume_compatible(state, given, cfg.data_dir, fingerprints["data_fingerprint"],
                                            fingerprints["tokenizer_fingerprint"], dist_info.world_size,
                                            reshards=strategy.reshards(state))
        problems += strategy.resume_problems(state)
        if cfg.extend:
            plan, extend_problems = extend_plan(cfg, state["config"], meta, plan, dist_info.world_size)
            problems += extend_problems
    model_problems, lora_counts = strategy.model_problems(model_config, fingerprints, state)
    problems += model_problems
    raise_if_problems(problems)
    return Preflight(meta, tokenizer, model_config, plan, fingerprints, lora_counts, objective, strategy)


def sample_prompt_problems(cfg: TrainConfig, tokenizer) -> list[str]:
    """Chat data: each --sample-prompt is rendered as a user turn with the data's template at every evaluation;
    a template that cannot render it (one that requires a system turn, say) is refused now, not at the first
    sample of a run that has trained for an hour."""
    from finetune.formats.chat import chat_prompt_ids

    template = f"the chat template of {cfg.data_dir} (its meta.json, the template the data was rendered with)"
    hint = ("--sample-prompt renders each prompt as a lone user turn: use a template that renders one "
            "(prepare_data.py --chat-template FILE), or drop --sample-prompt")
    for prompt in cfg.sample_prompts or ():
        try:
            chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}], template=template, hint=hint)
        except UserError as exc:
            return [f"--sample-prompt {prompt!r}: {exc}"]
    return []


@dataclass
class MemoryPlan:
    """The plan as printed, with the memory per process, and why the run is refused (None: it may start)."""
    text: str
    refusal: str | None
    large_adapter: str | None         # a warning: the adapters approach the model's size


def plan_memory(cfg: TrainConfig, preflight: Preflight, dist_info: DistInfo, device: Any, precision: str) -> MemoryPlan:
    """Memory per process for this engine (and DDP against FSDP when there is more than one process), checked
    against the device's memory before the weights load."""
    from finetune.models.loading import count_parameters

    from .plan import describe_plan, measure_speed, memory_refusal, processes_sharing_memory, time_estimate_lines

    model_config, plan, lora_counts = preflight.model_config, preflight.plan, preflight.lora_counts
    n_params = count_parameters(model_config)
    world_size = cfg.nproc or dist_info.world_size
    sharing = processes_sharing_memory(cfg, world_size, device)  # on a CPU the processes share its RAM
    memory_gib, sharding = preflight.strategy.memory_per_process(model_config, n_params, plan, precision,
                                                                 world_size, device, sharing, lora_counts)
    time_lines = []
    if dist_info.is_main:  # one probe (the others would only slow it down), on the process that prints the plan
        speed = measure_speed(model_config, cfg, plan, precision, device)
        time_lines = time_estimate_lines(cfg, plan, model_config, n_params, speed, precision, world_size, device,
                                         lora=preflight.strategy.trains_adapters)
    text = describe_plan(plan, cfg, preflight.meta, n_params, memory_gib, device, precision, world_size,
                         lora=lora_counts, sharding=sharding, sharing=sharing, time_lines=time_lines)
    return MemoryPlan(text, memory_refusal(cfg, plan, memory_gib, device, lora_counts, sharing),
                      lora.size_warning(lora_counts) if lora_counts else None)


def with_extended_warmup(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """--extend: the warmup the plan kept, in the config the checkpoints record (a later --resume plans the same)."""
    return dataclasses.replace(cfg, warmup_steps=plan.warmup_steps) if cfg.extend else cfg
