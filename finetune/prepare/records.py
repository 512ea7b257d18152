"""Record inputs of prepare_data.py: JSON lines, JSON arrays, CSV/TSV and Parquet, read as a stream.

Each reader yields (byte offset of the record in its file, text of its --text-field) for the records
that have text, and counts the others (empty, null or without the field) in a RecordStats. Bad input
is a UserError naming the file, the line (or row) and what is wrong. Memory holds one record (JSON, CSV)
or one batch of a row group (Parquet), never the file.

The readers of each format are rooms of their own (lines, jsonrecords, csvrecords, parquetrecords); this one
picks the reader by the file's extension and takes the text field.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core.errors import UserError

from .csvrecords import csv_rows
from .jsonrecords import check_no_lone_surrogate, json_objects, json_type, jsonl_objects
from .lines import MAX_FIELDS_SHOWN, file_sha256
from .parquetrecords import open_parquet, parquet_rows, parquet_values

RECORD_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


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


# -----------------------------------------------------------------------------
# The text field of each record (Parquet's column: parquetrecords.parquet_values)


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


def csv_values(path: Path, fmt: str, text_field: str, encoding: str, facts: dict,
               hasher) -> Iterator[tuple[int, object]]:
    column = None
    for start, _, header, values in csv_rows(path, fmt, encoding, facts, hasher, text_field):
        column = header.index(text_field) if column is None else column
        yield start, values[column]


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
