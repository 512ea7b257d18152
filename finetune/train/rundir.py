"""The output folder of a training run: one run at a time, never clobbered, never overlapping its inputs.

What only the training script knows (its config) comes in as arguments; this module reads no flags itself.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import sys
from pathlib import Path

from finetune.core.errors import UserError
from finetune.core.fsio import folder_in_use, lock_holder, remove_leftovers, remove_our_folder, rewrite_text
from finetune.core.outdir import claimed_folder
from finetune.formats.checkpoints import SHARDED_FOLDER, TRAINING_STATE_FILE, checkpoint_step, list_checkpoints
from finetune.models.adapters import ADAPTER_BASE_FILE, ADAPTER_FILES, RELEASE_ADAPTER_DIR
from finetune.runtime.launcher import LAUNCHED_BY_NPROC

from .metrics import read_metrics
from .trackers import TRACKER_FILES

log = logging.getLogger("finetune")

CONFIG_FILE = "train_config.json"  # the run's full config; also marks the folder as written by a run of ours
# What a run of ours writes directly in --output-dir (besides best/ and checkpoint-N/): all --overwrite removes.
RUN_ARTIFACTS = ("metrics.jsonl", "samples.jsonl", "loss.png", "config.json", "generation_config.json",
                 "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "chat_template.jinja", CONFIG_FILE, *TRACKER_FILES,
                 "report_card.json", "report_card.md")  # README.md: only ours is rewritten (evaluation/card.py)
# What a run writes before its first training step: its config, the step-0 evaluation and samples, trackers.
STARTUP_FILES = ("metrics.jsonl", "samples.jsonl", CONFIG_FILE, *TRACKER_FILES)


# What the saves of a run write into best/, adapter/ and checkpoint-N/ (a model, its tokenizer, an adapter, the
# training state), so --overwrite deletes those and moves anything else found there aside (fsio.MOVED_ASIDE).
SAVED_MODEL_FILES = frozenset({*RUN_ARTIFACTS, "added_tokens.json", "tokenizer.model", "model.safetensors.index.json",
                               TRAINING_STATE_FILE, SHARDED_FOLDER,
                               *ADAPTER_FILES, ADAPTER_BASE_FILE, RELEASE_ADAPTER_DIR})
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def saved_by_a_run(name: str) -> bool:
    return name in SAVED_MODEL_FILES or SHARD_FILE.fullmatch(name) is not None


def output_dir_overlaps(output_dir: str, sources: dict[str, str]) -> list[str]:
    """--output-dir must not be, contain or lie inside a folder the run reads (`sources`: flag -> path):
    --overwrite, and the run's own writes, would delete or replace the files it reads."""
    output = Path(output_dir).resolve()
    problems = []
    for flag, value in sources.items():
        source = Path(value).expanduser()
        if not source.exists():
            continue  # a hub name, or missing data (reported later)
        source = source.resolve()
        if output == source or source in output.parents or output in source.parents:
            relation = ("is" if output == source else "lies inside" if source in output.parents else "contains")
            problems.append(f"--output-dir {output_dir} {relation} the {flag} folder {value}, whose files "
                            f"the run reads (and --overwrite would delete); HINT: choose an --output-dir "
                            f"outside {value}, e.g. {source.name}-finetuned next to it")
    return problems


def earlier_run_artifacts(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    names = [p.name for p in output_dir.iterdir()
             if p.name in RUN_ARTIFACTS or p.name in ("best", "adapter") or checkpoint_step(p) is not None]
    return sorted(names)


def written_by_us(output_dir: Path) -> bool:
    """An earlier run of this script left its marks here (so --overwrite may remove its files)."""
    return ((output_dir / CONFIG_FILE).is_file() or (output_dir / "metrics.jsonl").is_file()
            or any((c / TRAINING_STATE_FILE).is_file() for c in list_checkpoints(output_dir)))


def stopped_before_first_step(output_dir: Path) -> bool:
    """The folder holds only the start-up files of a run of ours stopped before its first step (its config,
    and in metrics.jsonl nothing after step 0): nothing was trained, so it is no earlier run to keep, and
    the same command simply starts again (those files replaced)."""
    names = earlier_run_artifacts(output_dir)
    if CONFIG_FILE not in names or not set(names) <= set(STARTUP_FILES):
        return False
    records = read_metrics(output_dir / "metrics.jsonl", up_to_step=math.inf)  # [] when there is none
    return all(record.get("step") == 0 for record in records)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool, script: str | None = None) -> None:
    """With `script` (the main process only: the others would see its own lock), a run of it still writing
    to `output_dir` is refused with its PID. Without --resume an earlier run is refused, and --overwrite
    only replaces one of ours."""
    holder = lock_holder(output_dir) if script else None
    if holder is not None:
        raise folder_in_use(output_dir, script, holder)
    earlier = earlier_run_artifacts(output_dir)
    if not earlier or resume or stopped_before_first_step(output_dir):
        return
    shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
    if not overwrite:
        raise UserError(f"{output_dir} already holds an earlier run ({shown}). HINT: continue it with --resume, "
                        f"replace it with --overwrite, or choose another --output-dir")
    if not written_by_us(output_dir):
        raise UserError(
            f"--overwrite: {output_dir} holds {shown} but no sign of a run of this script ({CONFIG_FILE}, "
            f"metrics.jsonl or a checkpoint-N with {TRAINING_STATE_FILE}), and --overwrite only removes what a "
            f"run of ours wrote. HINT: choose another --output-dir, or move those files away yourself")


