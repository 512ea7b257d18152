"""Fine-tune a causal language model (GPT-2 by default) on token files from prepare_data.py.

    python prepare_data.py --input book.txt
    python finetune_generative.py --model gpt2 --data-dir data --output-dir out

The loop is hand-written and reads top to bottom: lr -> micro-steps -> clip -> step -> log
-> eval -> checkpoint. Checkpoints are atomic and resume exactly (`--resume`); Ctrl-C or
SIGTERM saves one before exiting. Multi-GPU: `torchrun --nproc_per_node=N finetune_generative.py ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import (ArgumentParser, UserError, autocast_context, exit_on_user_error, get_device, library_versions,
                    resolve_precision)

log = logging.getLogger("finetune")

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.pt"
STATE_FORMAT_VERSION = 1
EXIT_DIVERGED = 3
# Exit codes: 0 done, 2 bad input (UserError), 3 diverged, 4 a checkpoint could not be written (disk full,
# quota, read-only or failing disk: the environment, not the settings), 130/143 stopped by SIGINT/SIGTERM.
EXIT_SAVE_FAILED = 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every setting of a run. Each field is one flag (`block_size` -> `--block-size`); the
    docstring under a field is that flag's --help text."""

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
    """torch.compile the model (on the 2-core CPU it was measured on it made steps slower; see README)"""
    torch_dropout: bool = False
    """on CPU, draw dropout masks with torch's own (slower) kernels instead of the faster generator of
    cpu_dropout.py: same keep-probability either way, but only torch's draws the masks Trainer draws"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, slower steps"""
    # --- logging, evaluation, checkpoints
    log_every: int = 10
    """optimizer steps between metrics.jsonl lines and progress-bar updates"""
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
    """stop after this many evaluations without a better validation loss"""
    # --- samples during training
    sample_prompts: list[str] = field(default_factory=list)
    """prompt to sample from at each evaluation (repeatable); written to samples.jsonl"""
    sample_every: int | None = None
    """optimizer steps between samples (default: at each evaluation)"""
    sample_max_new_tokens: int = 64
    """tokens per training-time sample"""
    # --- run control (not part of what a resume must match)
    resume: str | None = None
    """continue from the newest checkpoint in --output-dir, or from the CHECKPOINT folder given"""
    skip_damaged_checkpoints: bool = False
    """with --resume: if the newest checkpoint is damaged, say so and continue from the newest one that loads"""
    overwrite: bool = False
    """replace an earlier run in --output-dir"""
    dry_run: bool = False
    """print the plan (sizes, steps, memory) and exit"""


# Settings that decide the data order and the schedule: a resume must keep them.
RESUME_MUST_MATCH = ("model", "block_size", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                     "weight_decay", "beta1", "beta2", "warmup_steps", "warmup_ratio", "scheduler",
                     "max_grad_norm", "dropout", "seed")

FLAG_GROUPS = {
    "model and data": ("model", "data_dir", "output_dir", "block_size"),
    "schedule": ("epochs", "max_steps", "batch_size", "grad_accum"),
    "optimization": ("lr", "weight_decay", "beta1", "beta2", "warmup_steps", "warmup_ratio", "scheduler",
                     "max_grad_norm", "dropout"),
    "runtime": ("precision", "device", "num_workers", "seed", "compile", "torch_dropout",
                "gradient_checkpointing"),
    "logging, evaluation and checkpoints": ("log_every", "eval_every", "eval_batches", "save_every",
                                            "save_total_limit", "early_stopping_patience"),
    "samples during training": ("sample_prompts", "sample_every", "sample_max_new_tokens"),
    "run control": ("resume", "skip_damaged_checkpoints", "overwrite", "dry_run"),
}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (Python keeps none at run time, so read the source)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = " ".join(ast.literal_eval(following.value).split())
    return docs


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where there is a default worth showing and the help doesn't say it."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_arg_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """Flags from TrainConfig. With suppress_defaults, only flags given on the command line appear."""
    defaults = TrainConfig()
    docs = field_docs(TrainConfig)
    parser = ArgumentParser(description="Fine-tune a causal LM on token files from prepare_data.py.",
                            formatter_class=HelpFormatter)
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            flag = "--" + name.replace("_", "-")
            options = {"help": docs[name].replace("%", "%%"),
                       "default": argparse.SUPPRESS if suppress_defaults else getattr(defaults, name)}
            kind = TrainConfig.__dataclass_fields__[name].type
            if kind == "bool":
                options["action"] = "store_true"
            elif name == "sample_prompts":
                flag, options["action"], options["dest"], options["metavar"] = "--sample-prompt", "append", name, "TEXT"
            elif name == "resume":
                options.update(nargs="?", const="latest", metavar="CHECKPOINT")
            elif name in ("precision", "device"):
                options["choices"] = ["auto", "fp32", "bf16", "fp16"] if name == "precision" else \
                    ["auto", "cuda", "mps", "cpu"]
            else:
                options["type"] = int if "int" in kind else float if "float" in kind else str
            group.add_argument(flag, **options)
    return parser


