"""Which tokens each forward pass sees, and which of them it scores.

A window is (tokens, n_targets): the model reads tokens[:-1] and the last n_targets tokens are scored,
each predicted from everything before it in the window. A document of any length becomes windows of at
most `context` model inputs, every one of its tokens scored exactly once; its first token is predicted
from a prefix token (the tokenizer's BOS, else EOS), as lm-evaluation-harness does.
"""
from __future__ import annotations

from typing import NamedTuple


class Window(NamedTuple):
    tokens: list[int]
    n_targets: int


def rolling_windows(tokens: list[int], context: int, prefix: int) -> list[Window]:
    """lm-eval's loglikelihood_rolling: disjoint windows of `context` predictions, each starting where the
    previous one stopped; a window reads as much of what precedes its targets as fits (the last one
    reaches back a full context, whatever its number of targets)."""
    sequence = [prefix, *tokens]  # sequence[i + 1] is tokens[i]
    windows, done = [], 0
    while done < len(tokens):
        end = done + min(context, len(tokens) - done)  # this window predicts tokens[done:end]
        windows.append(Window(sequence[max(0, end - context):end + 1], end - done))
        done = end
    return windows


def strided_windows(tokens: list[int], context: int, stride: int, prefix: int) -> list[Window]:
    """The Hugging Face perplexity guide's sliding window over [prefix, *tokens]: windows of `context` tokens
    starting every `stride` tokens, each scoring the tokens the previous window did not reach, so every
    token after the first has at least context - stride tokens before it (stride < context: each token is
    scored once)."""
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, {context}), got {stride}")
    sequence = [prefix, *tokens]
    windows, scored_up_to = [], 1  # sequence[0], the prefix, is never a target
    for begin in range(0, len(sequence), stride):
        end = min(begin + context, len(sequence))
        windows.append(Window(sequence[begin:end], end - scored_up_to))
        scored_up_to = end
        if end == len(sequence):
            break
    return windows


def continuation_window(context_ids: list[int], continuation_ids: list[int], context: int) -> Window:
    """The log-likelihood of a continuation after a context (a multiple-choice answer after its question):
    lm-eval's window, the context cut from the left so that the pair fits."""
    whole = [*context_ids, *continuation_ids][-(context + 1):]
    return Window(whole, len(continuation_ids))
