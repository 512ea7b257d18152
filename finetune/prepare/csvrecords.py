"""CSV and TSV record files: the header row checked, then each row with its byte offset and where it is
("row N (line M)"), read line by line (lines.record_lines) with Python's csv module."""
from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from finetune.core.errors import UserError

from .lines import MAX_FIELDS_SHOWN, record_lines


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
