"""One error style for every script: bad input is one `error: ... HINT: ...` line and exit 2.

Also the exit codes, and how a failed write (disk full) is told apart from a bug.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys

# Exit codes: 0 done, 2 bad input (UserError), 3 training diverged, 4 an output could not be written (disk
# full, quota, read-only or failing disk: the environment, not the settings), 130/143 stopped by SIGINT/SIGTERM.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class UserError(Exception):
    """Bad input from the user: printed as one `error: ...` line, exit code 2, no traceback."""


class SaveFailed(Exception):
    """An output could not be written (disk full, quota, I/O error); what was on disk before is intact."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one `error:` line with a hint instead of the usage block."""

    def error(self, message):
        print(f"error: {shorten_long_words(message)}. HINT: run `{self.prog} --help` to see every flag",
              file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


LONG_WORD = 80


def shorten_long_words(text: str) -> str:
    """A value given on the command line is echoed in an error, but a 100,000-character one is not: any run of
    more than LONG_WORD non-blank characters is cut to its start and its length."""
    return re.sub(rf"\S{{{LONG_WORD + 1},}}",
                  lambda m: f"{m.group()[:LONG_WORD // 2]}… ({len(m.group()):,} characters)", text)


def exit_on_user_error(main):
    """Decorator for a script's main(): UserError becomes one line on stderr and exit 2, SaveFailed exit 4,
    a Ctrl-C the script does not handle itself (during its start-up) one line and exit 130, not a traceback."""

    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except SaveFailed as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_SAVE_FAILED) from None
        except KeyboardInterrupt:  # Ctrl-C where the script has no handler of its own yet (imports, loading)
            print("error: interrupted (Ctrl-C) while starting, before any work was done. HINT: run the same "
                  "command again", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_SIGNAL[signal.SIGINT]) from None

    wrapper.__name__ = main.__name__
    wrapper.__doc__ = main.__doc__
    return wrapper


def one_line(text: str) -> str:
    return " ".join(text.split("\n"))


def raise_if_problems(problems: list[str], what: str = "the settings") -> None:
    """Every problem found, in one UserError: `2 problems with the settings: (1) ...; (2) ...`."""
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        numbered = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise UserError(f"{len(problems)} problems with {what}: {numbered}")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut at a word boundary to at most `limit` characters."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].rstrip(" .")
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0].rstrip(" .,;:") + " ..."
    return line


def refused_pickle(exc: BaseException) -> bool:
    """torch.load(weights_only=True) refused a pickle that asks for more than tensors to load it (a
    function to call: possibly code). Its message then advises weights_only=False, which would run that
    code: report the refusal in our words, never relay the message."""
    while exc is not None:
        text = str(exc)
        if "Weights only load failed" in text or "weights_only" in text or "Unsupported global" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def raise_if_write_failure(exc: BaseException, what: str) -> None:
    """Turn a failed write (disk full, quota, I/O error) into a SaveFailed naming `what`."""
    reason = write_failure(exc)
    if reason is not None:
        raise SaveFailed(f"could not save {what} ({reason}); the partial files were removed") from exc


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
