"""`--nproc N` without torchrun: this process starts the N training processes on this machine and answers
for them.

The processes are started by torch's own launcher (torch.distributed.launcher.api, what torchrun runs), so
they get torchrun's environment, rendezvous and watch (one that fails stops the others), and the same
script and flags. What differs is what a user sees: one line at the start (how many processes, and the
OMP_NUM_THREADS each gets, which torchrun sets to 1 with a banner), and at the end the workers' own lines
and this process's exit code, never torchrun's `SignalException` traceback. A SIGTERM or Ctrl-C is passed
on to every process once (each runs in its own session, so a terminal's Ctrl-C reaches them only through
here); they finish their step, save a checkpoint and stop, as one process does; a second signal aborts.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid

from finetune.core.errors import EXIT_SIGNAL, first_line, raise_if_problems

# Set in the environment of the processes --nproc starts, to their number: their resume command says
# `--nproc N`, not torchrun.
LAUNCHED_BY_NPROC = "FINETUNE_NPROC"
# How long the launcher waits, after a signal, for the processes to save and stop before it kills them
# (torch's own default is 30 s, too short for the checkpoint of a large model). TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# sets it, as for torchrun; a second signal aborts the save at once.
STOP_GRACE_S = 600
OUR_EXIT_CODES = (2, 3, 4, *EXIT_SIGNAL.values())  # errors.py: the process said why in its own words


def nproc_problems(nproc: int | None, dry_run: bool) -> list[str]:
    """--nproc N starts N processes (--dry-run plans for N); under torchrun it must be torchrun's number."""
    world = os.environ.get("WORLD_SIZE")
    if nproc is None or dry_run or world is None or int(world) == nproc:
        return []
    return [f"--nproc {nproc} under torchrun, which started {world} process(es). HINT: drop --nproc (torchrun "
            f"starts the processes), or run without torchrun: `python finetune_generative.py --nproc {nproc} ...`"]


def wanted(nproc: int | None, dry_run: bool) -> bool:
    """Whether this process is to start the others: --nproc 2 or more, not a dry run, not under torchrun
    (the processes it starts run the same command under torch's launcher, and train)."""
    return bool(nproc and nproc > 1 and not dry_run and "WORLD_SIZE" not in os.environ)


def device_problems(nproc: int, device_request: str, cuda_devices: int) -> list[str]:
    """One GPU per process when the run is on CUDA (`cuda_devices`: 0 on a machine without)."""
    if device_request in ("auto", "cuda") and 0 < cuda_devices < nproc:
        return [f"--nproc {nproc} processes need {nproc} GPUs, one each, and this machine has {cuda_devices}. "
                f"HINT: --nproc {cuda_devices}, or --device cpu"]
    return []


def thread_count(nproc: int, environ=os.environ) -> tuple[str, str]:
    """OMP_NUM_THREADS for each process: the environment's, else the cores shared out (at least 1 each)."""
    if environ.get("OMP_NUM_THREADS"):
        return environ["OMP_NUM_THREADS"], "from the environment"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return str(max(1, cores // nproc)), f"{cores} cores / {nproc} processes; set OMP_NUM_THREADS to choose"


def say(message: str) -> None:
    """One line in the log's format (this process sets up no logging: the workers do)."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def quiet_torch_launcher() -> None:
    """torch's launcher logs each step of a stop as a warning ("Received 15 death signal, shutting down
    workers", "Sending process N closing signal SIGTERM"); this module says what happened instead."""
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [logging.NullHandler()]
        logger.propagate = False


RESUME_HINT = "resume from the newest checkpoint with the same command and --resume"


def launch(nproc: int, script: str, argv: list[str], device_request: str, restart_hint: str = RESUME_HINT) -> int:
    """Run `script argv` in `nproc` processes on this machine; returns the exit code to exit with.
    `restart_hint`: what to do after a process was killed (a training run resumes; an evaluation reruns)."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    raise_if_problems(device_problems(nproc, device_request,
                                      torch.cuda.device_count() if torch.cuda.is_available() else 0))
    threads, why = thread_count(nproc)
    os.environ["OMP_NUM_THREADS"] = threads  # what the processes inherit, as torchrun passes it
    os.environ[LAUNCHED_BY_NPROC] = str(nproc)
    quiet_torch_launcher()
    options = dict(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                   rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone
                   max_restarts=0)  # torch's default restarts a failed run 3 times
    if "shutdown_timeout" in LaunchConfig.__dataclass_fields__ and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        options["shutdown_timeout"] = STOP_GRACE_S
    say(f"starting {nproc} processes on this machine (torch.distributed, as torchrun would); "
        f"OMP_NUM_THREADS={threads} each ({why})")
    try:
        elastic_launch(LaunchConfig(**options), sys.executable)("-u", script, *argv)
        return 0
    except SignalException as exc:  # passed on to the processes, which saved and stopped (or were starting)
        sig = signal.Signals(exc.sigval)
        code = EXIT_SIGNAL.get(sig, 128 + sig)
        say(f"{sig.name}: passed on to the {nproc} processes; all have stopped (exit code {code})")
        return code
    except ChildFailedError as exc:  # one ended on its own; the launcher stopped the others
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code < 0:  # killed by a signal nobody here sent
            name = signal.Signals(-code).name
            print(f"error: process {rank} of {nproc} was killed by {name}, and the others were stopped. HINT: "
                  f"{'out of memory? (see `dmesg`) ' if name == 'SIGKILL' else ''}{restart_hint}", file=sys.stderr, flush=True)
            return 128 - code
        if code not in OUR_EXIT_CODES:  # a crash: its traceback is above
            print(f"error: process {rank} of {nproc} failed with exit code {code} (its output is above), and the "
                  "others were stopped. HINT: the first traceback above is where it failed", file=sys.stderr,
                  flush=True)
        return code
    except Exception as exc:  # the launcher itself (rendezvous, a process that could not start)
        print(f"error: could not start {nproc} processes with torch's launcher: {first_line(exc)}. HINT: start "
              f"them with `torchrun --standalone --nproc_per_node {nproc} {script} ...`", file=sys.stderr,
              flush=True)
        return 1