def parse_config(argv=None) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the flags given explicitly (a resume keeps the rest)."""
    args = build_arg_parser().parse_args(argv)
    explicit = set(vars(build_arg_parser(suppress_defaults=True).parse_args(argv)))
    return TrainConfig(**vars(args)), explicit


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
    if cfg.block_size is not None and cfg.block_size == 1:
        problems.append("--block-size must be at least 2 (one token predicts the next)")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.scheduler not in SCHEDULERS:
        problems.append(f"--scheduler {cfg.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if any(not p.strip() for p in cfg.sample_prompts):
        problems.append("--sample-prompt must not be empty")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"--output-dir {cfg.output_dir} exists and is a file, not a folder")
    problems += output_dir_overlaps(cfg)
    return problems


def output_dir_overlaps(cfg: TrainConfig) -> list[str]:
    """--output-dir must not be, contain or lie inside the --model folder or the --data-dir: --overwrite
    (and the run's own writes) would delete or replace the very files the run reads."""
    output = Path(cfg.output_dir).resolve()
    problems = []
    for flag, value in (("--model", cfg.model), ("--data-dir", cfg.data_dir)):
        source = Path(value).expanduser()
        if not source.exists():
            continue  # a hub name, or missing data (reported later)
        source = source.resolve()
        if output == source or source in output.parents or output in source.parents:
            relation = ("is" if output == source else "lies inside" if source in output.parents else "contains")
            problems.append(f"--output-dir {cfg.output_dir} {relation} the {flag} folder {value}, whose files "
                            f"the run reads (and --overwrite would delete); HINT: choose an --output-dir "
                            f"outside {value}, e.g. {source.name}-finetuned next to it")
    return problems


def raise_if_problems(problems: list[str]) -> None:
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        numbered = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise UserError(f"{len(problems)} problems with the settings: {numbered}")


# -----------------------------------------------------------------------------
# Distributed (torchrun) helpers: no-ops in a single process


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_request: str) -> DistInfo:
    """Read torchrun's environment and join the process group (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    use_cuda = device_request in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        import torch.distributed as dist
        dist.barrier()


def all_reduce_sum(tensor, dist_info: DistInfo):
    if dist_info.enabled:
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# -----------------------------------------------------------------------------
# Output directory: refuse to clobber, find checkpoints


RUN_ARTIFACTS = ("metrics.jsonl", "samples.jsonl", "loss.png", "config.json", "generation_config.json",
                 "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "train_config.json")


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first. Temporary (unfinished) folders never match."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def earlier_run_artifacts(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    names = [p.name for p in output_dir.iterdir()
             if p.name in RUN_ARTIFACTS or p.name == "best" or checkpoint_step(p) is not None]
    return sorted(names)


def written_by_us(output_dir: Path) -> bool:
    """An earlier run of this script left its marks here (so --overwrite may remove its files)."""
    return ((output_dir / "train_config.json").is_file() or (output_dir / "metrics.jsonl").is_file()
            or any((c / TRAINING_STATE_FILE).is_file() for c in list_checkpoints(output_dir)))


def prepare_output_dir(cfg: TrainConfig, dist_info: DistInfo) -> None:
    """Create --output-dir; without --resume an earlier run there is refused unless --overwrite."""
    output_dir = Path(cfg.output_dir)
    earlier = earlier_run_artifacts(output_dir)
    if earlier and not cfg.resume and not cfg.overwrite:
        raise UserError(
            f"{output_dir} already holds an earlier run ({', '.join(earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''}). HINT: continue it with --resume, "
            f"replace it with --overwrite, or choose another --output-dir")
    if earlier and cfg.overwrite and not cfg.resume and not written_by_us(output_dir):
        raise UserError(
            f"--overwrite: {output_dir} holds {', '.join(earlier[:4])}{', ...' if len(earlier) > 4 else ''} but "
            f"no sign of a run of this script (train_config.json, metrics.jsonl or a checkpoint-N with "
            f"{TRAINING_STATE_FILE}), and --overwrite only removes what a run of ours wrote. HINT: choose "
            f"another --output-dir, or move those files away yourself")
    if not dist_info.is_main:
        return
    if earlier and cfg.overwrite and not cfg.resume:
        for name in earlier:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --output-dir {output_dir} ({exc.strerror}). "
                        f"HINT: choose a writable folder") from None
    restore_interrupted_publish(output_dir)
    # Unfinished checkpoints of a killed run: never complete, safe to delete.
    for leftover in [*output_dir.glob(".tmp-*"), *output_dir.glob(".write-test-*")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def restore_interrupted_publish(output_dir: Path) -> None:
    """Put back a folder that a kill caught between the two renames of publish_folder.

    There, `.tmp-old-NAME-PID` is the complete old NAME and NAME itself is gone; renaming it back
    restores the state before that save (the new folder was a temporary and is discarded).
    """
    for trash in output_dir.glob(".tmp-old-*"):
        match = re.fullmatch(r"\.tmp-old-(.+)-\d+", trash.name)
        if match and trash.is_dir() and not (output_dir / match.group(1)).exists():
            os.replace(trash, output_dir / match.group(1))


def load_resume_checkpoint(cfg: TrainConfig) -> tuple[Path | None, dict | None]:
    """The checkpoint --resume continues from, validated, and its training state; (None, None) without --resume.

    A damaged checkpoint stops the run with what is wrong with it; only --skip-damaged-checkpoints
    falls back to the newest one that loads, and it says so.
    """
    if not cfg.resume:
        return None, None
    if cfg.resume != "latest":
        path = Path(cfg.resume)
        if not (path / TRAINING_STATE_FILE).is_file():
            raise UserError(f"--resume {path}: not a checkpoint folder (no {TRAINING_STATE_FILE}). "
                            f"HINT: pass a {CHECKPOINT_PREFIX}N folder, or --resume alone for the latest")
        return path, load_training_state(path)
    checkpoints = list_checkpoints(Path(cfg.output_dir))
    if not checkpoints:
        raise UserError(f"--resume: no {CHECKPOINT_PREFIX}* folder in {cfg.output_dir}. "
                        f"HINT: check --output-dir, or start a new run without --resume")
    try:
        return checkpoints[-1], read_checkpoint(checkpoints[-1])
    except DamagedCheckpoint as exc:
        problem = f"checkpoint {checkpoints[-1]} is damaged: {exc}"
    if not cfg.skip_damaged_checkpoints:
        good = newest_loadable(checkpoints[:-1], warn=False)
        hint = (f"add --skip-damaged-checkpoints to continue from the newest good one, {good[0].name}" if good
                else "no older checkpoint loads either; start again with --overwrite")
        raise UserError(f"{problem}. HINT: {hint}")
    log.warning("%s; skipping it (--skip-damaged-checkpoints)", problem)
    good = newest_loadable(checkpoints[:-1], warn=True)
    if good is None:
        raise UserError(f"{problem}, and no older checkpoint in {cfg.output_dir} loads. "
                        f"HINT: start again with --overwrite")
    return good


def newest_loadable(checkpoints: list[Path], warn: bool) -> tuple[Path, dict] | None:
    """The newest of `checkpoints` that passes read_checkpoint, with its state; damaged ones are logged if `warn`."""
    for path in reversed(checkpoints):
        try:
            return path, read_checkpoint(path)
        except DamagedCheckpoint as exc:
            if warn:
                log.warning("checkpoint %s is damaged: %s; skipping it", path, exc)
    return None


# -----------------------------------------------------------------------------
# Checkpoints: written under a temporary name, flushed, then renamed


def capture_rng_state() -> dict:
    """Every RNG this process draws from, as plain bytes/ints (picklable across processes)."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def restore_rng_state(state: dict) -> None:
    import torch

    def as_tensor(raw: bytes):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_tensor(state["cuda"]))


