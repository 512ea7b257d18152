"""The unit that flows through the pipeline: a stretch of input text, the split it belongs to and where it
came from. Every room of the pipeline passes it along, so it sits below them all."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Piece:
    text: str
    split: str        # "train" or "val"
    source: int       # index into the sources list of meta.json
    start: int        # offset of the piece in its byte stream (the inputs concatenated)
    nbytes: int
    doc_end: bool     # last piece of its file: an end-of-text token follows it
    index: int
