"""--input files as documents, read by prepare_data.py's own readers (finetune/prepare): a text file is one
document; each record of a JSONL/JSON/CSV/TSV/Parquet file is one (its --text-field); a chat record (messages,
prompt + completion, instruction + output) is one conversation, rendered by each model's own template.

Nothing is held whole: `Documents` reads the files again each time it is iterated (once per model), a record
at a time, and a text file is not read at all until it is scored, then in pieces cut where the tokenizer
gives the same tokens as on the whole text (prepare_data.py's Chunker and Cutter), so a text file of any size
costs the memory of one piece. The files are read through once when `Documents` is made, before any model
loads, so that a file without text or with a bad record is an error line then, not after the first model.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core.errors import UserError
from finetune.formats.chat import Conversation, FormatChooser, PromptCompletion, example_of, parse_cell
from finetune.prepare.records import RecordStats, read_objects, read_records, record_format
from finetune.prepare.sources import check_has_text, find_text_files, first_format
from finetune.prepare.stream import Chunker, read_text

from .metrics import WORD_SPLIT, count_bytes

PIECE_CHARS = 64 << 10  # characters of a text file tokenized at once (prepare_data.py's piece size for HF tokenizers)


@dataclass
class Document:
    input: str                 # the --input file it came from
    name: str                  # "FILE" or "FILE line N" / "FILE record N"
    text: str | None = None    # plain text held in memory (a record's)
    chat: Conversation | PromptCompletion | None = None  # a chat record
    path: Path | None = None   # a text file, read in pieces when scored (text_pieces)
    encoding: str = "utf-8"

    def text_pieces(self, cutter) -> Iterator[str]:
        """The document's text in pieces that tokenize, one by one, into the tokens of the whole text
        (`cutter`: prepare_data.py's Cutter for the scoring model's tokenizer)."""
        if self.path is None:
            if self.text:
                yield self.text
            return
        for piece in Chunker([self.path], [{}], self.encoding, cutter, chunk_chars=PIECE_CHARS):
            if piece.text:
                yield piece.text


@dataclass
class TextCounts:
    """The bytes and words (lm-eval's count_words: len(re.split(r"\\s+", text))) of a text read in pieces."""
    bytes: int = 0
    whitespace_runs: int = 0
    ends_in_whitespace: bool = field(default=False, repr=False)

    def add(self, piece: str) -> None:
        if not piece:
            return
        self.bytes += count_bytes(piece)
        runs = len(WORD_SPLIT.findall(piece))
        if self.ends_in_whitespace and WORD_SPLIT.match(piece):  # a run cut in two by the piece boundary
            runs -= 1
        self.whitespace_runs += runs
        self.ends_in_whitespace = WORD_SPLIT.match(piece[-1]) is not None

    @property
    def words(self) -> int:
        return self.whitespace_runs + 1


class Documents:
    """Every document of the --input paths (folders walked as prepare_data.py walks them), in order; iterable
    any number of times, each time reading the files again."""

    def __init__(self, paths: list[str], text_field: str = "text", encoding: str = "utf-8"):
        problems: list[str] = []
        self.files = find_text_files(paths, "--input", problems)
        if problems:
            raise UserError(problems[0])
        self.text_field, self.encoding = text_field, encoding
        self.count, self.has_chat, self.text_bytes = 0, False, 0
        for path in self.files:  # read through once: errors now, and the sizes for --nproc's check
            found = 0
            for document in self.of_file(path):
                found += 1
                self.has_chat |= document.chat is not None
                if document.path is not None:
                    for text, _ in read_text(path, encoding, {}, 0):  # decodes it all: a bad byte is found now
                        self.text_bytes += count_bytes(text)
                elif document.text is not None:
                    self.text_bytes += count_bytes(document.text)
            if not found:
                raise UserError(f"--input {path} holds no text to evaluate on (empty, whitespace only, or no record "
                                f"with text in {text_field!r}). HINT: check the path, or --text-field for record files")
            self.count += found

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            yield from self.of_file(path)

    def of_file(self, path: Path) -> Iterator[Document]:
        fmt = record_format(path)
        if fmt is None:
            if check_has_text([path], self.encoding, "--input") is None:
                yield Document(str(path), str(path), path=path, encoding=self.encoding)
            return
        if first_format(path, self.encoding, "auto"):
            yield from chat_documents(path, fmt, self.encoding)
            return
        for i, (_, text) in enumerate(read_records(path, fmt, self.text_field, self.encoding, RecordStats(), {}), 1):
            yield Document(str(path), f"{path} record {i}", text=text)


def read_documents(paths: list[str], text_field: str = "text", encoding: str = "utf-8") -> Documents:
    return Documents(paths, text_field, encoding)


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
