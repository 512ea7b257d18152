"""The inputs: files named directly, text and record files found in folders, and the checks that need no
tokenizer (a missing path, empty text, a record file without the field)."""
from __future__ import annotations

import codecs
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from finetune.core.console import human_bytes
from finetune.core.errors import UserError
from finetune.formats.chat import CHAT_FORMATS, format_of

from .records import RECORD_FORMATS, check_record_file, first_fields, record_format

# Which files a directory contributes (hidden files and folders are skipped): text, and records.
TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".text")
RECORD_EXTENSIONS = tuple(RECORD_FORMATS)
SAMPLE_BOOK = "book.txt"
BLOCK_BYTES = 1 << 20         # read size
SAMPLE_BYTES = 16 << 10       # input sample the fast path is checked on before the run


def find_text_files(paths: list[str], flag: str, problems: list[str]) -> list[Path]:
    """Files named directly, plus the text and record files found (recursively, sorted) in named folders.

    A folder contributes regular files only: a link to a device or a FIFO would be read forever, so
    such entries are skipped and named in a note (as is a meta.json of ours, beside its train.bin).
    Problems are added to `problems`.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            skipped: list[str] = []
            found = sorted(_walk_text_files(path, skipped), key=lambda p: p.relative_to(path).as_posix())
            if skipped:
                shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
                print(f"note: {flag} folder {path}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'}"
                      f" that are not regular text or record files: {shown}", file=sys.stderr)
            if not found:
                problems.append(
                    f"{flag} folder {path} holds no text files ({', '.join(TEXT_EXTENSIONS)}) or record files "
                    f"({', '.join(RECORD_EXTENSIONS)}); hidden files are skipped. HINT: name the files directly "
                    "or give them one of those extensions")
            files.extend(found)
        elif path.exists():
            problems.append(f"{flag} {path} is not a regular file or folder. HINT: give text files or folders")
        else:
            sample = (f"; or write a sample text there with `python prepare_data.py --sample-book {path}`"
                      if path.name == SAMPLE_BOOK else "")
            problems.append(f"{flag} {path} does not exist. "
                            f"HINT: check the path (relative paths start at {Path.cwd()}){sample}")
    unique, seen = [], set()
    for path in files:  # the same file twice (named and inside a folder) would be counted twice
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _walk_text_files(folder: Path, skipped: list[str]) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        for d in sorted(dirs):
            if not d.startswith(".") and os.path.islink(os.path.join(root, d)):
                skipped.append(f"{Path(root, d)} (a link to a folder, not followed)")
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(TEXT_EXTENSIONS + RECORD_EXTENSIONS):
                continue
            path = Path(root) / name
            why = not_regular(path) or ("an output of prepare_data.py" if name == "meta.json" and
                                        (path.parent / "train.bin").is_file() else "")
            if why:
                skipped.append(f"{path} ({why})")
            else:
                yield path


def not_regular(path: Path) -> str:
    """Why `path` (after links) is not a regular file; "" when it is."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return "a broken link" if path.is_symlink() else exc.strerror
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    kind = next((what for test, what in kinds if test(mode)), "not a regular file")
    return f"{'a link to ' + kind if path.is_symlink() else kind}, not a regular file"


