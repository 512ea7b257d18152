"""What a run shows on the terminal: the one logging setup of every script.

Log lines go to stderr through tqdm.write, so they print above a progress bar instead of through it.
"""
from __future__ import annotations

import logging
import sys


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
