"""The output folder of either script: created, locked for one run at a time (fsio.locked_folder), checked
before and again under the lock. What only one script knows comes in as arguments: the files that mark
earlier outputs, the message when the folder cannot be created. rundir.py adds a training run's rules."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import UserError, raise_if_problems
from .fsio import locked_folder


def existing_outputs_problems(out: Path, outputs: tuple[str, ...], overwrite: bool) -> list[str]:
    """--output-dir must be a writable folder (or not exist yet) and hold none of `outputs` unless --overwrite."""
    if out.exists() and not out.is_dir():
        return [f"--output-dir {out} is a file, not a folder. HINT: choose another --output-dir"]
    problems = []
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        problems.append(f"{out} already holds {', '.join(existing)}. "
                        "HINT: pass --overwrite to replace them, or choose another --output-dir")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        problems.append(f"--output-dir {out} is not writable. HINT: choose a folder you can write to")
    return problems


@contextlib.contextmanager
def claimed_folder(out: Path, script: str, cannot_create: str, leave_no_trace: bool = False):
    """Create `out` (parents too) and hold its lock while the block runs; a second run is refused with our PID.

    `cannot_create` is the error when it cannot be created, with {out} and {why} filled in. With
    `leave_no_trace` (prepare_data.py leaves only its outputs behind) the lock file goes on the way out,
    whatever happened, and so do the folders created here if they are still empty.
    """
    created = [p for p in [out, *out.parents] if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(cannot_create.format(out=out, why=exc.strerror)) from None
    try:
        with locked_folder(out, script, remove_at_exit=leave_no_trace):
            yield
    finally:
        for folder in reversed(created if leave_no_trace else []):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@contextlib.contextmanager
def claimed_output_files(out: Path, script: str, outputs: tuple[str, ...], overwrite: bool):
    """claimed_folder for a script that writes `outputs` as hidden temporaries `.NAME.tmp-PID` (prepare_data.py).

    Under the lock the outputs are checked again (another run may have finished since the first check) and
    the temporary files of a killed run go.
    """
    cannot_create = "cannot create --output-dir {out} ({why}). HINT: choose a folder you can write to"
    with claimed_folder(out, script, cannot_create, leave_no_trace=True):
        raise_if_problems(existing_outputs_problems(out, outputs, overwrite))
        for name in outputs:
            for leftover in out.glob(f".{name}.tmp-*"):
                leftover.unlink(missing_ok=True)
        yield
