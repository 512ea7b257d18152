"""Checkpoints: the training-state dict, written atomically, validated before a resume, pruned.

A checkpoint-N/ folder holds the model files (whatever `write_model_files` writes: a full model, or a LoRA
adapter), the tokenizer, and training_state.pt: optimizer, scheduler, GradScaler, every rank's RNG
state, the position in the data, the config and the fingerprints a resume is checked against.
An FSDP run (fsdp.py) keeps weights and optimizer in sharded/ instead, one DCP file per rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError, first_line, refused_pickle
from finetune.core.fsio import atomic_folder, file_crc32, remove_our_folder
from finetune.runtime.distributed import DistInfo, all_gather_objects, barrier

log = logging.getLogger("finetune")

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")  # the one rule; generate.py uses it too
TRAINING_STATE_FILE = "training_state.pt"
STATE_FORMAT_VERSION = 1
SHARDED_FOLDER = "sharded"  # an FSDP checkpoint's weights and optimizer: DCP's .metadata + __RANK_0.distcp files
DCP_METADATA = ".metadata"


@dataclass
class Progress:
    """Where training stands: everything a resume needs besides weights, optimizer and RNG."""
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0  # this process's samples already consumed in `epoch`
    tokens_seen: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first. Temporary (unfinished) folders never match."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# -----------------------------------------------------------------------------
# The training state


def training_state(progress: Progress, optimizer, scheduler, scaler, config: dict, **fingerprints) -> dict:
    """All of a run's state but the weights and RNG, as one dict (RNG is added by save_checkpoint).
    `optimizer` None: its state is in the shards (an FSDP run)."""
    return {"format_version": STATE_FORMAT_VERSION, **dataclasses.asdict(progress),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "sharded": optimizer is None, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "config": config, **fingerprints}


def restore_training_state(state: dict, progress: Progress, optimizer, scheduler, scaler, rank: int) -> None:
    """Put a run back where training_state() + save_checkpoint() left it; this rank's RNG included (a rank
    the checkpoint had not, in a resharded FSDP run, keeps its seed; the optimizer of one is in its shards)."""
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for name in (f.name for f in dataclasses.fields(Progress)):
        setattr(progress, name, state[name])
    if rank < len(state["rng"]):
        restore_rng_state(state["rng"][rank])


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


def save_checkpoint(output_dir: Path, write_model_files: Callable[[Path], None], state: dict,
                    dist_info: DistInfo, write_shards: Callable[[Path], dict] | None = None,
                    shared_folder: Callable[[Path | None], Path] | None = None) -> Path:
    """Write checkpoint-{step}/ atomically: the model files, then training_state.pt with every rank's RNG
    state (gathered to rank 0) and a CRC32 of each .safetensors file. A collective call: every rank calls it.

    With `write_shards` (FSDP) every rank also writes its shard into rank 0's temporary folder (which
    `shared_folder` tells every rank) and returns the CRC32 of the shard files; the folder is published only
    after all of them are written, so a kill during the save leaves no checkpoint, not a partial one."""
    import torch

    rng_states = all_gather_objects(capture_rng_state(), dist_info)
    final = output_dir / f"{CHECKPOINT_PREFIX}{state['step']}"
    with atomic_folder(final, f"checkpoint {final}") if dist_info.is_main else contextlib.nullcontext() as tmp:
        checksums = {}
        if write_shards is not None:
            checksums = write_shards(shared_folder(tmp))
        if dist_info.is_main:
            write_model_files(tmp)
            # safetensors has no checksum of its own: keep one, so a resume notices bytes changed on disk.
            checksums.update({p.name: file_crc32(p) for p in sorted(tmp.glob("*.safetensors"))})
            # Through a Python file, so that a full disk shows up as the OSError behind torch's RuntimeError.
            with open(tmp / TRAINING_STATE_FILE, "wb") as f:
                torch.save({**state, "rng": rng_states, "file_crc32": checksums}, f)
    barrier(dist_info)
    return final


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints; a file in one that the run did not write (an export, say:
    anything the newest checkpoint does not hold) is moved aside first, and a checkpoint-N that is a link
    to a folder elsewhere loses only the link (fsio.remove_our_folder)."""
    if not keep:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[:-keep]:
        remove_our_folder(old, checkpoints[-1])


# -----------------------------------------------------------------------------
# Reading and validating a checkpoint before a resume


class DamagedCheckpoint(Exception):
    """A checkpoint folder that cannot be resumed from; the message says what is wrong with it."""


CHECKPOINT_FILES = ("tokenizer_config.json", TRAINING_STATE_FILE)
# The model files: a full model, or a LoRA adapter (its base is loaded from where the state says).
MODEL_LAYOUTS = (("config.json", "model.safetensors"), ("adapter_config.json", "adapter_model.safetensors"),
                 ("config.json", f"{SHARDED_FOLDER}/{DCP_METADATA}"))


STATE_KEYS = ("step", "epoch", "samples_in_epoch", "tokens_seen", "best_val_loss", "evals_without_improvement",
              "optimizer", "scheduler", "scaler", "config", "data_fingerprint", "tokenizer_fingerprint",
              "world_size", "rng")