@contextlib.contextmanager
def locked_output_dir(output_dir: Path, script: str):
    """Create `output_dir` and hold its lock (outdir.claimed_folder) while the block runs."""
    with claimed_folder(output_dir, script, "cannot write to --output-dir {out} ({why}). HINT: choose a writable folder"):
        yield


def prepare_output_dir(output_dir: Path, overwrite: bool, config_json: str) -> None:
    """On the main process, after lock_output_dir and check_output_dir: remove an earlier run of ours when
    --overwrite says so, clean what a killed run left, and write the run's config (the folder's mark)."""
    restart = not overwrite and stopped_before_first_step(output_dir)
    if restart:
        log.info("%s holds only the start-up files of a run stopped before its first step (%s): starting "
                 "again in their place", output_dir, ", ".join(earlier_run_artifacts(output_dir)))
    if overwrite or restart:
        for name in earlier_run_artifacts(output_dir):
            path = output_dir / name
            if path.is_dir():  # best/, adapter/, checkpoint-N/: never a file we did not write, never through a link
                remove_our_folder(path, {p.name for p in path.iterdir() if saved_by_a_run(p.name)})
            else:
                path.unlink()  # a file of RUN_ARTIFACTS, or a link by that name (the link goes, not its target)
    remove_leftovers(output_dir)
    try:
        rewrite_text(output_dir / CONFIG_FILE, config_json)
    except OSError as exc:
        raise UserError(f"cannot write to --output-dir {output_dir} ({exc.strerror}). "
                        f"HINT: choose a writable folder") from None


def interpreter(world_size: int = 1) -> str:
    """The interpreter that runs this (torchrun beside it for several processes), as a shell word: a command
    printed with it works pasted where that virtual environment is not active, which `python` would not.
    sys.executable as it is, not resolved: a venv's python is a symlink, and resolved it loses the venv."""
    python = shlex.quote(sys.executable or "python")
    if world_size <= 1:
        return python
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = shlex.quote(str(torchrun)) if torchrun.is_file() else f"{python} -m torch.distributed.run"
    return f"{launcher} --nproc_per_node={world_size}"


def resume_command(script: Path, output_dir: Path, world_size: int) -> str:
    """A command that continues the run from any working directory (the checkpoint keeps absolute paths):
    started the way this run was, under torchrun or by `--nproc N` (launcher.py)."""
    by_nproc = world_size > 1 and os.environ.get(LAUNCHED_BY_NPROC) == str(world_size)
    launcher = interpreter() if by_nproc else interpreter(world_size)
    return (f"{launcher} {shlex.quote(str(script.resolve()))}{f' --nproc {world_size}' if by_nproc else ''} "
            f"--output-dir {shlex.quote(str(output_dir.resolve()))} --resume")


def next_commands(script: Path, output_dir: Path, prompt: str, chat: bool = False) -> dict[str, str]:
    """What to run on a finished run's final model, with the scripts beside `script`: sample (a model trained on
    chat data: a reply, rendered with its template), export."""
    python, here, model = interpreter(), script.resolve().parent, shlex.quote(str(output_dir.resolve()))
    return {"sample from it": f"{python} {shlex.quote(str(here / 'generate.py'))} --model {model} "
                              f"{'--chat ' if chat else ''}--prompt {shlex.quote(prompt)}",
            "export it (llama.cpp)": f"{python} {shlex.quote(str(here / 'export.py'))} --model {model} --to gguf"}
