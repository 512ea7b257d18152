"""Record inputs of prepare_data.py: JSON lines, JSON arrays, CSV/TSV and Parquet, read as a stream.

Each reader yields (byte offset of the record in its file, text of its --text-field) for the records
that have text, and counts the others (empty, null or without the field) in a RecordStats. Bad input
is a UserError naming the file, the line (or row) and what is wrong. Memory holds one record (JSON, CSV)
or one batch of a row group (Parquet), never the file.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, first_line

RECORD_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
BLOCK_BYTES = 1 << 20
MAX_FIELDS_SHOWN = 12
PARQUET_BATCH_ROWS = 1024
PYARROW_HINT = "HINT: pip install pyarrow"


def record_format(path: Path) -> str | None:
    """"jsonl", "json", "csv", "tsv" or "parquet" by the file's extension; None for text files."""
    return RECORD_FORMATS.get(path.suffix.lower())


@dataclass
class RecordStats:
    """What one record file held: documents taken, records skipped (and why), fields seen."""
    records: int = 0                       # documents taken (non-empty text)
    skipped: dict = field(default_factory=lambda: {"empty": 0, "null": 0, "missing": 0})
    fields: dict = field(default_factory=dict)  # field names seen (insertion-ordered), for the error message
    with_field: int = 0                    # records that have the field at all

    def see_fields(self, names) -> None:
        if len(self.fields) < 1000:
            self.fields.update(dict.fromkeys(names))


def is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def read_records(path: Path, fmt: str, text_field: str, encoding: str, stats: RecordStats,
                 facts: dict) -> Iterator[tuple[int, str]]:
    """(byte offset, text) of each record with text; fills `facts`, the file facts (bytes, sha256, bom_stripped), at the end."""
    hasher = hashlib.sha256()
    if fmt == "parquet":
        values = parquet_values(path, text_field)
    elif fmt in ("csv", "tsv"):
        values = csv_values(path, fmt, text_field, encoding, facts, hasher)
    else:
        objects = jsonl_objects(path, encoding, facts, hasher) if fmt == "jsonl" else \
            json_objects(path, encoding, facts, hasher)
        values = json_values(objects, path, text_field, stats)
    for offset, value in values:
        text = take_text(value, stats)
        if text is not None:
            yield offset, text
    if stats.with_field == 0 and sum(stats.skipped.values()) > 0:
        shown = ", ".join(list(stats.fields)[:MAX_FIELDS_SHOWN]) or "none"
        raise UserError(f"{path}: no record has the field {text_field!r} (--text-field); the fields that "
                        f"exist: {shown}. HINT: pass --text-field with the field that holds the text")
    if fmt == "parquet":
        facts.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    else:
        facts.update(bytes=path.stat().st_size, sha256=hasher.hexdigest())


MISSING = object()  # a record without the field (as opposed to one whose field is null)


def take_text(value, stats: RecordStats) -> str | None:
    """The record's text, or None (counted as skipped) when it is missing, null or empty."""
    if value is MISSING:
        stats.skipped["missing"] += 1
        return None
    stats.with_field += 1
    if value is None:
        stats.skipped["null"] += 1
        return None
    if not value.strip():
        stats.skipped["empty"] += 1  # empty or whitespace only: nothing to learn from
        return None
    stats.records += 1
    return value


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            sha.update(block)
    return sha.hexdigest()


# -----------------------------------------------------------------------------
# JSON


def json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def json_values(objects, path: Path, text_field: str, stats: RecordStats) -> Iterator[tuple[int, object]]:
    for offset, where, obj in objects:
        if not isinstance(obj, dict):
            raise UserError(f"{path} {where}: the record is a JSON {json_type(obj)}, not an object. "
                            f"HINT: each record must be an object such as {{\"{text_field}\": \"...\"}}")
        if text_field not in obj:
            stats.see_fields(obj)
            yield offset, MISSING
            continue
        value = obj[text_field]
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path} {where}: field {text_field!r} is a JSON {json_type(value)}, not a string. "
                            "HINT: point --text-field at a field that holds text, or fix that record")
        check_no_lone_surrogate(value, path, where, text_field)
        yield offset, value