def fsync_tree(folder: Path) -> None:
    """Flush every file in `folder` and the folder itself, so a rename publishes complete data."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_pretrained_files(model, tokenizer, folder: Path) -> None:
    unwrapped = unwrap_model(model)
    unwrapped.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def publish_folder(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` so that a reader sees either the old or the new folder, whole."""
    fsync_tree(tmp)
    if final.exists():
        trash = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.replace(final, trash)  # a kill from here to the next rename: restore_interrupted_publish
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(trash, final)  # keep the old folder rather than none
            raise
        shutil.rmtree(trash, ignore_errors=True)  # a leftover is deleted at the next start
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def save_checkpoint(output_dir: Path, model, tokenizer, training_state: dict, dist_info: DistInfo) -> Path:
    """Write checkpoint-{step}/ atomically: model, tokenizer, generation config, training state.

    Every rank's RNG state goes into the one training-state file (gathered to rank 0).
    """
    import torch

    rng_states = [capture_rng_state()]
    if dist_info.enabled:
        import torch.distributed as dist
        gathered = [None] * dist_info.world_size
        dist.all_gather_object(gathered, rng_states[0])
        rng_states = gathered
    final = output_dir / f"{CHECKPOINT_PREFIX}{training_state['step']}"
    if dist_info.is_main:
        tmp = output_dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            save_pretrained_files(model, tokenizer, tmp)
            # safetensors has no checksum of its own: keep one, so a resume notices bytes changed on disk.
            checksums = {"model.safetensors": file_crc32(tmp / "model.safetensors")}
            # Through a Python file, so that a full disk shows up as the OSError behind torch's RuntimeError.
            with open(tmp / TRAINING_STATE_FILE, "wb") as f:
                torch.save({**training_state, "rng": rng_states, "file_crc32": checksums}, f)
            publish_folder(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_write_failure(exc, f"checkpoint {final}")
            raise
    barrier(dist_info)
    return final


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    if not keep:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        # Renamed first, so that a kill during the delete leaves a .tmp-* leftover, not a half checkpoint.
        doomed = old.with_name(f".tmp-pruned-{old.name}-{os.getpid()}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


class DamagedCheckpoint(Exception):
    """A checkpoint folder that cannot be resumed from; the message says what is wrong with it."""


class CheckpointSaveError(Exception):
    """A checkpoint could not be written (disk full, quota, I/O error); the earlier ones are untouched."""


CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", TRAINING_STATE_FILE)
STATE_KEYS = ("step", "epoch", "samples_in_epoch", "tokens_seen", "best_val_loss", "evals_without_improvement",
              "optimizer", "scheduler", "scaler", "config", "data_fingerprint", "tokenizer_fingerprint",
              "world_size", "rng")


def raise_if_write_failure(exc: BaseException, what: str) -> None:
    """Turn a failed write (disk full, quota, I/O error) into a CheckpointSaveError naming `what`."""
    reason = write_failure(exc)
    if reason is not None:
        raise CheckpointSaveError(f"could not save {what} ({reason}); the partial files were removed") from exc


def write_failure(exc: BaseException) -> str | None:
    """The OS error behind a failed write ("No space left on device"), or None when it was something else.

    torch.save and safetensors report a full disk as RuntimeError / SafetensorError: the OSError is
    in the exception chain (torch, writing through a Python file) or "(os error N)" in the message.
    """
    cause = exc
    while cause is not None:
        if isinstance(cause, OSError):
            return f"{cause.strerror or cause}"
        cause = cause.__cause__ or cause.__context__
    match = re.search(r"os error (\d+)", str(exc))
    return os.strerror(int(match.group(1))) if match else None


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else type(exc).__name__)


def read_checkpoint(checkpoint: Path) -> dict:
    """The training state of a checkpoint that can be resumed from; DamagedCheckpoint says what is wrong.

    Checks the files are all there, config.json parses, model.safetensors and training_state.pt
    read whole and match their checksums, and the state holds what a resume needs.
    """
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"{', '.join(missing)} missing")
    try:
        json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"config.json is not readable JSON ({first_line(exc)})") from None
    check_weights_file(checkpoint / "model.safetensors")
    state = read_state_file(checkpoint / TRAINING_STATE_FILE)
    if state["format_version"] != STATE_FORMAT_VERSION:  # not damage: an older checkpoint would not help
        raise UserError(f"{checkpoint / TRAINING_STATE_FILE} has format version {state['format_version']}, "
                        f"this script writes {STATE_FORMAT_VERSION}. HINT: resume with the version that wrote it")
    if checkpoint_step(checkpoint) not in (None, state["step"]):
        raise DamagedCheckpoint(f"{TRAINING_STATE_FILE} is for step {state['step']}, not {checkpoint_step(checkpoint)}")
    # safetensors has no checksum of its own; save_checkpoint keeps one (absent in earlier versions).
    for name, crc in state.get("file_crc32", {}).items():
        if file_crc32(checkpoint / name) != crc:
            raise DamagedCheckpoint(f"{name} does not match the checksum saved with it (changed on disk)")
    return state


def check_weights_file(path: Path) -> None:
    """The header parses and covers the file exactly (so a truncated file fails), and every tensor reads."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception as exc:  # safetensors' own error type, for a short or garbled file
        raise DamagedCheckpoint(f"{path.name} cannot be read ({first_line(exc)})") from None


def read_state_file(path: Path) -> dict:
    """torch.load of training_state.pt, after checking the zip's CRCs, which torch.load does not check."""
    import torch

    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip
            corrupt = archive.testzip()
        state = torch.load(path, map_location="cpu", weights_only=True) if corrupt is None else None
    except Exception as exc:  # a truncated or garbled file: zip, unpickling or tensor errors
        raise DamagedCheckpoint(f"{path.name} cannot be read ({type(exc).__name__}: {first_line(exc)})") from None
    if corrupt is not None:
        raise DamagedCheckpoint(f"{path.name} does not match the checksums saved in it (changed on disk)")
    if not isinstance(state, dict) or any(key not in state for key in ("format_version", *STATE_KEYS)):
        raise DamagedCheckpoint(f"{path.name} lacks what a resume needs")
    return state


