"""Pieces: the inputs as one byte stream of text, cut at safe places into pieces of about an engine's
piece size, each labelled train or val; text files through a Chunker, record files record by record.

"file facts" are what reading a file finds out (bytes, sha256, a stripped byte-order mark, and for record
files the records per split and those skipped); they become the file's entry in meta.json's sources.
"""
from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from pathlib import Path

from finetune.core.errors import UserError

from .engines import CHUNK_CHARS
from .lines import is_utf8
from .piece import Piece
from .records import RecordStats, read_records, record_format
from .sources import BLOCK_BYTES
from .split import RecordSplit, split_at


def read_text(path: Path, encoding: str, facts: dict, base: int) -> Iterator[tuple[str, int]]:
    """Decode a file block by block; yield (text, stream offset just past that text).

    Fills facts["bytes"] and facts["sha256"] once the file is read. A UTF-8 byte-order mark at the
    start is dropped (it would be three tokens of noise) and noted as facts["bom_stripped"].
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    sha, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            skip = len(codecs.BOM_UTF8) if done == 0 and is_utf8(encoding) and block.startswith(codecs.BOM_UTF8) else 0
            if skip:
                facts["bom_stripped"] = True
            try:
                text = decoder.decode(block[skip:], final=not block)
            except UnicodeDecodeError as exc:
                offset = done - held + skip + exc.start
                raise UserError(
                    f"{path} is not valid {encoding} text: byte 0x{exc.object[exc.start]:02x} at byte offset "
                    f"{offset} ({exc.reason}). HINT: pass --encoding with the file's real encoding "
                    "(e.g. latin-1, cp1252, utf-16), or fix or remove the file"
                ) from None
            sha.update(block)
            done += len(block)
            yield text, base + done - len(decoder.getstate()[0])
            if not block:
                break
    facts.update(bytes=done, sha256=sha.hexdigest())


def char_offset(text: str, nbytes: int, encoding: str) -> int:
    """How many whole characters of `text` fit in its first `nbytes` encoded bytes."""
    return len(text[:nbytes].encode(encoding)[:nbytes].decode(encoding, errors="ignore"))


class Chunker:
    """Cuts a stream of files into pieces at safe places, switching split at the boundaries.

    `boundaries` are byte offsets in the stream (the files concatenated) where the split
    alternates, starting with `first`; each one is moved forward to the next safe cut (or
    the end of its file).
    """

    def __init__(self, files, file_facts, encoding, cutter, boundaries=(), first="train",
                 chunk_chars=CHUNK_CHARS, first_index=0):
        self.files, self.file_facts, self.encoding, self.cutter = files, file_facts, encoding, cutter
        self.boundaries, self.first, self.chunk_chars = list(boundaries), first, chunk_chars
        self.first_index = first_index
        self.moved = 0  # the farthest a boundary had to move to a safe cut, in bytes

    def split(self, j: int) -> str:
        return self.first if j % 2 == 0 else ("val" if self.first == "train" else "train")

    def __iter__(self) -> Iterator[Piece]:
        j, stream, index = 0, 0, 0
        for source, (path, facts) in enumerate(zip(self.files, self.file_facts)):
            encoder = codecs.getincrementalencoder(self.encoding)()
            pending, start, resume = "", stream, 0
            for text, end in read_text(path, self.encoding, facts, stream):
                pending += text
                while True:
                    target = self.boundaries[j] if j < len(self.boundaries) else None
                    cut = self.next_cut(pending, start, end, target, resume)
                    if cut is None:
                        resume = max(0, len(pending) - self.cutter.reach)  # searched up to here
                        break
                    piece, pending, resume = pending[:cut], pending[cut:], 0
                    nbytes = len(encoder.encode(piece))
                    yield Piece(piece, self.split(j), self.first_index + source, start, nbytes, False, index)
                    index, start = index + 1, start + nbytes
                    while j < len(self.boundaries) and self.boundaries[j] <= start:
                        self.moved = max(self.moved, start - self.boundaries[j])
                        j += 1
            stream += facts["bytes"]
            if facts["bytes"]:  # empty files add nothing, not even an end-of-text token
                yield Piece(pending, self.split(j), self.first_index + source, start, stream - start, True, index)
                index += 1
            while j < len(self.boundaries) and self.boundaries[j] <= stream:
                self.moved = max(self.moved, stream - self.boundaries[j])
                j += 1  # boundaries in an uncuttable tail move to the end of the file

    def next_cut(self, pending: str, start: int, end: int, target: int | None, resume: int) -> int | None:
        """Where to cut `pending` (covering stream bytes [start, end)), or None to read more."""
        n, chunk = len(pending), self.chunk_chars
        boundary = None
        if target is not None and target < end:
            boundary = max(1, char_offset(pending, target - start, self.encoding))
            if boundary <= chunk:
                return self.cutter.first(pending, max(boundary, resume), n)
        if n < chunk:
            return None
        cut = self.cutter.last(pending, chunk // 2, chunk)
        if cut is None:
            cut = self.cutter.first(pending, max(chunk, resume), boundary or n)
        if cut is None and boundary is not None:
            cut = self.cutter.first(pending, max(boundary, resume), n)
        return cut


# Record inputs (JSON lines, JSON, CSV/TSV, Parquet; records.py reads them)
#
# Each record with text is one document: its pieces, then an end-of-text token. The split is
# decided per record, at the byte offset where it starts in the stream (the inputs concatenated):
# a record that starts inside a validation range is validation, whole, so no record is ever cut
# between the splits (and a range that came up short takes the records after it: split.RecordSplit).
# Ranges are smaller with records (RECORD_VAL_RANGE_BYTES), so validation records come from all over.

class PieceStream:
    """The pieces of `files` in order, one byte stream: runs of text files through a Chunker, record
    files record by record; the split alternates at `boundaries` (stream byte offsets), from `first`.
    Once iterated, `moved` is the farthest a boundary had to move to a safe cut (Chunker.moved), in bytes."""

    def __init__(self, files: list[Path], file_facts: list[dict], encoding: str, text_field: str, cutter,
                 boundaries=(), first: str = "train", chunk_chars: int = CHUNK_CHARS, first_index: int = 0):
        self.files, self.file_facts, self.encoding, self.text_field = files, file_facts, encoding, text_field
        self.cutter, self.boundaries, self.first = cutter, boundaries, first
        self.chunk_chars, self.first_index = chunk_chars, first_index
        self.moved = 0

    def __iter__(self) -> Iterator[Piece]:
        files, facts, boundaries, first = self.files, self.file_facts, self.boundaries, self.first
        base, i, index, step = 0, 0, 0, 0
        while i < len(files):
            j = i + 1
            if record_format(files[i]):
                pieces = record_pieces(files[i], facts[i], self.encoding, self.text_field, self.cutter,
                                       self.chunk_chars, base, boundaries, first, self.first_index + i)
            else:
                while j < len(files) and not record_format(files[j]):
                    j += 1
                chunker = Chunker(files[i:j], facts[i:j], self.encoding, self.cutter,
                                  [b - base for b in boundaries if b > base], split_at(base, boundaries, first),
                                  self.chunk_chars, self.first_index + i)
                pieces = shifted(chunker, base)
            for piece in pieces:
                # Piece indices pace the fast path's spot checks (every CHECK_EVERY-th index is checked). A
                # record is often a small piece: count in steps of at least half a CHUNK_CHARS of text, so
                # records are checked as often per character as text is; pieces inside a step get -1.
                if index == 0 or step >= CHUNK_CHARS // 2:
                    piece.index, index, step = index, index + 1, 0
                else:
                    piece.index = -1
                step += len(piece.text)
                yield piece
            if not record_format(files[i]):
                self.moved = max(self.moved, chunker.moved)
            base += sum(facts[k]["bytes"] for k in range(i, j))
            i = j


def shifted(pieces: Iterator[Piece], base: int) -> Iterator[Piece]:
    """A Chunker counts bytes from the start of its own files; the stream from `base`."""
    for piece in pieces:
        piece.start += base
        yield piece


def record_pieces(path: Path, facts: dict, encoding: str, text_field: str, cutter, chunk_chars: int, base: int,
                  boundaries, first: str, source: int) -> Iterator[Piece]:
    """The documents of one record file. A record's bytes run up to the next record's start (the first
    record's from the file's start), so the pieces' bytes add up to the file's size."""
    stats, splits = RecordStats(), RecordSplit(boundaries, first)
    held = None  # one record of look-ahead: where the next one starts ends this one (and sizes it for splits)
    for offset, text in read_records(path, record_format(path), text_field, encoding, stats, facts):
        if held is not None:
            yield from record_document(*held, splits.label(held[1], base + offset), base + offset, source,
                                       cutter, chunk_chars)
        held = (text, base if held is None else base + offset)
    if held is not None:
        end = base + facts["bytes"]
        yield from record_document(*held, splits.label(held[1], end), end, source, cutter, chunk_chars)
    facts.update(format=record_format(path), text_field=text_field, records=splits.counts, skipped=stats.skipped)


def record_document(text: str, start: int, split: str, end: int, source: int, cutter,
                    chunk_chars: int) -> Iterator[Piece]:
    """One record's pieces (bytes [start, end) of the stream); an end-of-text token follows the last."""
    parts = list(cut_document(text, cutter, chunk_chars))
    done = 0
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        nbytes = end - start - done if last else (end - start) * len(part) // len(text)
        yield Piece(part, split, source, start + done, nbytes, last, 0)
        done += nbytes


def cut_document(text: str, cutter, chunk_chars: int) -> Iterator[str]:
    """A long record in pieces of about chunk_chars, cut only where the tokens cannot change."""
    pos = 0
    while len(text) - pos > chunk_chars:
        cut = cutter.last(text, pos + chunk_chars // 2, pos + chunk_chars) or \
            cutter.first(text, pos + chunk_chars, len(text))
        if cut is None:
            break  # no safe cut left: the rest is one piece
        yield text[pos:cut]
        pos = cut
    yield text[pos:]


