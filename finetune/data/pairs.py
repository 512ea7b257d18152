"""Preference data (meta.json has a "preference" key): pairs of completions to one prompt, packed into blocks.

The token files are those of chat data (train.bin / val.bin and one mask byte per token in train.mask.bin /
val.mask.bin); each pair is stored once, as its prompt's ids, then the chosen completion's, then the rejected
one's (docs/preference.md, "Token files"):
    bit 0 (1)   a completion token (chosen or rejected): its log-probability is scored
    bit 1 (2)   the first token of a pair
    bit 2 (4)   a token of the rejected completion

Packing. A pair is trained as two sequences, prompt + chosen and prompt + rejected, which go into one block
side by side (positions restart at each, so each attends only to itself: the machinery of chat packing,
finetune/data/packing.py). A pair longer than a block has its prompt cut from the left (counted as truncated); when
even one prompt token leaves the completions too long, they are cut from the right, and a pair whose two
completions are then the same tokens (nothing left to compare) is skipped and counted. Pairs are packed by
best-fit decreasing, a pure function of the files and the block size (the same on a resume).

An item is one block: `input_ids`, `labels` (-100 outside the completions and on each sequence's first
token), `position_ids`, `slot` (per token: 2k for the chosen completion of the block's k-th pair, 2k + 1 for
its rejected one, -1 elsewhere), `pairs` (the k-th pair's number in the split, -1 for none) and `reference`
(the reference model's log-probabilities of the chosen and rejected completions of each pair, NaN until
they are known).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.formats.tokenfiles import SPLIT_FILES

from .packing import CHUNK_TOKENS, IGNORE_INDEX, TARGET_BIT, best_fit_decreasing, example_starts, mask_path, open_mask

REJECTED_BIT = 4
MIN_PAIR_TOKENS = 2  # one completion token per sequence (a prompt can merge whole into its completions)


def pairs_per_block(block_size: int) -> int:
    """The most pairs a block can hold."""
    return max(1, block_size // MIN_PAIR_TOKENS)


@dataclass(frozen=True)
class PairPacking:
    """Which pairs go into which block, as offsets and kept lengths (no token is copied)."""
    block_size: int
    starts: np.ndarray          # int64: each packed pair's first token in the split's file, block by block
    prompt: np.ndarray          # int64: its prompt's length in the file
    chosen: np.ndarray          # int64: its chosen completion's length in the file
    prompt_kept: np.ndarray     # int64: prompt tokens kept (the last ones)
    chosen_kept: np.ndarray     # int64: chosen tokens kept (the first ones)
    rejected_kept: np.ndarray   # int64: rejected tokens kept (the first ones)
    numbers: np.ndarray         # int64: the pair's number in the split (its order in the file)
    block_offsets: np.ndarray   # int64, n_blocks + 1: the pairs of block b are [offsets[b], offsets[b + 1])
    examples: int               # pairs in the split
    truncated: int              # of them, cut to fit a block
    skipped: int                # of them, with nothing left to compare (not packed)

    @property
    def num_blocks(self) -> int:
        return len(self.block_offsets) - 1

    @property
    def real_token_share(self) -> float:
        used = 2 * self.prompt_kept.sum() + self.chosen_kept.sum() + self.rejected_kept.sum()
        return float(used) / (self.num_blocks * self.block_size) if self.num_blocks else 0.0

    def describe(self, split: str) -> str:
        return (f"{split}: {self.examples:,} pairs in {self.num_blocks:,} packed blocks of {self.block_size} "
                f"tokens ({self.real_token_share:.1%} real tokens); {self.truncated:,} longer than a block "
                f"(prompt cut from the left), {self.skipped:,} with nothing left to compare (skipped)")


def pair_lengths(mask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(starts, prompt, chosen, rejected lengths) of every pair in a mask, read in chunks."""
    starts = example_starts(mask)
    lengths = np.diff(starts, append=len(mask)).astype(np.int64)
    completion = np.zeros(len(starts), dtype=np.int64)
    rejected = np.zeros(len(starts), dtype=np.int64)
    for i in range(0, len(mask), CHUNK_TOKENS):
        chunk = mask[i:i + CHUNK_TOKENS]
        for bits, counts in ((TARGET_BIT, completion), (REJECTED_BIT, rejected)):
            positions = np.flatnonzero(chunk & bits) + i
            counts += np.bincount(np.searchsorted(starts, positions, side="right") - 1, minlength=len(starts))
    return starts, lengths - completion, completion - rejected, rejected