def load_training_state(checkpoint: Path) -> dict:
    """read_checkpoint, with damage reported as a UserError."""
    try:
        return read_checkpoint(checkpoint)
    except DamagedCheckpoint as exc:
        raise UserError(f"checkpoint {checkpoint} is damaged: {exc}. HINT: resume from an older one with "
                        f"--resume {checkpoint.parent}/{CHECKPOINT_PREFIX}N") from None


def check_resume_compatible(state: dict, cfg: TrainConfig, explicit: set[str], data_fp: str,
                            tokenizer_fp: str, dist_info: DistInfo) -> list[str]:
    """Reasons why this checkpoint cannot continue exactly with these settings."""
    saved = state["config"]
    problems = []
    if state["data_fingerprint"] != data_fp:
        problems.append(f"the data in {cfg.data_dir} differs from the data the checkpoint was trained on "
                        f"(fingerprint {data_fp} vs {state['data_fingerprint']}); HINT: use the original "
                        f"data, or start a new run")
    if state["tokenizer_fingerprint"] != tokenizer_fp:
        problems.append("the tokenizer differs from the checkpoint's; HINT: resume with the original --model")
    for name in RESUME_MUST_MATCH:
        if name in explicit and getattr(cfg, name) != saved[name]:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the checkpoint's "
                            f"{saved[name]}; HINT: drop the flag to keep the checkpoint's value")
    if state["world_size"] != dist_info.world_size:
        problems.append(f"the checkpoint was written by {state['world_size']} process(es) and this run has "
                        f"{dist_info.world_size}; the data order per process would change. HINT: resume "
                        f"with --nproc_per_node={state['world_size']}")
    return problems


# -----------------------------------------------------------------------------
# Metrics and the loss plot


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metrics of an earlier run up to a checkpoint's step; later lines came after it and are dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    rewrite_text(path, "".join(json.dumps(r) + "\n" for r in records))


