"""Which tokens each forward pass sees, and which of them it scores.

A window is (tokens, n_targets): the model reads tokens[:-1] and the last n_targets tokens are scored,
each predicted from everything before it in the window. A document of any length becomes windows of at
most `context` model inputs, every one of its tokens scored exactly once; its first token is predicted
from a prefix token (the tokenizer's BOS, else EOS), as lm-evaluation-harness does.

The windows of a document come from a stream of its tokens in pieces (stream_*), holding only the last
`context` tokens between pieces: a document of any size costs the memory of one piece and one window.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Window(NamedTuple):
    tokens: list[int]
    n_targets: int


class TokenBuffer:
    """The tokens of [prefix, *document] read so far, from absolute position `start` on (what is older is
    dropped: no window reaches back that far)."""

    def __init__(self, prefix: int):
        self.tokens, self.start = [prefix], 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def add(self, piece: Iterable[int]) -> None:
        self.tokens.extend(piece.tolist() if hasattr(piece, "tolist") else piece)  # Python ints, as torch takes them

    def slice(self, begin: int, end: int) -> list[int]:
        return self.tokens[begin - self.start:end - self.start]

    def drop_before(self, position: int) -> None:
        if position - self.start > len(self.tokens) // 2:  # amortized: trimming copies what is kept
            del self.tokens[:position - self.start]
            self.start = position


def stream_rolling_windows(pieces: Iterable[Iterable[int]], context: int, prefix: int) -> Iterator[Window]:
    """lm-eval's loglikelihood_rolling: disjoint windows of `context` predictions, each starting where the
    previous one stopped; a window reads as much of what precedes its targets as fits (the last one
    reaches back a full context, whatever its number of targets)."""
    sequence, done = TokenBuffer(prefix), 0  # sequence position i + 1 is token i of the document

    def window(end: int) -> Window:  # predicts tokens[done:end]
        return Window(sequence.slice(max(0, end - context), end + 1), end - done)

    for piece in pieces:
        sequence.add(piece)
        while sequence.end - 1 - done >= context:  # a full window; the same whether more tokens follow or not
            yield window(done + context)
            done += context
            sequence.drop_before(max(0, done - context))
    if sequence.end - 1 > done:
        yield window(sequence.end - 1)


def stream_strided_windows(pieces: Iterable[Iterable[int]], context: int, stride: int,
                           prefix: int) -> Iterator[Window]:
    """The Hugging Face perplexity guide's sliding window over [prefix, *tokens]: windows of `context` tokens
    starting every `stride` tokens, each scoring the tokens the previous window did not reach, so every
    token after the first has at least context - stride tokens before it (stride < context: each token is
    scored once)."""
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, {context}), got {stride}")
    sequence = TokenBuffer(prefix)
    begin, scored_up_to = 0, 1  # the prefix, position 0, is never a target
    for piece in pieces:
        sequence.add(piece)
        while begin + context <= sequence.end:  # a full window: the same whether more tokens follow or not
            yield Window(sequence.slice(begin, begin + context), begin + context - scored_up_to)
            scored_up_to, begin = begin + context, begin + stride
            sequence.drop_before(begin)
    if sequence.end > 1 and scored_up_to < sequence.end:  # the last window ends with the document
        yield Window(sequence.slice(begin, sequence.end), sequence.end - scored_up_to)


def rolling_windows(tokens: list[int], context: int, prefix: int) -> list[Window]:
    """stream_rolling_windows of a document held whole."""
    return list(stream_rolling_windows([tokens], context, prefix))


def strided_windows(tokens: list[int], context: int, stride: int, prefix: int) -> list[Window]:
    """stream_strided_windows of a document held whole."""
    return list(stream_strided_windows([tokens], context, stride, prefix))


def continuation_window(context_ids: list[int], continuation_ids: list[int], context: int) -> Window:
    """The log-likelihood of a continuation after a context (a multiple-choice answer after its question):
    lm-eval's window, the context cut from the left so that the pair fits."""
    whole = [*context_ids, *continuation_ids][-(context + 1):]
    return Window(whole, len(continuation_ids))
