"""Parquet record files (pyarrow, imported only when one is read): the text column checked, then its values
or whole rows, one batch of a row group at a time."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from finetune.core.errors import UserError, first_line

from .lines import MAX_FIELDS_SHOWN

PARQUET_BATCH_ROWS = 1024
PYARROW_HINT = "HINT: pip install pyarrow"


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
