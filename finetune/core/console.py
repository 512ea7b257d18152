"""What a run shows on the terminal: the one logging setup of every script, and the training progress.

Log lines go to stderr through tqdm.write, so they print above a progress bar instead of through it.
When stderr is a file, the progress is plain log lines instead of a redrawn bar.
"""
from __future__ import annotations

import logging
import sys
import threading
import time


class TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(name: str, is_main: bool = True) -> logging.Logger:
    """The logger `name` (INFO on the main process, WARNING elsewhere), and transformers quietened:
    its info logs and "Loading weights" / "Writing model shards" bars would interleave with ours."""
    logger = logging.getLogger(name)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return logger


# -----------------------------------------------------------------------------
# Progress of a training loop


def progress_display(total: int, initial: int, enabled: bool, logger: logging.Logger, interval: float = 30.0,
                     max_silence: float = 60.0):
    """A tqdm bar on a terminal; when stderr is a file (nohup, a batch scheduler, CI), ProgressLines instead,
    since every redraw of a bar would land in the file. Both take update(n), set_postfix(**fields), close()."""
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        return ProgressLines(total, initial, logger, interval, max_silence)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled, file=sys.stderr)


class ProgressLines:
    """The progress bar as plain log lines: one at each set_postfix (the loop calls it every --log-every steps)
    that comes at least `interval` seconds after the last line, and one at close for the step reached. A run
    is never silent for more than `max_silence` seconds: a watcher thread then writes where it is (slow steps,
    a long evaluation or save), so a log file shows it is alive and how far it got."""

    def __init__(self, total: int, initial: int, logger: logging.Logger, interval: float, max_silence: float = 60.0):
        self.total, self.step, self.first_step = total, initial, initial
        self.logger, self.interval, self.max_silence = logger, interval, max_silence
        self.started = self.step_done_at = time.monotonic()
        self.last_line_at, self.last_line_step = self.started, initial
        self.fields: dict = {}
        self.lock = threading.Lock()  # the loop's lines and the watcher's never interleave or double up
        self.closed = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="progress-lines", daemon=True)
        self.watcher.start()

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.step += n
            self.step_done_at = time.monotonic()

    def watch(self) -> None:
        while not self.closed.wait(min(5.0, self.max_silence / 4)):
            with self.lock:
                now = time.monotonic()
                if now - self.last_line_at >= self.max_silence and not self.closed.is_set():
                    self.write_line(now, f"still running, {format_duration(now - self.step_done_at)} since "
                                         f"step {self.step} ended")

    def set_postfix(self, **fields) -> None:
        with self.lock:
            self.fields = fields
            now = time.monotonic()
            if self.last_line_step == self.first_step or now - self.last_line_at >= self.interval:
                self.write_line(now)

    def close(self) -> None:
        self.closed.set()
        self.watcher.join()
        if self.step != self.last_line_step:
            self.write_line(time.monotonic())

    def write_line(self, now: float, note: str = "") -> None:
        done = self.step - self.first_step
        eta = format_duration((self.total - self.step) * (now - self.started) / done) if done else "?"
        fields = "".join(f", {name} {value}" for name, value in self.fields.items()) if not note else f", {note}"
        self.logger.info("step %d/%d (%d%%)%s, ETA %s", self.step, self.total, 100 * self.step // max(self.total, 1),
                         fields, eta)
        self.last_line_at, self.last_line_step = now, self.step


# -----------------------------------------------------------------------------
# Progress through bytes of input (prepare_data.py)

def bytes_progress(total_bytes: int, desc: str, interval: float = 30.0):
    """tqdm's byte bar on a terminal; when stderr is a file, ByteProgressLines instead, as progress_display
    does for the training loop. Both take update(n) and work as context managers."""
    if not sys.stderr.isatty():
        return ByteProgressLines(total_bytes, desc, interval)
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr,
                dynamic_ncols=True)


class ByteProgressLines:
    """Plain lines on stderr: `desc: done of total (share), ETA` at most every `interval` seconds, and at a
    clean exit one line with the total and the time it took (none after an error: the error line says it)."""

    def __init__(self, total_bytes: int, desc: str, interval: float):
        self.total, self.desc, self.interval = total_bytes, desc, interval
        self.done = 0
        self.started = self.last_line_at = time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            print(f"{self.desc}: {human_bytes(self.done)} in {format_duration(time.monotonic() - self.started)}",
                  file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last_line_at >= self.interval:
            share = self.done / max(self.total, 1)
            eta = format_duration((now - self.started) * (1 - share) / share) if share else "?"
            print(f"{self.desc}: {human_bytes(self.done)} of {human_bytes(self.total)} ({100 * share:.0f}%), "
                  f"ETA {eta}", file=sys.stderr, flush=True)
            self.last_line_at = now


def format_duration(seconds: float) -> str:
    """A duration as `45s`, `6m39s`, `2h05m` or `3d04h`: next to the log's 06:42:27 clock stamps, tqdm's
    `06:39` would read as a time of day."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"