def check_no_lone_surrogate(text: str | None, path: Path, where: str, text_field: str) -> None:
    """JSON's \\ud800 escapes give a str that is no Unicode text; refused, as no tokenizer can encode it."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{path} {where}: field {text_field!r} holds a lone surrogate (U+{ord(text[exc.start]):04X}"
                        f" at character {exc.start + 1}), which is not text. HINT: fix the text's encoding (an "
                        "escape such as \\ud800 must be half of a pair)") from None


def too_deep(path: Path, where: str) -> UserError:
    return UserError(f"{path} {where}: the JSON is nested too deeply to read. HINT: records are objects "
                     "with a text field; flatten or remove the deeply nested value")


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


def jsonl_objects(path: Path, encoding: str, facts: dict, hasher) -> Iterator[tuple[int, str, object]]:
    """One JSON value per line; blank lines are allowed."""
    where = [0, 0, 0]
    with open(path, "rb") as f:
        for line in record_lines(f, path, encoding, facts, hasher, where):
            start, _, number = where
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except RecursionError:
                raise too_deep(path, f"line {number}") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {number}: malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}). "
                                "HINT: each line of a .jsonl file must be one complete JSON object") from None
            yield start, f"line {number}", obj


class JsonStream:
    """A .json file decoded block by block, with the position's line number and byte offset."""

    def __init__(self, f, path: Path, encoding: str, facts: dict, hasher):
        self.f, self.path, self.encoding, self.facts, self.hasher = f, path, encoding, facts, hasher
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self.buf, self.pos, self.eof, self.first = "", 0, False, True
        self.line, self.bytes, self.counted = 1, 0, 0  # line number / byte offset of buf[self.counted]
        self.width = byte_width(encoding)

    def more(self, at_least: int = 0) -> bool:
        """Append decoded text to the buffer (at least `at_least` bytes); False at the end of the file."""
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:  # drop what was consumed, so the buffer stays small
            self.advance(self.pos)
            self.buf, self.counted, self.pos = self.buf[self.pos:], 0, 0
        raw = self.f.read(max(BLOCK_BYTES, at_least))
        self.hasher.update(raw)
        if self.first:
            raw, self.first = strip_bom(raw, self.encoding, self.facts), False
        try:
            self.buf += self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise UserError(f"{self.path} is not valid {self.encoding} text near line {self.line_at(len(self.buf))}"
                            f" ({exc.reason}). HINT: pass --encoding with the file's real encoding") from None
        self.eof = not raw
        return True

    def advance(self, to: int) -> None:
        """Count lines and bytes from buf[self.counted] up to buf[to]."""
        consumed = self.buf[self.counted:to]
        self.line += consumed.count("\n")
        self.bytes += self.width(consumed)
        self.counted = to

    def line_at(self, pos: int) -> int:
        return self.line + self.buf.count("\n", self.counted, pos)

    def skip_space(self) -> str:
        """The next non-whitespace character ("" at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def value(self) -> tuple[int, int, object]:
        """The JSON value at the position: (its byte offset, its line, the value)."""
        decoder = json.JSONDecoder()
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise too_deep(self.path, f"line {self.line_at(self.pos)}") from None
            except json.JSONDecodeError as exc:
                # Cut off by the end of the buffer (not malformed)? Read as much again and retry. An error
                # further back is real: reporting it then keeps a malformed file from being read whole.
                cut_off = exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated string")
                if cut_off and self.more(len(self.buf) - self.pos):
                    continue
                self.malformed(exc.msg, exc.pos)
            if end == len(self.buf) and self.more():
                continue  # a number could go on in the next block
            self.advance(self.pos)
            start, line, self.pos = self.bytes, self.line, end
            return start, line, obj

    def malformed(self, what: str, pos: int):
        raise UserError(f"{self.path} line {self.line_at(pos)}: malformed JSON ({what}). HINT: a .json file "
                        "must hold one array of objects, or one object per line (JSON lines)")


def json_objects(path: Path, encoding: str, facts: dict, hasher) -> Iterator[tuple[int, str, object]]:
    """A .json file: one array of objects, or objects one after another (JSON lines, pretty-printed)."""
    with open(path, "rb") as f:
        stream = JsonStream(f, path, encoding, facts, hasher)
        if stream.skip_space() != "[":
            while stream.skip_space():
                start, line, obj = stream.value()
                yield start, f"line {line}", obj
            return
        stream.pos += 1
        number = 0
        while True:
            if stream.skip_space() == "]" and number == 0:
                stream.pos += 1
                break
            number += 1
            start, line, obj = stream.value()
            yield start, f"line {line} (array item {number})", obj
            after = stream.skip_space()
            stream.pos += 1
            if after == "]":
                break
            if after != ",":
                stream.malformed("expected ',' or ']' after an array item" if after else "the array is not closed",
                                 stream.pos - 1)
        if stream.skip_space():
            stream.malformed("extra data after the array", stream.pos)


# -----------------------------------------------------------------------------
# CSV and TSV


def csv_header(reader, path: Path, text_field: str | None) -> list[str]:
    header = next(reader, None)
    if header is None:
        raise UserError(f"{path} is empty: no header row. HINT: a CSV/TSV file starts with a header row "
                        "naming its columns")
    problems = [name for name in header if not name.strip()]
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if problems or duplicates:
        what = "an empty column name" if problems else f"the column name {duplicates[0]!r} twice"
        raise UserError(f"{path} line 1: the header row has {what}, so it is not a header. HINT: the first "
                        "row of a CSV/TSV file must name each column once")
    if text_field is not None and text_field not in header:
        shown = ", ".join(header[:MAX_FIELDS_SHOWN]) + (", ..." if len(header) > MAX_FIELDS_SHOWN else "")
        raise UserError(f"{path}: no column {text_field!r} (--text-field) in the header row (line 1), which "
                        f"names: {shown}. HINT: pass --text-field with the column that holds the text; the "
                        "first row must be a header")
    return header


def csv_values(path: Path, fmt: str, text_field: str, encoding: str, facts: dict,
               hasher) -> Iterator[tuple[int, object]]:
    column = None
    for start, _, header, values in csv_rows(path, fmt, encoding, facts, hasher, text_field):
        column = header.index(text_field) if column is None else column
        yield start, values[column]


def csv_rows(path: Path, fmt: str, encoding: str, facts: dict, hasher,
             text_field: str | None = None) -> Iterator[tuple[int, str, list[str], list[str]]]:
    """(byte offset, "row N (line M)", header, values) of each row; the header must name `text_field` if given."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # default 128 KB: a long document is one field
    where = [0, 0, 0]  # record_lines: the last line's start, end and number
    with open(path, "rb") as f:
        reader = csv.reader(record_lines(f, path, encoding, facts, hasher, where, cr_ends=True),
                            delimiter="\t" if fmt == "tsv" else ",")
        try:
            header = csv_header(reader, path, text_field)
            row, start = 1, where[1]
            for values in reader:
                row += 1
                if values:  # a blank line is no row
                    if len(values) != len(header):
                        raise UserError(f"{path} row {row} (line {reader.line_num}): {len(values)} fields, but the "
                                        f"header has {len(header)}. HINT: quote fields that hold the delimiter, "
                                        "and give every row the header's number of fields")
                    yield start, f"row {row} (line {reader.line_num})", header, values
                start = where[1]
        except csv.Error as exc:
            raise UserError(f"{path} line {reader.line_num}: not valid {fmt.upper()} ({exc}). "
                            "HINT: fix the file, or export it again") from None


