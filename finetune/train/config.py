"""The training script's settings: one typed field per flag, grouped as `--help` groups them.

Each group is a small dataclass whose docstring is the group's title in --help; the docstring under a field
is that flag's help text (cli.py reads both). `TrainConfig` is all the groups in one flat object, so a
setting reads as `cfg.lr` everywhere. A flag is its field's name with dashes (`max_steps` -> `--max-steps`)
unless the field's metadata names another (`sample_prompts` -> `--sample-prompt`, repeatable).
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core import cli
from finetune.core.flags import shared

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt")


@dataclass
class ModelAndData:
    """model and data"""

    model: str = shared("model", "gpt2")
    """hub name or local folder of the causal LM to fine-tune (weights + tokenizer)"""
    data_dir: str = shared("data_dir", "data")
    """folder with train.bin, val.bin and meta.json from prepare_data.py"""
    output_dir: str = shared("output_dir", "out", metavar=None)
    """where checkpoints, best/, metrics.jsonl, loss.png and the final model go"""
    block_size: int | None = shared("block_size", None, metavar=None)
    """tokens per training sequence (default: the model's context, at most 1024)"""


@dataclass
class Schedule:
    """schedule"""

    epochs: int = 3
    """passes over the training blocks"""
    max_steps: int | None = None
    """total optimizer steps; overrides --epochs"""
    batch_size: int = shared("batch_size", 8, metavar=None)
    """sequences per micro-batch, per process"""
    grad_accum: int = shared("grad_accum", 1, metavar=None)
    """micro-batches accumulated into one optimizer step"""


@dataclass
class Optimization:
    """optimization"""

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


@dataclass
class Runtime:
    """runtime"""

    precision: str = shared("precision", "auto")
    """auto (bf16 on GPUs and CPUs that support it, fp16 on older GPUs, else fp32) | fp32 | bf16 | fp16"""
    device: str = shared("device", "auto")
    """auto (CUDA, else Apple MPS, else CPU) | cuda | mps | cpu"""
    num_workers: int = shared("num_workers", 2)
    """training DataLoader worker processes (validation reads its few blocks in the main process)"""
    seed: int = shared("seed", 1337)
    """seeds the shuffle order and dropout"""
    compile: bool = False
    """torch.compile the model (not always faster: measure it on your machine; see docs/performance.md)"""
    torch_dropout: bool = False
    """on CPU, draw dropout masks with torch's own (slower) kernels instead of the faster generator of
    cpu_dropout.py: same keep-probability either way, but only torch's draws the masks Trainer draws"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, slower steps"""
    fsdp: bool = False
    """shard weights, gradients and AdamW state across the torchrun processes (PyTorch FSDP2): each holds
    1/N of them, for models whose full fine-tuning does not fit one device (docs/distributed.md)"""
    device_memory_gib: float | None = None
    """memory one process may use, in GiB, that the plan's estimate is checked against (default: the
    device's: RAM on a CPU, the GPU's own); a run the estimate exceeds is refused before anything loads"""


@dataclass
class Logging:
    """logging, evaluation and checkpoints"""

    log_every: int = 10
    """optimizer steps between metrics.jsonl lines and progress-bar updates (with stderr to a file: a progress
    line every --log-every steps or 30 s, whichever is rarer, and one at least every ~60 s); a stop writes the
    steps since the last line first"""
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
    report_to: str = field(default="none", metadata={"metavar": "NAME[,NAME]", "action": cli.StoreOnce})
    """experiment trackers that get the train and eval lines of metrics.jsonl, comma-separated: none, tensorboard, mlflow,
    trackio, wandb (all local, under --output-dir; each an optional pip package; see docs/tracking.md)"""


@dataclass
class Samples:
    """samples during training"""

    sample_prompts: list[str] = field(default_factory=list, metadata={
        "flag": "--sample-prompt", "action": "append", "metavar": "TEXT"})
    """prompt to sample from at each evaluation (repeatable); written to samples.jsonl"""
    sample_every: int | None = None
    """optimizer steps between samples (default: at each evaluation)"""
    sample_max_new_tokens: int = 64
    """tokens per training-time sample"""


@dataclass
class LoRA:
    """LoRA"""

    lora_r: int = 0
    """LoRA rank: train low-rank adapters on the frozen base instead of every weight; 0 = off (full
    fine-tuning). Checkpoints then hold only the adapter; the final model and best/ are merged"""
    lora_alpha: float | None = None
    """LoRA scale numerator: the adapters' output is scaled by alpha / r (default: 2 x --lora-r)"""
    lora_dropout: float | None = None
    """dropout on the adapters' input (default: 0.05)"""
    lora_target_modules: list[str] = field(default_factory=list, metadata={"nargs": "+", "metavar": "NAME"})
    """names of the layers to adapt (default: every linear layer of the transformer blocks, for GPT-2
    c_attn, c_proj and c_fc; never the tied token embedding / lm_head)"""


@dataclass
class Preference:
    """preference tuning (data of prompt/chosen/rejected pairs; docs/preference.md)"""

    dpo_beta: float = 0.1
    """DPO's beta: how far the model may move from the starting model (the reference); higher keeps it closer"""


@dataclass
class RunControl:
    """run control"""

    resume: str | None = field(default=None, metadata={"nargs": "?", "const": "latest", "metavar": "CHECKPOINT"})
    """continue from the newest checkpoint in --output-dir, or from the CHECKPOINT folder given"""
    extend: bool = False
    """with --resume: allow a larger --max-steps or --epochs than the checkpoint's, to train a run on past its
    planned end (nothing else may change); the lr schedule is planned again over the new total with the run's
    warmup, so the lr steps up from where it was (logged)"""
    skip_damaged_checkpoints: bool = False
    """with --resume: if the newest checkpoint is damaged, say so and continue from the newest one that loads"""
    overwrite: bool = shared("overwrite", False)
    """replace an earlier run in --output-dir"""
    dry_run: bool = False
    """print the plan (sizes, steps, memory) and exit (exit 2 when the run would be refused)"""
    ignore_memory_estimate: bool = False
    """start even when the plan's memory estimate is above the device's memory (the estimate can be wrong)"""
    nproc: int | None = shared("nproc", None)
    """train in this many processes on this machine, started by this command (as torchrun --standalone
    --nproc_per_node N would; Ctrl-C or SIGTERM stops them all after a checkpoint); with --dry-run: plan for
    this many processes (default: the torchrun processes, or 1), with memory per process for DDP and --fsdp"""


# --help order. dataclasses take the fields of the last base first, hence TrainConfig's bases in reverse.
GROUPS = (ModelAndData, Schedule, Optimization, Runtime, Logging, Samples, LoRA, Preference, RunControl)


@dataclass
class TrainConfig(RunControl, Preference, LoRA, Samples, Logging, Runtime, Optimization, Schedule, ModelAndData):
    """Every setting of a run, as one flat object (the groups above hold the fields and their help)."""


# Settings that decide the data order and the schedule: a resume must keep them.
RESUME_MUST_MATCH = ("model", "block_size", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                     "weight_decay", "beta1", "beta2", "warmup_steps", "warmup_ratio", "scheduler",
                     "max_grad_norm", "dropout", "seed", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_target_modules", "dpo_beta")
# About this invocation only (the run-control group, and how much memory this machine has): a resume takes
# them from the command line, never from the checkpoint.
RUN_CONTROL = {f.name for f in dataclasses.fields(RunControl)} | {"device_memory_gib"}


def build_arg_parser(suppress_defaults: bool = False):
    return cli.build_arg_parser(GROUPS, suppress_defaults=suppress_defaults,
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
    """Every problem with the settings' own values (the rooms that own a feature add theirs: lora, fsdp,
    trackers, the output folder)."""
    problems = []

    def positive(name, allow_none=False, allow_zero=False):
        value = getattr(cfg, name)
        if value is None and allow_none:
            return
        if value is None or value < 0 or (value == 0 and not allow_zero):
            flag, default = f"--{name.replace('_', '-')}", getattr(TrainConfig, name, None)
            example = f"{flag} {default} (the default)" if default else f"{flag} 1" + (", or leave it out" if
                                                                                      allow_none else "")
            problems.append(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}. HINT: e.g. {example}")

    # name: (None allowed, 0 allowed)
    limits = {"epochs": (False, False), "max_steps": (True, False), "batch_size": (False, False),
              "grad_accum": (False, False), "block_size": (True, False), "lr": (False, False),
              "log_every": (False, False), "eval_every": (False, True), "eval_batches": (True, True),
              "save_every": (False, True), "save_total_limit": (True, True), "early_stopping_patience": (True, False),
              "sample_every": (True, False), "sample_max_new_tokens": (False, False), "num_workers": (False, True),
              "weight_decay": (False, True), "max_grad_norm": (False, True), "warmup_steps": (True, True),
              "device_memory_gib": (True, False), "nproc": (True, False), "dpo_beta": (False, False)}
    for name, (allow_none, allow_zero) in limits.items():
        positive(name, allow_none, allow_zero)
    if cfg.block_size is not None and cfg.block_size == 1:
        problems.append("--block-size must be at least 2 (one token predicts the next). HINT: e.g. --block-size 256, "
                        "or leave it out for the model's context")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}. HINT: e.g. --warmup-ratio 0.05")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(cfg, name)}. HINT: e.g. --{name} "
                            f"{getattr(TrainConfig, name)} (the default)")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {cfg.dropout}. HINT: e.g. --dropout 0.1, or leave it out "
                        "to keep the model's")
    if cfg.extend and not cfg.resume:
        problems.append("--extend is for a run continued with --resume. HINT: add --resume, or drop --extend")
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler {cfg.scheduler!r} is not one of {', '.join(SCHEDULERS)}. HINT: pick one of "
                        "those, e.g. --scheduler cosine")
    if any(not p.strip() for p in cfg.sample_prompts):
        problems.append("--sample-prompt must not be empty. HINT: give it some text, or leave it out")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"--output-dir {cfg.output_dir} exists and is a file, not a folder. HINT: choose another "
                        "--output-dir")
    return problems


def changed_settings(cfg: TrainConfig) -> str:
    """The settings that differ from the defaults, one `--flag value` per line (the full config is in
    train_config.json in --output-dir)."""
    defaults, changed = TrainConfig(), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        for v in value if isinstance(value, list) else [value]:  # --sample-prompt: one line per prompt
            shown = "" if v is True else f" {shlex.quote(v)}" if isinstance(v, str) else f" {v}"
            changed.append(f"  {cli.flag_of(f)}{shown}")
    return "\n".join(changed) or "  (all defaults)"