def check_has_text(files: list[Path], encoding: str, flag: str) -> str | None:
    """Empty or whitespace-only text input, as a problem (reads only up to the first visible character)."""
    for path in files:
        decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        with open(path, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                if decoder.decode(block).strip().lstrip("\ufeff"):  # a byte-order mark alone is no text
                    return None
    what = "empty" if all(p.stat().st_size == 0 for p in files) else "whitespace only"
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    return (f"{flag} is {what} ({names}): there is no text to train on. "
            "HINT: check that the path points at your text")



def read_sample(paths: list[Path], encoding: str) -> str:
    """The start of the first input that holds text as such (JSON and CSV do, Parquet does not)."""
    path = next((p for p in paths if record_format(p) != "parquet"), None)
    if path is None:
        return ""
    with open(path, "rb") as f:
        return f.read(SAMPLE_BYTES).decode(encoding, errors="ignore")


def input_problems(input_paths: list[str], val_paths: list[str] | None, encoding: str,
                   text_field: str, chat_format: str = "auto") -> tuple[list[Path], list[Path], list[str]]:
    """The input and validation files, and every problem found without a tokenizer ("" or None: none)."""
    problems: list[str] = []
    inputs = find_text_files(input_paths, "--input", problems)
    val_inputs = find_text_files(val_paths, "--val-input", problems) if val_paths else []
    shared = {p.resolve() for p in inputs} & {p.resolve() for p in val_inputs}
    if shared:
        problems.append(f"{sorted(shared)[0]} is both training and validation input. "
                        "HINT: keep --val-input files out of --input")
    for files, flag in ((inputs, "--input"), (val_inputs, "--val-input")):
        text_files = [p for p in files if not record_format(p)]
        if text_files and len(text_files) == len(files):  # record files are checked as they are read
            problems.append(check_has_text(text_files, encoding, flag))
        problems += [check_record_file(p, record_format(p), text_field, encoding,
                                       chat=chat_format in CHAT_FORMATS or first_format(p, encoding, chat_format))
                     for p in files if record_format(p)]
    return inputs, val_inputs, problems


def first_format(path: Path, encoding: str, chat_format: str) -> str | None:
    """The chat format of a record file's first record (None: plain text, or no record), as --chat-format
    auto sees it."""
    if chat_format == "text" or not record_format(path):
        return None
    return format_of(dict.fromkeys(first_fields(path, record_format(path), encoding) or ()))


def chat_run_format(inputs: list[Path], val_inputs: list[Path], encoding: str, chat_format: str) -> str | None:
    """The run's chat format by --chat-format, or (auto) by the first record of each record file; None for
    plain text. Chat records go with chat records only: not with text files, nor with files of plain records."""
    if chat_format == "text":
        return None
    files = [*inputs, *val_inputs]
    kinds = {p: first_format(p, encoding, chat_format) for p in files if record_format(p)}
    chat = [p for p, kind in kinds.items() if kind]
    if chat_format not in CHAT_FORMATS and not chat:
        return None
    fmt = chat_format if chat_format in CHAT_FORMATS else kinds[chat[0]]
    where = f"{chat[0]} holds chat records ({kinds[chat[0]]})" if chat else f"--chat-format {chat_format}"
    text_files = [p for p in files if not record_format(p)]
    if text_files:
        raise UserError(f"{text_files[0]} is a text file, but {where}: chat data and plain text do not mix in one "
                        "run. HINT: prepare the text and the chat records into separate --output-dir folders")
    plain = [p for p, kind in kinds.items() if kind is None and first_fields(p, record_format(p), encoding)]
    if plain and chat_format == "auto":
        raise UserError(f"{plain[0]}: its first record is a plain text record (no 'messages', 'prompt' + "
                        f"'completion' or 'instruction' + 'output'), but {where}; one run takes one format. "
                        "HINT: prepare them separately, or pass --chat-format text to read every record's "
                        "--text-field as plain text")
    return fmt


def write_sample_book(path: Path) -> None:
    """--sample-book: the Python documentation that ships with CPython, as one text file.

    Run again (the Quickstart line twice) it finds its own sample and succeeds; any other file there
    is never replaced."""
    try:
        import pydoc_data.topics as topics
    except ImportError:
        raise UserError("--sample-book: this Python has no pydoc_data module (some distributions ship it "
                        "separately). HINT: use any text file of your own as --input") from None
    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    if path.is_file() and path.stat().st_size == len(text.encode("utf-8")) and \
            path.read_text(encoding="utf-8") == text:
        print(f"{path} already holds the sample text. Next: python prepare_data.py --input {path}")
        return
    if path.exists():
        raise UserError(f"--sample-book: {path} already exists (and is not the sample). HINT: use it (python "
                        f"prepare_data.py --input {path}), or give --sample-book another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise UserError(f"--sample-book: cannot write {path} ({exc.strerror}). "
                        "HINT: choose a folder you can write to") from None
    print(f"wrote {path}: {human_bytes(path.stat().st_size)} of the Python documentation bundled with CPython "
          f"(pydoc_data). Next: python prepare_data.py --input {path}")