def fit_to_block(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray,
                 block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept lengths: the prompt cut from the left so that both sequences fit one block; when one prompt token
    is still too many, the completions share what is left, each cut from the right."""
    room = (block_size - chosen - rejected) // 2
    prompt_kept = np.minimum(prompt, np.maximum(room, np.minimum(prompt, 1)))
    left = block_size - 2 * prompt_kept
    chosen_kept = np.minimum(chosen, np.maximum(left // 2, left - rejected))
    rejected_kept = np.minimum(rejected, left - chosen_kept)
    return prompt_kept, chosen_kept, rejected_kept


def comparable(tokens, starts, prompt, chosen, rejected, chosen_kept, rejected_kept) -> np.ndarray:
    """Whether each pair still has two different completions with a token to score. Only pairs cut on the
    right are read (the others differ: prepare_data.py refuses a pair whose completions are the same)."""
    ok = (chosen_kept > 0) & (rejected_kept > 0)
    for i in np.flatnonzero(ok & ((chosen_kept < chosen) | (rejected_kept < rejected))).tolist():
        a = starts[i] + prompt[i]
        b = a + chosen[i]
        if chosen_kept[i] == rejected_kept[i] and np.array_equal(tokens[a:a + chosen_kept[i]],
                                                                 tokens[b:b + rejected_kept[i]]):
            ok[i] = False
    return ok


def pack_pairs(tokens, mask, block_size: int) -> PairPacking:
    starts, prompt, chosen, rejected = pair_lengths(mask)
    prompt_kept, chosen_kept, rejected_kept = fit_to_block(prompt, chosen, rejected, block_size)
    truncated = (prompt_kept < prompt) | (chosen_kept < chosen) | (rejected_kept < rejected)
    kept = comparable(tokens, starts, prompt, chosen, rejected, chosen_kept, rejected_kept)
    units = (2 * prompt_kept + chosen_kept + rejected_kept)[kept]
    block_of = best_fit_decreasing(units, block_size)
    placed = np.lexsort((np.arange(len(units)), -units, block_of))
    n_blocks = int(block_of.max()) + 1 if len(block_of) else 0
    offsets = np.zeros(n_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(block_of, minlength=n_blocks), out=offsets[1:])
    numbers = np.flatnonzero(kept)[placed]
    return PairPacking(block_size=block_size, starts=starts[numbers], prompt=prompt[numbers], chosen=chosen[numbers],
                       prompt_kept=prompt_kept[numbers], chosen_kept=chosen_kept[numbers],
                       rejected_kept=rejected_kept[numbers], numbers=numbers.astype(np.int64),
                       block_offsets=offsets, examples=len(starts), truncated=int(truncated.sum()),
                       skipped=int((~kept).sum()))


@functools.lru_cache(maxsize=8)
def _cached_packing(tokens_path: str, dtype: str, path: str, size: int, mtime_ns: int, block_size: int) -> PairPacking:
    if not size:
        return pack_pairs(None, np.zeros(0, dtype=np.uint8), block_size)
    return pack_pairs(np.memmap(tokens_path, dtype=dtype, mode="r"), np.memmap(path, dtype=np.uint8, mode="r"),
                      block_size)


def split_packing(data_dir: str | os.PathLike, split: str, block_size: int, meta: dict) -> PairPacking:
    """The packing of one split's pairs, computed once per process."""
    open_mask(data_dir, split, int(meta["splits"][split]["tokens"]))  # the checks
    stat = mask_path(data_dir, split).stat()
    return _cached_packing(str(Path(data_dir) / SPLIT_FILES[split]), meta["dtype"], str(mask_path(data_dir, split)),
                           stat.st_size, stat.st_mtime_ns, block_size)


class PackedPairDataset(Dataset):
    """Blocks of whole pairs (see the module's docstring for an item). Memmaps are opened lazily (cheap to
    pickle into DataLoader workers); `reference` is set once the reference log-probabilities are known."""

    def __init__(self, data_dir: str | os.PathLike, split: str, packing: PairPacking, dtype: str | np.dtype,
                 pad_token_id: int = 0):
        self.split = split
        self.tokens_path = str(Path(data_dir) / SPLIT_FILES[split])
        self.packing = packing
        self.block_size = packing.block_size
        self.max_pairs = pairs_per_block(packing.block_size)
        self.dtype = np.dtype(dtype)
        self.pad_token_id = int(pad_token_id)
        self.reference: np.ndarray | None = None  # float64 (pairs in the split, 2): chosen, rejected
        self._tokens: np.memmap | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike, split: str, block_size: int, meta: dict) -> PackedPairDataset:
        packing = split_packing(data_dir, split, block_size, meta)
        return cls(data_dir, split, packing, meta["dtype"], meta.get("eos_token_id") or 0)

    def __len__(self) -> int:
        return self.packing.num_blocks

    def _map(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.tokens_path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        tokens, p, size = self._map(), self.packing, self.block_size
        input_ids = np.full(size, self.pad_token_id, dtype=np.int64)
        labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
        slot = np.full(size, -1, dtype=np.int64)
        position_ids = np.empty(size, dtype=np.int64)
        pairs = np.full(self.max_pairs, -1, dtype=np.int64)
        reference = np.full((self.max_pairs, 2), np.nan, dtype=np.float64)
        at = 0
        for k, e in enumerate(range(p.block_offsets[index], p.block_offsets[index + 1])):
            completion_at = int(p.starts[e] + p.prompt[e])
            prompt = tokens[completion_at - int(p.prompt_kept[e]):completion_at].astype(np.int64)
            completions = (tokens[completion_at:completion_at + int(p.chosen_kept[e])],
                           tokens[completion_at + int(p.chosen[e]):
                                  completion_at + int(p.chosen[e]) + int(p.rejected_kept[e])])
            for which, completion in enumerate(completions):
                n_prompt, n = len(prompt), len(prompt) + len(completion)
                input_ids[at:at + n_prompt] = prompt
                input_ids[at + n_prompt:at + n] = completion
                labels[at + n_prompt:at + n] = completion
                slot[at + n_prompt:at + n] = 2 * k + which
                labels[at] = IGNORE_INDEX  # nothing before a sequence's first token belongs to it
                slot[at] = -1
                position_ids[at:at + n] = np.arange(n)
                at += n
            pairs[k] = p.numbers[e]
            if self.reference is not None:
                reference[k] = self.reference[p.numbers[e]]
        position_ids[at:] = np.arange(size - at)  # the padding: a sequence of its own, untrained
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids), "slot": torch.from_numpy(slot),
                "pairs": torch.from_numpy(pairs), "reference": torch.from_numpy(reference)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None  # never pickle the map itself
        return state
