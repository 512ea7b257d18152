"""The bytes of a record file as decoded lines (JSON lines, CSV/TSV): each line with its byte offsets and
number, the byte-order mark stripped, old Mac line ends for CSV, UTF-16 and the like decoded block by block;
a line that is not valid text is a UserError naming it. Also the file's sha256.
"""
from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from finetune.core.errors import UserError

BLOCK_BYTES = 1 << 20
MAX_FIELDS_SHOWN = 12  # field or column names an error message lists


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            sha.update(block)
    return sha.hexdigest()


def decode_line(raw: bytes, path: Path, where: str, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} {where} is not valid {encoding} text: byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1} ({exc.reason}). HINT: pass --encoding with the file's real encoding, "
                        "or fix the file") from None


def strip_bom(raw: bytes, encoding: str, facts: dict) -> bytes:
    if is_utf8(encoding) and raw.startswith(codecs.BOM_UTF8):
        facts["bom_stripped"] = True
        return raw[len(codecs.BOM_UTF8):]
    return raw


def lines_are_bytes(encoding: str) -> bool:
    """True where a b"\\n" byte can only be a line end (UTF-8, Latin-1, cp1252 and other ASCII-based
    encodings): lines are then split as bytes and decoded one by one (the fast path). In UTF-16 or UTF-32
    a newline is two or four bytes, and b"\\n" is often half of another character."""
    return "\n".encode(encoding) == b"\n"


def has_lone_cr(raw: bytes) -> bool:
    """A "\\r" that ends a line on its own (old Mac line ends) inside a line split at b"\\n"."""
    n = len(raw)  # a "\\r" before the last two bytes, or the last but one without a "\\n" after it
    return raw.find(b"\r", 0, n - 2) != -1 or (raw[n - 2:n - 1] == b"\r" and raw[n - 1:] != b"\n")


def record_lines(f, path: Path, encoding: str, facts: dict, hasher, where: list,
                 cr_ends: bool = False) -> Iterator[str]:
    """The decoded lines of a record file, each with its line end; before each, `where` is set to
    [byte offset of the line, byte offset past it, line number].

    With cr_ends (CSV), a lone "\\r" ends a line too, as in Python's newline="" mode: a CSV with old Mac
    line ends is read, and a "\\r" inside a quoted field stays in the field. The loop is the fast path of
    every UTF-8 JSON-lines and CSV file, so it is kept lean: one decode per line, and the error text
    (with the line number) is built only for a line that fails.
    """
    if not lines_are_bytes(encoding):
        yield from decoded_lines(f, path, encoding, facts, hasher, where, cr_ends)
        return
    offset, number = 0, 0
    for raw in f:
        hasher.update(raw)
        start, offset = offset, offset + len(raw)
        if number == 0:
            raw = strip_bom(raw, encoding, facts)
        # a lone "\r" before the b"\n" (one find; has_lone_cr also checks a last line without b"\n")
        if cr_ends and (raw.find(b"\r", 0, len(raw) - 2) != -1 or raw[-1:] != b"\n") and has_lone_cr(raw):
            for part in raw.splitlines(keepends=True):  # bytes.splitlines: only \n, \r and \r\n end lines
                number += 1
                where[:] = start, start + len(part), number
                yield decode_line(part, path, f"line {number}", encoding)
                start += len(part)
            continue
        number += 1
        where[:] = start, offset, number
        try:
            yield raw.decode(encoding)
        except UnicodeDecodeError:
            decode_line(raw, path, f"line {number}", encoding)  # raises the error that names the line


def byte_width(encoding: str):
    """len(text.encode(encoding)) without the byte-order mark that "utf-16" and "utf-32" put in front."""
    mark = len("".encode(encoding))
    return lambda text: len(text.encode(encoding)) - mark


def decoded_lines(f, path: Path, encoding: str, facts: dict, hasher, where: list,
                  cr_ends: bool) -> Iterator[str]:
    """record_lines for UTF-16 and the like: decoded block by block, then split into lines (as text files are
    read); a line's byte offsets come from the decoder's position and the lines' encoded widths."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    width, ends = byte_width(encoding), re.compile("\r\n?|\n" if cr_ends else "\n")
    pending, done, number = "", 0, 0
    while True:
        block = f.read(BLOCK_BYTES)
        hasher.update(block)
        held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            pending += decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            line = number + len(ends.findall(pending)) + 1
            raise UserError(f"{path} line {line} is not valid {encoding} text: byte 0x{exc.object[exc.start]:02x} "
                            f"at byte offset {done - held + exc.start} ({exc.reason}). HINT: pass --encoding with "
                            "the file's real encoding, or fix the file") from None
        done += len(block)
        if number == 0 and pending.startswith("\ufeff"):  # a byte-order mark the codec keeps (utf-16-le)
            pending = pending[1:]
            facts["bom_stripped"] = True
        start, pos = done - len(decoder.getstate()[0]) - width(pending), 0
        for end in ends.finditer(pending):
            if block and end.end() == len(pending) and end.group() == "\r":
                break  # a "\r\n" may be cut by the block's end
            line = pending[pos:end.end()]
            number += 1
            where[:] = start, start + width(line), number
            yield line
            start, pos = where[1], end.end()
        pending = pending[pos:]
        if not block:
            if pending:
                where[:] = start, start + width(pending), number + 1
                yield pending
            return
