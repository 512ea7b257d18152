"""--input files as documents, read by prepare_data.py's own readers (finetune/prepare): a text file is one
document; each record of a JSONL/JSON/CSV/TSV/Parquet file is one (its --text-field); a chat record (messages,
prompt + completion, instruction + output) is one conversation, rendered by each model's own template."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.core.errors import UserError
from finetune.formats.chat import Conversation, FormatChooser, PromptCompletion, example_of, parse_cell
from finetune.prepare.records import RecordStats, read_objects, read_records, record_format
from finetune.prepare.sources import check_has_text, find_text_files, first_format
from finetune.prepare.stream import read_text


@dataclass
class Document:
    input: str                 # the --input file it came from
    name: str                  # "FILE" or "FILE line N" / "FILE record N"
    text: str | None = None    # plain text
    chat: Conversation | PromptCompletion | None = None  # a chat record


def read_documents(paths: list[str], text_field: str = "text", encoding: str = "utf-8") -> list[Document]:
    """Every document of the --input paths (folders walked as prepare_data.py walks them), in order."""
    problems: list[str] = []
    files = find_text_files(paths, "--input", problems)
    if problems:
        raise UserError(problems[0])
    documents = []
    for path in files:
        found = list(file_documents(path, text_field, encoding))
        if not found:
            raise UserError(f"--input {path} holds no text to evaluate on (empty, whitespace only, or no record "
                            f"with text in {text_field!r}). HINT: check the path, or --text-field for record files")
        documents += found
    return documents


def file_documents(path: Path, text_field: str, encoding: str):
    fmt = record_format(path)
    if fmt is None:
        if check_has_text([path], encoding, "--input") is None:
            yield Document(str(path), str(path), text="".join(text for text, _ in read_text(path, encoding, {}, 0)))
        return
    if first_format(path, encoding, "auto"):
        yield from chat_documents(path, fmt, encoding)
        return
    for i, (_, text) in enumerate(read_records(path, fmt, text_field, encoding, RecordStats(), {}), 1):
        yield Document(str(path), f"{path} record {i}", text=text)


def chat_documents(path: Path, fmt: str, encoding: str):
    chooser = FormatChooser()
    for _, where, obj in read_objects(path, fmt, encoding, {}):
        if fmt in ("csv", "tsv") and "messages" in obj:  # CSV has no lists: the messages cell is JSON text
            obj = {**obj, "messages": parse_cell(obj["messages"], where, "messages")}
        kind = chooser.choose(obj, where)
        if kind is None:
            raise UserError(f"{where}: the record is not a chat record, but {path} holds chat records. HINT: keep "
                            "chat records and plain text records in separate files")
        yield Document(str(path), where, chat=example_of(obj, kind, where))