# -----------------------------------------------------------------------------
# Parquet


def import_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow, which is not installed. {PYARROW_HINT}") from None
    return pq


def open_parquet(path: Path, text_field: str | None):
    """The ParquetFile, after checking that the text column (if any) exists and holds strings."""
    pq = import_parquet(path)
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise UserError(f"{path} cannot be read as Parquet ({first_line(exc)}). "
                        "HINT: check that the file is complete and really is Parquet") from None
    schema = parquet.schema_arrow
    if text_field is None:
        return parquet
    if text_field not in schema.names:
        shown = ", ".join(schema.names[:MAX_FIELDS_SHOWN]) + (", ..." if len(schema.names) > MAX_FIELDS_SHOWN else "")
        raise UserError(f"{path}: no column {text_field!r} (--text-field); its columns: {shown}. "
                        "HINT: pass --text-field with the column that holds the text")
    kind = schema.field(text_field).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(value_kind)):
        raise UserError(f"{path}: column {text_field!r} holds {kind} values, not strings. "
                        "HINT: point --text-field at a text column")
    return parquet


def parquet_values(path: Path, text_field: str) -> Iterator[tuple[int, object]]:
    """Row by row, one row group at a time; a row's offset is its share of the file (rows have none)."""
    parquet = open_parquet(path, text_field)
    rows, size, row = max(1, parquet.metadata.num_rows), path.stat().st_size, 0
    for group in range(parquet.num_row_groups):
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group],
                                              columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    yield size * row // rows, value
                    row += 1
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise UserError(f"{path} row {row + 1} (row group {group}): cannot be read "
                            f"({first_line(exc)}). HINT: the file is damaged; write it again") \
                from None


