"""JSON record files: JSON lines (one value per line) and .json files (one array of objects, or objects one
after another), read as a stream; each value with its byte offset and where it is ("line N", "line N (array
item M)"). Malformed JSON, a value nested too deeply or a lone surrogate is a UserError naming the place.
"""
from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

from finetune.core.errors import UserError

from .lines import BLOCK_BYTES, byte_width, record_lines, strip_bom


def json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


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