def rewrite_text(path: Path, text: str) -> None:
    """Replace a small file whole: readers see the old or the new text, never a mix."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_losses(metrics: list[dict], path: Path) -> None:
    """loss.png: train and val loss against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["tokens"], m["loss"]) for m in metrics if m["kind"] == "train"]
    val = [(m["tokens"], m["val_loss"]) for m in metrics if m["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".tmp-loss.png")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Model, data and optimizer


def unwrap_model(model):
    """The plain HF model under DistributedDataParallel and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load_tokenizer_and_config(source: str):
    """Tokenizer and model config only (cheap), so settings can be checked before the weights load."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model/tokenizer {source!r}: {first_line}. HINT: offline? pass a local "
                        f"folder with --model, or set HF_HUB_OFFLINE=1 after downloading it once") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; eos never appears mid-block
    return tokenizer, model_config


def model_context_length(model_config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(source: str, cfg: TrainConfig, device, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # master weights in fp32
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.dropout
        for key, value in model.config.to_dict().items():
            if ("pdrop" in key or "dropout" in key) and isinstance(value, float):
                setattr(model.config, key, cfg.dropout)
    fuse_tanh_gelu(model)
    if device.type == "cpu" and not cfg.torch_dropout:
        from cpu_dropout import use_fast_cpu_dropout

        use_fast_cpu_dropout(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        # Renamed in recent transformers 5.x releases; the old name warns there.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model.to(device)


def fuse_tanh_gelu(model) -> int:
    """GPT-2's "gelu_new" runs as a chain of ~8 element-wise ops; torch's GELU(approximate="tanh") is the
    same formula in one kernel (equal up to rounding). Swapped in memory only: the saved config keeps
    "gelu_new", so the saved model is unchanged for every other tool."""
    import torch
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def make_optimizer(model, cfg: TrainConfig, device):
    """AdamW with weight decay on matrices only: biases and LayerNorm gains are not decayed."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is one launch per step instead of a chain of per-tensor ops.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C/SIGTERM to the main process, which saves before exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def evaluation_steps(cfg: TrainConfig, plan: Plan) -> list[int]:
    """The steps the loop evaluates at: 0, every --eval-every, each epoch end, the last step."""
    steps = {plan.total_steps}
    if cfg.eval_every:
        steps.update(range(cfg.eval_every, plan.total_steps + 1, cfg.eval_every))
    if plan.steps_per_epoch:
        steps.update(range(plan.steps_per_epoch, plan.total_steps + 1, plan.steps_per_epoch))
    return [0, *sorted(steps)]


def eval_batches_per_process(cfg: TrainConfig, plan: Plan) -> int | None:
    """--eval-batches (0 = all, returned as None), or by default the run's evaluations together get at
    most 1/20 of the micro-batches it trains (at least 8 each). A forward pass costs about half a training
    micro-step here (measured with bench/overhead.py), so evaluating stays near 3 % of the run whatever
    the size of the split, which a full pass at every evaluation would not (9 % in that benchmark)."""
    if cfg.eval_batches is not None:
        return cfg.eval_batches or None
    n_evals = len(evaluation_steps(cfg, plan))
    return max(8, plan.total_steps * cfg.grad_accum // (20 * n_evals))


def make_loaders(cfg: TrainConfig, meta: dict, plan: Plan, device, dist_info: DistInfo):
    import torch
    from torch.utils.data import DataLoader, Subset

    from dataset import EpochShuffleSampler, TextDataset, validation_blocks

    train_set = TextDataset.from_data_dir(cfg.data_dir, "train", plan.block_size, meta)
    val_set = TextDataset.from_data_dir(cfg.data_dir, "val", plan.block_size, meta)
    sampler = EpochShuffleSampler(len(train_set), seed=cfg.seed, rank=dist_info.rank,
                                  num_replicas=dist_info.world_size)
    pin = device.type == "cuda"
    # Private generators: seeding workers and iterators must not consume the global RNG (dropout).
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                              pin_memory=pin, persistent_workers=cfg.num_workers > 0,
                              worker_init_fn=ignore_signals_in_worker if cfg.num_workers > 0 else None,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_batches = eval_batches_per_process(cfg, plan)
    val_indices = validation_blocks(len(val_set), val_batches, cfg.batch_size, dist_info.rank, dist_info.world_size)
    # Validation reads a few blocks per evaluation: worker processes would cost more to start than they save.
    val_loader = DataLoader(Subset(val_set, val_indices), batch_size=cfg.batch_size, shuffle=False, pin_memory=pin,
                            generator=torch.Generator().manual_seed(cfg.seed))
    return train_loader, sampler, val_loader, len(train_set), len(val_set)


# -----------------------------------------------------------------------------
# The plan: sizes and steps, shown by --dry-run and logged at start


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


def make_plan(cfg: TrainConfig, meta: dict, block_size: int, world_size: int) -> Plan:
    from dataset import steps_per_epoch

    train_blocks = meta["splits"]["train"]["tokens"] // block_size
    val_blocks = meta["splits"]["val"]["tokens"] // block_size
    per_epoch = steps_per_epoch(train_blocks, cfg.batch_size, cfg.grad_accum, world_size)
    total = cfg.max_steps if cfg.max_steps else per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)
    return Plan(block_size, train_blocks, val_blocks, per_epoch, total, min(warmup, total),
                cfg.batch_size * cfg.grad_accum * world_size * block_size,
                total / per_epoch if per_epoch else 0.0)


def estimate_memory_gib(model_config, n_params: int, cfg: TrainConfig, block_size: int, precision: str) -> float:
    """Rough training memory: fp32 weights+grads+AdamW (16 B/param) plus activations and logits."""
    n_layer = getattr(model_config, "n_layer", None) or getattr(model_config, "num_hidden_layers", 12)
    hidden = getattr(model_config, "n_embd", None) or getattr(model_config, "hidden_size", 768)
    heads = getattr(model_config, "n_head", None) or getattr(model_config, "num_attention_heads", 12)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    tokens = cfg.batch_size * block_size
    # Activations per layer per token (Korthikanti et al. 2022), scaled from 16-bit to act_bytes.
    per_layer = tokens * (34 * hidden + 5 * heads * block_size) * act_bytes / 2
    if cfg.gradient_checkpointing:
        per_layer = tokens * hidden * act_bytes
    # The logits and the gradient next_token_loss stores for them, both in the autocast dtype.
    logits = tokens * model_config.vocab_size * 2 * act_bytes
    return (16 * n_params + n_layer * per_layer + logits) / 2**30


def count_parameters(model_config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory, no weights read
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def eval_description(plan: Plan, cfg: TrainConfig, world_size: int) -> str:
    batches = eval_batches_per_process(cfg, plan)
    blocks = plan.val_blocks if batches is None else min(plan.val_blocks, batches * cfg.batch_size * world_size)
    steps = evaluation_steps(cfg, plan)
    shown = ", ".join(map(str, steps[:6])) + (f", ... ({len(steps)} in all)" if len(steps) > 6 else "")
    return f"{blocks:,} of {plan.val_blocks:,} val blocks, at steps {shown}"


def describe_plan(plan: Plan, cfg: TrainConfig, meta: dict, n_params: int, memory_gib: float,
                  device, precision: str, world_size: int) -> str:
    lines = [
        f"model            {cfg.model} ({n_params / 1e6:.1f}M parameters)",
        f"data             {cfg.data_dir}: {meta['splits']['train']['tokens']:,} train tokens, "
        f"{meta['splits']['val']['tokens']:,} val tokens",
        f"blocks           {plan.train_blocks:,} train, {plan.val_blocks:,} val, of {plan.block_size} tokens",
        f"batch            {cfg.batch_size} x {cfg.grad_accum} accum x {world_size} process(es) = "
        f"{cfg.batch_size * cfg.grad_accum * world_size} sequences, {plan.tokens_per_step:,} tokens per step",
        f"steps            {plan.steps_per_epoch:,} per epoch, {plan.total_steps:,} total "
        f"({plan.epochs:.2f} epochs), {plan.warmup_steps:,} warmup, scheduler {cfg.scheduler}",
        f"evaluation       {eval_description(plan, cfg, world_size)}",
        f"device           {device}, precision {precision}",
        f"memory estimate  ~{memory_gib:.2f} GiB per process (weights, grads, AdamW, activations)",
    ]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Loss: next-token cross-entropy without the whole batch's fp32 logits


def next_token_loss(logits, input_ids, rows_per_chunk: int = 64):
    """Mean cross-entropy of logits[:, t] against input_ids[:, t + 1], over all B x (T - 1) predictions.

    The same value as transformers' ForCausalLMLoss (fp32 log-softmax of the same logits). In training
    it avoids that function's fp32 copy of the (batch, seq, vocab) logits and its fp32 log-probabilities
    kept for the backward pass (2 x 206 MB for GPT-2 at 4 x 256): see chunked_loss_function().
    """
    import torch

    if not logits.requires_grad:  # evaluation: the same chunks, nothing kept for a backward pass
        batch, seq, _ = logits.shape
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for b in range(batch):
            for start in range(0, seq - 1, rows_per_chunk * 4):
                end = min(start + rows_per_chunk * 4, seq - 1)
                total += torch.nn.functional.cross_entropy(
                    logits[b, start:end].float(), input_ids[b, start + 1:end + 1], reduction="sum").double()
        return (total / (batch * (seq - 1))).float()
    return chunked_loss_function().apply(logits, input_ids, rows_per_chunk)


@functools.cache
def chunked_loss_function():
    """The autograd Function, built on first use (torch is imported lazily so --help and errors are fast)."""
    import torch

    class ChunkedNextTokenLoss(torch.autograd.Function):
        """Forward computes, chunk by chunk in fp32, the loss *and* its gradient (softmax - one_hot) / n,
        stored in the logits' own dtype (what autograd would cast it to); backward only scales it."""

        @staticmethod
        def forward(ctx, logits, input_ids, rows_per_chunk):
            batch, seq, _ = logits.shape
            n = batch * (seq - 1)  # every position but the last predicts the next token; no padding here
            targets = input_ids[:, 1:]
            grad = torch.empty_like(logits)
            grad[:, -1].zero_()
            total = torch.zeros((), dtype=torch.float64, device=logits.device)
            for b in range(batch):
                for start in range(0, seq - 1, rows_per_chunk):
                    end = min(start + rows_per_chunk, seq - 1)
                    target = targets[b, start:end, None]
                    log_probs = torch.log_softmax(logits[b, start:end].float(), dim=-1)
                    total -= log_probs.gather(1, target).sum(dtype=torch.float64)
                    probs = log_probs.exp_()
                    probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                    grad[b, start:end] = probs.div_(n)
            ctx.save_for_backward(grad)
            return (total / n).float()

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return grad * grad_output.to(grad.dtype), None, None

    return ChunkedNextTokenLoss


# -----------------------------------------------------------------------------
# Evaluation


def evaluate(model, val_loader, ctx, device, dist_info: DistInfo) -> float:
    """Mean next-token loss over the validation blocks, summed exactly across processes."""
    import torch

    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, predicted tokens
    with torch.no_grad():
        for batch in val_loader:
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            with ctx:
                loss = next_token_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)
            n_predictions = input_ids.shape[0] * (input_ids.shape[1] - 1)
            totals[0] += loss.double() * n_predictions
            totals[1] += n_predictions
    all_reduce_sum(totals, dist_info)
    model.train(was_training)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


# -----------------------------------------------------------------------------
# Signals: finish the step, save, exit


class StopRequest:
    """First SIGINT/SIGTERM: stop after the current optimizer step and save. Second: abort now."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> dict:
        """Install the handlers; returns the previous ones so they can be put back."""
        return {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing this step and saving a checkpoint (again to abort now)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None


class TrainingDiverged(Exception):
    pass


# -----------------------------------------------------------------------------
# Training


@dataclass
class Progress:
    """Where training stands: everything a resume needs besides weights and optimizer."""
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # this process's samples already consumed in `epoch`
    tokens_seen: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0


def next_window(batches, grad_accum: int) -> list:
    """Up to grad_accum micro-batches; fewer at the end of an epoch, none when it is over."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == grad_accum:
            break
    return window


def train(cfg: TrainConfig, run) -> int:
    """Run the loop with the signal handlers in place; returns the process exit code."""
    from tqdm import tqdm

    stop = StopRequest()
    previous_handlers = stop.install()
    bar = tqdm(total=run.plan.total_steps, initial=run.progress.step, unit="step", dynamic_ncols=True,
               disable=not run.dist_info.is_main, file=sys.stderr)
    try:
        return train_loop(cfg, run, stop, bar)
    finally:
        bar.close()  # before any error line, so it starts on a line of its own
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def train_loop(cfg: TrainConfig, run, stop: StopRequest, bar) -> int:
    """The loop. `run` holds everything set up in main()."""
    import torch

    model, optimizer, scheduler, scaler = run.model, run.optimizer, run.scheduler, run.scaler
    progress, plan, device, ctx, dist_info = run.progress, run.plan, run.device, run.ctx, run.dist_info
    model.train()

    # tokens/s counts time spent fetching data and stepping, not evaluating or saving.
    log_losses, log_tokens, log_seconds = [], 0, 0.0
    done = progress.step >= plan.total_steps
    while not done:
        run.sampler.set_epoch(progress.epoch)
        run.sampler.set_start(progress.samples_in_epoch)
        batches = iter(run.train_loader)
        while not done:
            step_start = time.perf_counter()
            window = next_window(batches, cfg.grad_accum)
            if not window:
                break
            # ---- forward/backward over the micro-batches of one optimizer step
            lr = scheduler.get_last_lr()[0]
            window_samples = sum(b["input_ids"].shape[0] for b in window)
            window_predictions = window_samples * (plan.block_size - 1)
            loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(window):
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                # Gradients are all-reduced only on the last micro-step.
                sync = (contextlib.nullcontext() if not dist_info.enabled or i == len(window) - 1
                        else model.no_sync())
                with sync:
                    with ctx:  # use_cache=False: GPT-2's config asks for a key/value cache training never reads
                        loss = next_token_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)
                    # Weight each micro-batch by its share of the step's predictions, so a short
                    # last micro-batch counts per token, not per batch.
                    share = input_ids.shape[0] * (input_ids.shape[1] - 1) / window_predictions
                    scaler.scale(loss * share).backward()
                loss_sum += loss.detach() * share
            # ---- clip, check, step
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            step_stats = torch.stack([loss_sum.float(), grad_norm.float().to(device),
                                      torch.tensor(float(stop.requested), device=device)])
            if dist_info.enabled:  # mean loss over processes; a signal on any rank stops them all
                all_reduce_sum(step_stats, dist_info)
                step_stats[:2] /= dist_info.world_size
            step_loss, step_grad_norm, stop_votes = step_stats.tolist()  # the one host sync per step
            # Decided here, where all ranks agree: a signal arriving later waits for the next step.
            stopping = stop_votes > 0
            if stopping and not stop.requested:
                stop.signum = signal.SIGTERM
            if not math.isfinite(step_loss) or (not scaler.is_enabled() and not math.isfinite(step_grad_norm)):
                raise TrainingDiverged(
                    f"{'loss' if not math.isfinite(step_loss) else 'gradient norm'} is "
                    f"{step_loss if not math.isfinite(step_loss) else step_grad_norm} at step "
                    f"{progress.step + 1} (lr {lr:.3g}); stopped before the optimizer step")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            # ---- bookkeeping
            progress.step += 1
            progress.samples_in_epoch += window_samples
            progress.tokens_seen += window_samples * plan.block_size * dist_info.world_size
            epoch_finished = progress.samples_in_epoch >= run.sampler.samples_per_replica()
            if epoch_finished:
                progress.epoch += 1
                progress.samples_in_epoch = 0
            last_step = progress.step >= plan.total_steps
            log_losses.append(step_loss)
            log_tokens += window_samples * plan.block_size * dist_info.world_size
            log_seconds += time.perf_counter() - step_start
            bar.update(1)
            # ---- log
            if progress.step % cfg.log_every == 0 or last_step:
                record = {"kind": "train", "step": progress.step, "epoch": progress.epoch,
                          "tokens": progress.tokens_seen, "loss": sum(log_losses) / len(log_losses),
                          "lr": lr, "grad_norm": step_grad_norm,
                          "tokens_per_s": log_tokens / log_seconds if log_seconds > 0 else None}
                run.record(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", gnorm=f"{step_grad_norm:.2f}",
                                tok_s=f"{record['tokens_per_s'] or 0:,.0f}")
                log_losses, log_tokens, log_seconds = [], 0, 0.0
            # ---- evaluate (at --eval-every, each epoch end, and the end)
            if last_step or epoch_finished or (cfg.eval_every and progress.step % cfg.eval_every == 0):
                val_loss = run.evaluate_and_track()
                if (cfg.early_stopping_patience
                        and progress.evals_without_improvement >= cfg.early_stopping_patience):
                    log.info("early stopping: %d evaluations without a better val loss",
                             progress.evals_without_improvement)
                    last_step = True
                if cfg.sample_prompts and cfg.sample_every is None:
                    run.write_samples(val_loss)
            if cfg.sample_prompts and cfg.sample_every and (progress.step % cfg.sample_every == 0 or last_step):
                run.write_samples(None)
            # ---- checkpoint
            if last_step or stopping or (cfg.save_every and progress.step % cfg.save_every == 0):
                run.checkpoint()
            if stopping:
                if dist_info.is_main:
                    log.warning("stopped at step %d; continue with:\n  %s", progress.step, run.resume_command())
                return EXIT_SIGNAL[stop.signum]
            done = last_step
            if epoch_finished:
                break
    return 0


class TrainingRun:
    """What the loop works with, and the things it does besides stepping: record, evaluate, save."""

    def __init__(self, cfg: TrainConfig, **parts):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.metrics: list[dict] = []
        self.__dict__.update(parts)

    # ---- metrics
    def record(self, record: dict) -> None:
        self.metrics.append(record)
        if self.dist_info.is_main:
            append_jsonl(self.output_dir / "metrics.jsonl", record)

    # ---- evaluation, best/ and early-stopping bookkeeping
    def evaluate_and_track(self) -> float:
        progress = self.progress
        val_loss = evaluate(self.model, self.val_loader, self.ctx, self.device, self.dist_info)
        improved = progress.step > 0 and (progress.best_val_loss is None or val_loss < progress.best_val_loss)
        if progress.step > 0:
            if improved:
                progress.best_val_loss = val_loss
                progress.evals_without_improvement = 0
            else:
                progress.evals_without_improvement += 1
        self.record({"kind": "eval", "step": progress.step, "epoch": progress.epoch,
                     "tokens": progress.tokens_seen, "val_loss": val_loss,
                     "val_perplexity": math.exp(min(val_loss, 50.0))})
        if self.dist_info.is_main:
            log.info("step %d: val loss %.4f, perplexity %.2f%s", progress.step, val_loss,
                     math.exp(min(val_loss, 50.0)), " (best so far, saved to best/)" if improved else "")
            if improved:
                tmp = self.output_dir / f".tmp-best-{os.getpid()}"
                try:
                    save_pretrained_files(self.model, self.tokenizer, tmp)
                    publish_folder(tmp, self.output_dir / "best")
                except BaseException as exc:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise_if_write_failure(exc, f"the best model {self.output_dir / 'best'}")
                    raise
            if any(m["kind"] == "train" for m in self.metrics):  # not at step 0: one point, and ~1 s to import
                plot_losses(self.metrics, self.output_dir / "loss.png")
        return val_loss

    # ---- samples (rank 0 only; RNG and train/eval mode are restored by the sampler)
    def write_samples(self, val_loss: float | None) -> None:
        if not self.dist_info.is_main:
            return
        from generate import sample_during_training

        texts = sample_during_training(
            unwrap_model(self.model), self.tokenizer, self.cfg.sample_prompts,
            max_new_tokens=self.cfg.sample_max_new_tokens, seed=self.cfg.seed, device=self.device, ctx=self.ctx)
        for prompt, text in zip(self.cfg.sample_prompts, texts):
            log.info("sample at step %d: %r", self.progress.step, text)
            append_jsonl(self.output_dir / "samples.jsonl", {"step": self.progress.step, "val_loss": val_loss,
                                                             "prompt": prompt, "text": text})

    # ---- checkpoints
    def training_state(self) -> dict:
        p = self.progress
        return {
            "format_version": STATE_FORMAT_VERSION,
            "step": p.step, "epoch": p.epoch, "samples_in_epoch": p.samples_in_epoch,
            "tokens_seen": p.tokens_seen, "best_val_loss": p.best_val_loss,
            "evals_without_improvement": p.evals_without_improvement,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": dataclasses.asdict(self.cfg),
            "data_fingerprint": self.data_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "world_size": self.dist_info.world_size,
        }

    def checkpoint(self) -> None:
        path = save_checkpoint(self.output_dir, self.model, self.tokenizer, self.training_state(), self.dist_info)
        if self.dist_info.is_main:
            prune_checkpoints(self.output_dir, self.cfg.save_total_limit)
            log.info("saved %s", path)

    def resume_command(self) -> str:
        launcher = (f"torchrun --nproc_per_node={self.dist_info.world_size} " if self.dist_info.enabled
                    else "python ")
        return f"{launcher}finetune_generative.py --output-dir {self.cfg.output_dir} --resume"

    def save_final_model(self) -> None:
        """The final weights, tokenizer and generation config, directly in --output-dir."""
        if not self.dist_info.is_main:
            return
        tmp = self.output_dir / f".tmp-final-{os.getpid()}"
        try:
            save_pretrained_files(self.model, self.tokenizer, tmp)
            fsync_tree(tmp)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_write_failure(exc, f"the final model in {self.output_dir}")
            raise
        for path in tmp.iterdir():
            os.replace(path, self.output_dir / path.name)
        tmp.rmdir()
        fsync_dir(self.output_dir)


# -----------------------------------------------------------------------------
# main


def merge_resumed_config(cfg: TrainConfig, saved: dict, explicit: set[str]) -> TrainConfig:
    """On --resume, every flag not given on the command line keeps the checkpoint's value."""
    run_control = {"resume", "skip_damaged_checkpoints", "overwrite", "dry_run"}
    merged = {name: (getattr(cfg, name) if name in explicit or name in run_control else saved.get(name))
              for name in (f.name for f in dataclasses.fields(TrainConfig))}
    return TrainConfig(**merged)


def setup_logging(dist_info: DistInfo) -> None:
    from tqdm import tqdm

    class TqdmHandler(logging.Handler):  # log lines print above the progress bar, not through it
        def emit(self, record):
            tqdm.write(self.format(record), file=sys.stderr)

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if dist_info.is_main else logging.WARNING)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Writing model shards" bars at every save


def check_before_loading(cfg: TrainConfig, explicit: set[str], dist_info: DistInfo, resume_path, state):
    """Everything that can be checked from meta.json, the model config and the tokenizer.

    Returns (meta, tokenizer, model_config, plan, data_fp) or raises one UserError listing every problem.
    """
    from dataset import DataError, check_data_matches_model, data_fingerprint, load_meta, tokenizer_fingerprint

    try:
        meta = load_meta(cfg.data_dir)
    except DataError as exc:
        raise UserError(str(exc)) from None
    tokenizer, model_config = load_tokenizer_and_config(str(resume_path) if resume_path else cfg.model)
    problems = check_data_matches_model(meta, model_config.vocab_size, tokenizer)
    context = model_context_length(model_config)
    block_size = cfg.block_size or min(context or 1024, 1024)
    if context and block_size > context:
        problems.append(f"--block-size {block_size} is longer than the model's context of {context} tokens "
                        f"(HINT: use --block-size {context} or less)")
    plan = make_plan(cfg, meta, block_size, dist_info.world_size)
    if plan.train_blocks < dist_info.world_size or plan.train_blocks == 0:
        problems.append(f"the train split ({meta['splits']['train']['tokens']} tokens) holds no full block of "
                        f"{block_size} tokens per process (HINT: lower --block-size or add text)")
    if plan.val_blocks == 0:
        problems.append(f"the val split ({meta['splits']['val']['tokens']} tokens) holds no full block of "
                        f"{block_size} tokens (HINT: lower --block-size or raise prepare_data.py --val-fraction)")
    data_fp = data_fingerprint(meta, cfg.data_dir)
    if state is not None:
        problems += check_resume_compatible(state, cfg, explicit, data_fp, tokenizer_fingerprint(tokenizer),
                                            dist_info)
    raise_if_problems(problems)
    return meta, tokenizer, model_config, plan, data_fp


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@exit_on_user_error
def main(argv=None) -> int:
    import torch
    from transformers import get_scheduler

    from dataset import tokenizer_fingerprint

    cfg, explicit = parse_config(argv)
    raise_if_problems(validate_config(cfg))
    dist_info = setup_distributed(cfg.device)
    setup_logging(dist_info)
    resume_path, state = load_resume_checkpoint(cfg)
    if state is not None:
        cfg = merge_resumed_config(cfg, state["config"], explicit)
    meta, tokenizer, model_config, plan, data_fp = check_before_loading(cfg, explicit, dist_info, resume_path, state)
    device = get_device(cfg.device)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    precision = resolve_precision(cfg.precision, device)

    if cfg.dry_run:
        n_params = count_parameters(model_config)
        memory = estimate_memory_gib(model_config, n_params, cfg, plan.block_size, precision)
        if dist_info.is_main:
            print(describe_plan(plan, cfg, meta, n_params, memory, device, precision, dist_info.world_size))
        return 0

    prepare_output_dir(cfg, dist_info)
    if dist_info.is_main:  # marks the folder as a run of ours (what --overwrite may remove later)
        rewrite_text(Path(cfg.output_dir) / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    log.info("config %s", json.dumps(dataclasses.asdict(cfg)))
    log.info("versions %s", json.dumps(library_versions()))
    log.info("device %s, precision %s, %d process(es)%s", device, precision, dist_info.world_size,
             f", resuming from {resume_path}" if resume_path else "")

    # ---- model, optimizer, schedule: decided once, passed down
    seed_everything(cfg.seed + dist_info.rank)
    model = load_model(str(resume_path) if resume_path else cfg.model, cfg, device, tokenizer)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=plan.warmup_steps,
                              num_training_steps=plan.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ctx = autocast_context(device, precision)
    progress = Progress()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("plan\n%s", describe_plan(plan, cfg, meta, n_params,
                                       estimate_memory_gib(model_config, n_params, cfg, plan.block_size, precision),
                                       device, precision, dist_info.world_size))
    train_loader, sampler, val_loader, _, _ = make_loaders(cfg, meta, plan, device, dist_info)
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    run = TrainingRun(cfg, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler, ctx=ctx, device=device, dist_info=dist_info, plan=plan, progress=progress,
                      train_loader=train_loader, sampler=sampler, val_loader=val_loader,
                      data_fingerprint=data_fp, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        for name in ("step", "epoch", "samples_in_epoch", "tokens_seen", "best_val_loss",
                     "evals_without_improvement"):
            setattr(progress, name, state[name])
        run.metrics = read_metrics(run.output_dir / "metrics.jsonl", progress.step)
        if dist_info.is_main:
            rewrite_jsonl(run.output_dir / "metrics.jsonl", run.metrics)
        restore_rng_state(state["rng"][dist_info.rank])

    try:
        if state is None:
            # Step 0: the base model's validation loss and samples, the "before" of the run.
            val_loss = run.evaluate_and_track()
            if cfg.sample_prompts:
                run.write_samples(val_loss)
        exit_code = train(cfg, run)
        if exit_code == 0:
            run.save_final_model()
    except TrainingDiverged as exc:
        checkpoints = list_checkpoints(run.output_dir)
        kept = f"the last checkpoint, {checkpoints[-1]}, is untouched" if checkpoints else "no checkpoint was written"
        print(f"error: {exc}; {kept}. HINT: lower --lr (now {cfg.lr:g}), raise --warmup-steps, "
              f"or use --precision fp32", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except CheckpointSaveError as exc:
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
        return 130
    if exit_code == 0:
        if dist_info.is_main:
            log.info("done: final model in %s, best model in %s", run.output_dir, run.output_dir / "best")
    if dist_info.enabled:
        import torch.distributed as dist
        dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