def read_checkpoint(checkpoint: Path) -> dict:
    """The training state of a checkpoint that can be resumed from; DamagedCheckpoint says what is wrong.

    Checks the files are all there, the config parses, the weights and training_state.pt
    read whole and match their checksums, and the state holds what a resume needs.
    """
    sharded = (checkpoint / SHARDED_FOLDER).is_dir()
    layout = MODEL_LAYOUTS[2] if sharded else next(
        (files for files in MODEL_LAYOUTS if (checkpoint / files[0]).is_file()), MODEL_LAYOUTS[0])
    missing = [name for name in (*layout, *CHECKPOINT_FILES) if not (checkpoint / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"{', '.join(missing)} missing")
    config_file, weights_file = layout
    try:
        json.loads((checkpoint / config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(f"{config_file} is not readable JSON ({first_line(exc)})") from None
    if sharded:
        check_sharded_folder(checkpoint / SHARDED_FOLDER)
    else:
        check_weights_file(checkpoint / weights_file)
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


def check_sharded_folder(folder: Path) -> None:
    """An FSDP checkpoint's DCP folder, seen without a process group: the metadata lists the file and byte
    range of every piece of every tensor; each file must exist and be long enough (the CRC32s kept in
    training_state.pt then catch changed bytes). Also refused: one rank's file missing, a cut-short one."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled metadata file
        raise DamagedCheckpoint(f"{SHARDED_FOLDER}/{DCP_METADATA} cannot be read ({type(exc).__name__})") from None
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{SHARDED_FOLDER}/{name} missing (one process's shard)")
        if path.stat().st_size < size:
            raise DamagedCheckpoint(f"{SHARDED_FOLDER}/{name} is cut short ({path.stat().st_size:,} of "
                                    f"{size:,} bytes)")


def read_state_file(path: Path) -> dict:
    """torch.load of training_state.pt, after checking the zip's CRCs, which torch.load does not check."""
    import torch

    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip
            corrupt = archive.testzip()
        state = torch.load(path, map_location="cpu", weights_only=True) if corrupt is None else None
    except Exception as exc:  # a truncated or garbled file: zip, unpickling or tensor errors
        if refused_pickle(exc):  # never relay torch's advice to load it unsafely
            raise DamagedCheckpoint(f"{path.name} names Python functions to call while loading, which this script "
                                    f"never writes and its safe loader refuses") from None
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


def load_resume_checkpoint(resume: str | None, output_dir: Path,
                           skip_damaged: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint --resume continues from, validated, and its training state; (None, None) without --resume.

    `resume` is "latest" (the newest in `output_dir`) or a folder. A damaged checkpoint stops the run with
    what is wrong with it; only --skip-damaged-checkpoints falls back to the newest one that loads, and says so.
    """
    if not resume:
        return None, None
    if resume != "latest":
        path = Path(resume)
        if not (path / TRAINING_STATE_FILE).is_file():
            raise UserError(f"--resume {path}: not a checkpoint folder (no {TRAINING_STATE_FILE}). "
                            f"HINT: pass a {CHECKPOINT_PREFIX}N folder, or --resume alone for the latest")
        return path, load_training_state(path)
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise UserError(f"--resume: no {CHECKPOINT_PREFIX}* folder in {output_dir}. "
                        f"HINT: check --output-dir, or start a new run without --resume")
    try:
        return checkpoints[-1], read_checkpoint(checkpoints[-1])
    except DamagedCheckpoint as exc:
        problem = f"checkpoint {checkpoints[-1]} is damaged: {exc}"
    if not skip_damaged:
        good = newest_loadable(checkpoints[:-1], warn=False)
        hint = (f"add --skip-damaged-checkpoints to continue from the newest good one, {good[0].name}" if good
                else "no older checkpoint loads either; start again with --overwrite")
        raise UserError(f"{problem}. HINT: {hint}")
    log.warning("%s; skipping it (--skip-damaged-checkpoints)", problem)
    good = newest_loadable(checkpoints[:-1], warn=True)
    if good is None:
        raise UserError(f"{problem}, and no older checkpoint in {output_dir} loads. "
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


def check_resume_compatible(state: dict, given: dict, data_dir: str, data_fp: str, tokenizer_fp: str,
                            world_size: int, reshards: bool = False) -> list[str]:
    """Reasons why this checkpoint cannot continue exactly. `given`: the settings a resume must keep that
    were given on the command line (flag name -> value); only the training script knows which those are."""
    saved = state["config"]
    problems = []
    if state["data_fingerprint"] != data_fp:
        problems.append(f"the data in {data_dir} differs from the data the checkpoint was trained on "
                        f"(fingerprint {data_fp} vs {state['data_fingerprint']}); HINT: use the original "
                        f"data, or start a new run")
    if state["tokenizer_fingerprint"] != tokenizer_fp:
        problems.append("the tokenizer differs from the checkpoint's; HINT: resume with the original --model")
    for name, value in given.items():
        if value != saved.get(name):
            longer = ", or add --extend to train on past the end it was planned for" if name in (
                "max_steps", "epochs") else ""
            problems.append(f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                            f"{saved.get(name)}; HINT: drop the flag to keep the checkpoint's value{longer}")
    if state["world_size"] != world_size and not reshards:  # reshards: FSDP re-slices and keeps the global batch
        problems.append(f"the checkpoint was written by {state['world_size']} process(es) and this run has "
                        f"{world_size}; the data order per process would change. HINT: resume "
                        f"with --nproc {state['world_size']} (or torchrun --nproc_per_node={state['world_size']})")
    return problems