def parquet_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    """Whole rows as dicts (every column), one batch of a row group at a time; offsets as parquet_values'."""
    parquet = open_parquet(path, None)
    rows, size, row = max(1, parquet.metadata.num_rows), path.stat().st_size, 0
    for group in range(parquet.num_row_groups):
        try:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                for obj in batch.to_pylist():
                    row += 1
                    yield size * (row - 1) // rows, f"row {row}", obj
        except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
            raise UserError(f"{path} row {row + 1} (row group {group}): cannot be read "
                            f"({first_line(exc)}). HINT: the file is damaged; write it again") \
                from None


# -----------------------------------------------------------------------------
# Whole records (chat records: every field matters, not one text field)


def read_objects(path: Path, fmt: str, encoding: str, facts: dict) -> Iterator[tuple[int, str, dict]]:
    """(byte offset, "PATH line N" or "PATH row N", the record as a dict) of every record; a CSV/TSV row
    is {column: text}. Fills `facts` (bytes, sha256, bom_stripped) at the end, as read_records does."""
    hasher = hashlib.sha256()
    if fmt == "parquet":
        rows = parquet_rows(path)
    elif fmt in ("csv", "tsv"):
        rows = ((start, where, dict(zip(header, values)))
                for start, where, header, values in csv_rows(path, fmt, encoding, facts, hasher))
    else:
        rows = jsonl_objects(path, encoding, facts, hasher) if fmt == "jsonl" else \
            json_objects(path, encoding, facts, hasher)
    for offset, where, obj in rows:
        if not isinstance(obj, dict):
            raise UserError(f"{path} {where}: the record is a JSON {json_type(obj)}, not an object. HINT: each "
                            "record must be an object such as {\"messages\": [...]} or {\"prompt\": ..., "
                            "\"completion\": ...}")
        yield offset, f"{path} {where}", obj
    facts.update(bytes=path.stat().st_size, sha256=file_sha256(path) if fmt == "parquet" else hasher.hexdigest())


def first_fields(path: Path, fmt: str, encoding: str) -> list[str] | None:
    """The field names of a record file's first record (a CSV header, a Parquet schema); None when the file
    holds no record or cannot be read (the run's reader then says why)."""
    try:
        if fmt == "parquet":
            return open_parquet(path, None).schema_arrow.names
        with contextlib.closing(read_objects(path, fmt, encoding, {})) as records:
            first = next(records, None)
    except UserError:
        return None
    return None if first is None else list(first[2])


def check_record_file(path: Path, fmt: str, text_field: str, encoding: str, chat: bool = False) -> str | None:
    """The cheap checks before the run (header, schema, pyarrow), as a message; None when they pass. Chat
    records (`chat`) have no text field: their reader checks them record by record."""
    try:
        if fmt == "parquet":
            open_parquet(path, None if chat else text_field)
        elif fmt in ("csv", "tsv"):
            with contextlib.closing(csv_rows(path, fmt, encoding, {}, hashlib.sha256(),
                                             None if chat else text_field)) as rows:
                next(rows, None)  # the header, and the first row
    except UserError as exc:
        return str(exc)
    return None
