"""Atomic writes: a folder or file appears whole or not at all, even after kill -9 or a full disk."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import zlib
from pathlib import Path

from .errors import raise_if_write_failure

TMP_PREFIX = ".tmp-"  # every temporary name starts so; a new run deletes the leftovers of a killed one


@contextlib.contextmanager
def atomic_folder(final: Path, what: str, into: bool = False):
    """Yield an empty temporary folder; when the block ends, its files appear as `final` all at once.

    `final` is replaced whole (a reader sees the old or the new folder, never a mix), or with
    `into=True` the files are moved into the existing folder `final` (the final model in --output-dir).
    If the block or the publishing fails, the temporary folder is removed and `final` is untouched; a full
    disk or other failed write is raised as SaveFailed naming `what`.
    """
    tmp = (final if into else final.parent) / f"{TMP_PREFIX}{'final' if into else final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if into:
            fsync_tree(tmp)
            for path in tmp.iterdir():
                if path.is_dir() and (final / path.name).is_dir():  # a LoRA release's adapter/ of an earlier save
                    shutil.rmtree(final / path.name)
                os.replace(path, final / path.name)
            tmp.rmdir()
            fsync_dir(final)
        else:
            publish_folder(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_write_failure(exc, what)
        raise


def remove_leftovers(folder: Path) -> None:
    """After a kill: put back a folder caught mid-publish, then delete every unfinished temporary."""
    restore_interrupted_publish(folder)
    for leftover in folder.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


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


def publish_folder(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` so that a reader sees either the old or the new folder, whole."""
    fsync_tree(tmp)
    if final.exists():
        trash = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
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


def restore_interrupted_publish(output_dir: Path) -> None:
    """Put back a folder that a kill caught between the two renames of publish_folder.

    There, `.tmp-old-NAME-PID` is the complete old NAME and NAME itself is gone; renaming it back
    restores the state before that save (the new folder was a temporary and is discarded).
    """
    for trash in output_dir.glob(".tmp-old-*"):
        match = re.fullmatch(r"\.tmp-old-(.+)-\d+", trash.name)
        if match and trash.is_dir() and not (output_dir / match.group(1)).exists():
            os.replace(trash, output_dir / match.group(1))


def rewrite_text(path: Path, text: str) -> None:
    """Replace a small file whole: readers see the old or the new text, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return crc
