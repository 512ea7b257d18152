"""Atomic writes: a folder or file appears whole or not at all, even after kill -9 or a full disk."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import zlib
from pathlib import Path
from stat import S_ISREG

from .errors import UserError, raise_if_write_failure

log = logging.getLogger("finetune")

TMP_PREFIX = ".tmp-"  # every temporary name starts so; a new run deletes the leftovers of a killed one
LOCK_FILE = ".lock"


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
                    remove_our_folder(final / path.name, path)
                os.replace(path, final / path.name)
            tmp.rmdir()
            fsync_dir(final)
        else:
            publish_folder(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_write_failure(exc, what)
        raise


def share_identical_files(folder: Path, others: list[Path]) -> int:
    """Replace each file of `folder` whose bytes equal the same-named file of one of `others` (the final model
    and a checkpoint of the same step, say) by a hard link to that file; returns the bytes no longer stored
    twice. Where the filesystem has no hard links the copy stays. Safe because no file of ours is ever written
    in place: every save writes a new file aside and renames it over the old one, which leaves a linked twin
    as it was."""
    import filecmp

    saved = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        for other in others:
            twin = other / path.name
            if not twin.is_file() or twin.stat().st_size != path.stat().st_size or path.samefile(twin):
                continue
            if not filecmp.cmp(path, twin, shallow=False):
                continue
            link = path.with_name(f"{TMP_PREFIX}link-{path.name}")
            try:
                os.link(twin, link)
                os.replace(link, path)
                saved += twin.stat().st_size
            except OSError:  # no hard links here (FAT, some network filesystems), or across devices: keep the copy
                link.unlink(missing_ok=True)
            break
    return saved


def stored_bytes(folder: Path) -> int:
    """Bytes the files under `folder` hold on disk, a hard-linked file counted once."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        stat = path.lstat()
        if path.is_file() and not path.is_symlink() and (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_size
    return total


def remove_leftovers(folder: Path) -> None:
    """After a kill: put back a folder caught mid-publish, then delete every unfinished temporary."""
    restore_interrupted_publish(folder)
    for leftover in folder.glob(f"{TMP_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:  # a file, or a link (to a folder outside the run, say): the link goes, never what it points to
            leftover.unlink(missing_ok=True)


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
    if final.is_symlink():  # a link someone put in place of our folder: replaced, what it points to untouched
        log.warning("%s was a symbolic link (to %s); replaced by the folder this run writes there, the link's "
                    "target left as it is", final, os.readlink(final))
        final.unlink()
    if final.exists():
        move_foreign_files_aside(final, tmp)  # first: a kill after this leaves them safe, not in the trash
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


# Where a run puts the files it finds in a folder of its own (best/, a checkpoint-N/ it prunes, adapter/) that
# its saves do not write, before it replaces or deletes that folder: an export, notes. Never deleted by a run.
MOVED_ASIDE = "moved-aside"


def remove_our_folder(folder: Path, written_by_us: Path | set[str]) -> None:
    """Delete a folder a run wrote (an old best/ or adapter/, a pruned checkpoint), but never a file the run
    did not write: whatever `written_by_us` (the folder the same save writes now, or a set of names) does
    not hold is moved aside first (move_foreign_files_aside). A symbolic link in its place is removed as a
    link: what it points to is outside the run and never touched."""
    if folder.is_symlink():
        log.warning("%s is a symbolic link (to %s), not a folder this run wrote: removed the link, its target "
                    "left as it is", folder, os.readlink(folder))
        folder.unlink()
        return
    move_foreign_files_aside(folder, written_by_us)
    # Renamed first, so that a kill during the delete leaves a .tmp-* leftover (deleted at the next start),
    # not a half folder under its name.
    doomed = folder.with_name(f"{TMP_PREFIX}deleted-{folder.name}-{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def move_foreign_files_aside(folder: Path, written_by_us: Path | set[str]) -> list[Path]:
    """Move each entry of `folder` that the run's saves do not write to MOVED_ASIDE/<folder name>/ next to
    `folder`, with a warning; returns where they went. What the run writes is `written_by_us`: the new
    folder the same save just wrote (compared name by name, into subfolders such as a release's adapter/),
    or a set of names. A file of ours that a later save no longer writes is moved aside too: kept, not lost."""
    foreign = _foreign_entries(folder, written_by_us)
    if not foreign:
        return []
    aside = _free_name(folder.parent / MOVED_ASIDE / folder.name)
    moved = []
    for entry in foreign:
        target = aside / entry.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry, target)
        moved.append(target)
    log.warning("%s held %s, which this run did not write; moved to %s before the run replaced or deleted %s",
                folder, ", ".join(str(e.relative_to(folder)) for e in foreign), aside, folder.name)
    return moved


def _foreign_entries(folder: Path, written_by_us: Path | set[str]) -> list[Path]:
    if isinstance(written_by_us, set):
        return sorted(p for p in folder.iterdir() if p.name not in written_by_us)
    foreign = []
    for entry in sorted(folder.iterdir()):
        ours = written_by_us / entry.name
        if not os.path.lexists(ours) or entry.is_symlink() != ours.is_symlink():
            foreign.append(entry)
        elif entry.is_dir() and not entry.is_symlink() and ours.is_dir():
            foreign += _foreign_entries(entry, ours)
    return foreign


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... whichever does not exist yet."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


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


@contextlib.contextmanager
def atomic_file(path: Path, what: str):
    """A text file written under a temporary name next to `path`, then put in its place (fsync, rename),
    also when the body is interrupted (Ctrl-C keeps what was written so far); after kill -9 the old file
    is still whole. A full disk raises the project's one-line error naming `what`."""
    with atomic_path(path, what) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f  # closed (flushed) here; atomic_path then fsyncs it and renames it into place


@contextlib.contextmanager
def atomic_path(path: Path, what: str):
    """A temporary path next to `path` for a writer that opens files itself (GGUFWriter): when the block
    ends, the file is flushed to disk and renamed into place; if the block fails or is interrupted, the
    temporary is deleted and `path` is untouched. A full disk raises the one-line SaveFailed naming `what`.
    The temporaries a killed writer of the same `path` left (kill -9 runs no cleanup) go first."""
    remove_stale_temporaries(path.parent, re.escape(path.name))
    tmp = temporary_name(path, os.getpid())
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise_if_write_failure(exc, what)
        raise
    finally:
        with contextlib.suppress(OSError):  # never hide the error that got us here (EROFS: there is no tmp)
            tmp.unlink(missing_ok=True)


def temporary_name(path: Path, pid: int) -> Path:
    """Where atomic_path writes `path` before the rename: hidden, and naming the writer's PID."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{pid}")


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Delete the temporaries in `folder` (temporary_name) of files whose name matches the regular expression
    `name` and whose writer is no longer running: a kill -9 or a power cut left them, and nothing else would
    ever remove them (a 76 MB hidden .gguf, say). Only files of exactly our naming, each with the PID of a
    process that is gone, so a writer still at work keeps its file."""
    removed = []
    pattern = re.compile(re.escape(TMP_PREFIX) + f"(?:{name})" + r"-(\d+)")
    with contextlib.suppress(OSError):  # a folder we cannot list: nothing to clean here
        for leftover in folder.iterdir():
            match = pattern.fullmatch(leftover.name)
            if match and not process_alive(int(match.group(1))) and leftover.is_file() and not leftover.is_symlink():
                with contextlib.suppress(OSError):
                    leftover.unlink()
                    removed.append(leftover)
    if removed:
        log.info("removed %s, left by a writer that was killed", ", ".join(str(p) for p in removed))
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class Terminated(BaseException):
    """SIGTERM, raised where it arrives inside sigterm_raises(), so that `finally` blocks and context managers
    run as for Ctrl-C: a temporary file is published or removed, never left behind. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` mistakes it for an error to report."""


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs, SIGTERM (`timeout`, a scheduler, `kill`) raises Terminated instead of ending the
    process at once, which would skip every cleanup."""
    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


@contextlib.contextmanager
def locked_folder(folder: Path, script: str, remove_at_exit: bool = False):
    """Hold an advisory lock on the existing `folder` while the block runs: one run of `script` at a time.

    The lock is flock() on `folder/.lock`, which holds the holder's PID; the kernel drops it when the
    process dies (kill -9 included), so it never goes stale. A second run is refused with that PID.
    `remove_at_exit` deletes the lock file on the way out (prepare_data leaves only its outputs behind);
    a run that then finds its locked file unlinked or replaced locks the new one instead.
    The lock file is opened without following a link (open_lock_file): a folder received from elsewhere
    with `.lock -> ~/.bashrc` is refused, and the file the link names is never opened, let alone emptied.
    """
    path = folder / LOCK_FILE
    while True:
        lock = open_lock_file(path, folder)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            holder = lock.read(64).strip() or "unknown"
            lock.close()
            raise folder_in_use(folder, script, holder) from None
        if _same_file(path, lock):
            break
        lock.close()  # the holder removed it between our open and flock: lock the current one
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        if remove_at_exit:
            path.unlink(missing_ok=True)  # while still locked: a waiting run then retries on a new file
        lock.close()  # releases the lock


def open_lock_file(path: Path, folder: Path, create: bool = True):
    """`folder/.lock` opened for reading and writing (created when missing and `create`), never through a
    link: O_NOFOLLOW refuses a symbolic link, O_NONBLOCK keeps a FIFO from blocking the open, and anything
    but a regular file with one name (a FIFO, a device, a hard link to someone's file) is refused too, before
    a byte of it is read or written. None when `create` is false and there is no lock file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise foreign_lock_file(path, "a symbolic link") from None
        if not create:
            return None  # no lock file, or none a run of ours could have opened to lock either
        raise UserError(f"cannot write to --output-dir {folder} ({exc.strerror}). "
                        f"HINT: choose a writable folder") from None
    stat = os.fstat(fd)
    if not _is_plain_file(stat):
        os.close(fd)
        kind = "not a regular file" if not S_ISREG(stat.st_mode) else f"a hard link with {stat.st_nlink} names"
        raise foreign_lock_file(path, kind)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+", encoding="utf-8", errors="replace")


def _is_plain_file(stat: os.stat_result) -> bool:
    return S_ISREG(stat.st_mode) and stat.st_nlink == 1


def foreign_lock_file(path: Path, kind: str) -> UserError:
    return UserError(f"{path} is {kind}, not a lock file of this tool, so it is left as it is (and whatever it "
                     f"points to is not touched). HINT: remove {path} (`rm {path}` removes a link, not its "
                     f"target), then run the same command again")


def _same_file(path: Path, f) -> bool:
    try:
        return os.lstat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def lock_holder(output_dir: Path) -> str | None:
    """The PID of the run holding `output_dir`'s lock (locked_folder), or None when no run holds it (a lock file left by a
    killed run holds nothing: the kernel dropped its lock). A lock file that is a link or not a plain file
    is refused (open_lock_file), never followed."""
    lock = open_lock_file(output_dir / LOCK_FILE, output_dir, create=False)
    if lock is None:
        return None
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return lock.read(64).strip() or "unknown"
        return None  # closing the file drops the shared lock again


def folder_in_use(output_dir: Path, script: str, holder: str) -> UserError:
    return UserError(f"--output-dir {output_dir} is in use by another run of {script} (PID {holder}). "
                     f"HINT: wait for it to finish, stop it, or choose another --output-dir")
