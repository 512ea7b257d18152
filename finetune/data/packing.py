"""Chat and instruction data (meta.json has a "chat" key): whole examples packed into blocks.

The token files are those of plain text (train.bin / val.bin, the examples one after another) plus one
uint8 per token in train.mask.bin / val.mask.bin (docs/chat.md, "Token files"):
    bit 0 (1)   the token is a training target (labels[t] = input_ids[t]; -100 otherwise)
    bit 1 (2)   the token is the first of an example

Packing. Each example is cut to `block_size` tokens at most (counted as truncated); one with no target
left after that (nothing to predict: the first token of an example is never a target, as nothing before
it is its own) is skipped and counted. The rest are packed into blocks of `block_size` tokens, never split,
by best-fit decreasing: the longest first, each into the fullest block it still fits (ties: the first
such block, then the earlier example), which on conversations of mixed lengths leaves a few percent of
padding where blocks filled in file order leave 10-20 %. The packing is a pure function of the files and
the block size: computed once at start (the same on a resume), in memory linear in the number of
examples (the files are read in chunks), and the sampler shuffles the *blocks* each epoch as it does for
plain text, so resuming stays exact.

An item is one block: `input_ids`, `labels` (-100 outside the targets, on each example's first token
and on the padding) and `position_ids`, which restart at 0 at each example and at the padding that ends
a block. With attention_mask=None, transformers 5 reads the restarts as packed sequences and builds a
block-diagonal causal mask (masking_utils.find_packed_sequence_indices), in eager and sdpa attention
alike, so an example attends only to itself (tests/test_chat_training.py checks its logits are those of
the example alone).
"""
from __future__ import annotations

import functools
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.formats.tokenfiles import MASK_FILES, SPLIT_FILES, DataError

TARGET_BIT = 1
START_BIT = 2
IGNORE_INDEX = -100  # transformers' label that no loss is computed for
CHUNK_TOKENS = 1 << 24  # tokens read at a time while scanning the mask files
log = logging.getLogger("finetune")


@dataclass(frozen=True)
class Packing:
    """Which examples go into which block, as offsets (no token is copied)."""
    block_size: int
    starts: np.ndarray         # int64: the first token of each packed example, block by block
    lengths: np.ndarray        # int64: tokens taken from it (its length, at most block_size)
    block_offsets: np.ndarray  # int64, n_blocks + 1: the examples of block b are [offsets[b], offsets[b + 1])
    examples: int              # examples in the split
    truncated: int             # of them, longer than a block (cut to block_size tokens)
    skipped: int               # of them, with no target left (not packed)
    targets: int               # trained tokens in the packed blocks

    @property
    def num_blocks(self) -> int:
        return len(self.block_offsets) - 1

    @property
    def real_token_share(self) -> float:
        """Share of the blocks' tokens that are example tokens, not padding."""
        return float(self.lengths.sum()) / (self.num_blocks * self.block_size) if self.num_blocks else 0.0

    def describe(self, split: str) -> str:
        return (f"{split}: {self.examples:,} examples in {self.num_blocks:,} packed blocks of {self.block_size} "
                f"tokens ({self.real_token_share:.1%} real tokens, {self.targets:,} trained); "
                f"{self.truncated:,} longer than a block (truncated), {self.skipped:,} with nothing left to "
                f"train (skipped)")


# -----------------------------------------------------------------------------
# Reading the mask file


def mask_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / MASK_FILES[split]


def open_mask(data_dir: str | os.PathLike, split: str, num_tokens: int) -> np.memmap | np.ndarray:
    """The split's mask as a read-only map, checked against the token count (one byte per token)."""
    path = mask_path(data_dir, split)
    hint = f"HINT: run `python prepare_data.py --output-dir {data_dir}` again to recreate the data folder"
    if not path.is_file():
        raise DataError(f"{path} is missing, but meta.json says this is chat (or preference) data, whose mask it holds. {hint}")
    size = path.stat().st_size
    if size != num_tokens:
        raise DataError(f"{path} holds {size} bytes but {SPLIT_FILES[split]} holds {num_tokens} tokens (one mask "
                        f"byte per token; truncated or from another run). {hint}")
    if num_tokens == 0:
        return np.zeros(0, dtype=np.uint8)
    mask = np.memmap(path, dtype=np.uint8, mode="r")
    if not mask[0] & START_BIT:
        raise DataError(f"{path}: the first token does not start an example (bit 1 unset), so the file is not "
                        f"a mask written by prepare_data.py. {hint}")
    return mask


def example_starts(mask) -> np.ndarray:
    """Token index of each example's first token (bit 1), ascending."""
    found = [np.flatnonzero(mask[i:i + CHUNK_TOKENS] & START_BIT) + i for i in range(0, len(mask), CHUNK_TOKENS)]
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def scan_targets(mask, starts: np.ndarray, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the offset of its first target after its first token (int64 max when none), and its
    targets among the `used` tokens kept (the first token never counts: nothing before it is its own)."""
    first = np.full(len(starts), np.iinfo(np.int64).max, dtype=np.int64)
    counts = np.zeros(len(starts), dtype=np.int64)
    for i in range(0, len(mask), CHUNK_TOKENS):
        positions = np.flatnonzero(mask[i:i + CHUNK_TOKENS] & TARGET_BIT) + i
        example = np.searchsorted(starts, positions, side="right") - 1
        offsets = positions - starts[example]
        keep = offsets > 0
        example, offsets = example[keep], offsets[keep]
        # positions ascend, so an example's first entry in this chunk is its smallest offset here
        unique, index = np.unique(example, return_index=True)
        first[unique] = np.minimum(first[unique], offsets[index])
        counts += np.bincount(example[offsets < used[example]], minlength=len(starts))
    return first, counts


# -----------------------------------------------------------------------------
# Packing


def best_fit_decreasing(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Block number of each example: longest first, each into the block with the least room that still
    holds it (a new block when none does). Blocks are numbered as they open."""
    order = np.argsort(-lengths, kind="stable")
    block_of = np.empty(len(lengths), dtype=np.int64)
    # open blocks by their free room: room -> stack of block numbers; `free` has bit r set when some block
    # has room r, so the best fit for length n is the lowest set bit at or above n (Python ints as bitsets).
    by_room: dict[int, deque[int]] = {}
    free, n_blocks = 0, 0
    for example in order.tolist():
        length = int(lengths[example])
        above = free >> length
        if above:
            room = length + (above & -above).bit_length() - 1
            stack = by_room[room]
            block = stack.popleft()
            if not stack:
                free &= ~(1 << room)
                del by_room[room]
        else:
            block, room = n_blocks, block_size
            n_blocks += 1
        block_of[example] = block
        left = room - length
        if left > 0:
            by_room.setdefault(left, deque()).append(block)
            free |= 1 << left
    return block_of


def pack(mask, block_size: int) -> Packing:
    starts = example_starts(mask)
    lengths = np.diff(starts, append=len(mask)).astype(np.int64)
    used = np.minimum(lengths, block_size)
    first_target, targets = scan_targets(mask, starts, used)
    kept = first_target < used
    kept_starts, kept_lengths = starts[kept], used[kept]
    block_of = best_fit_decreasing(kept_lengths, block_size)
    # examples block by block; inside a block in the order they were placed (longest first)
    placed = np.lexsort((np.arange(len(kept_lengths)), -kept_lengths, block_of))
    n_blocks = int(block_of.max()) + 1 if len(block_of) else 0
    offsets = np.zeros(n_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(block_of, minlength=n_blocks), out=offsets[1:])
    packed_starts, packed_lengths = kept_starts[placed], kept_lengths[placed]
    return Packing(block_size=block_size, starts=packed_starts, lengths=packed_lengths, block_offsets=offsets,
                   examples=len(starts), truncated=int((lengths > block_size).sum()), skipped=int((~kept).sum()),
                   targets=int(targets[kept].sum()))


@functools.lru_cache(maxsize=8)
def _cached_packing(path: str, size: int, mtime_ns: int, block_size: int) -> Packing:
    mask = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    return pack(mask, block_size)


def split_packing(data_dir: str | os.PathLike, split: str, block_size: int, meta: dict) -> Packing:
    """The packing of one split, computed once per process (the plan and the loaders both ask for it)."""
    open_mask(data_dir, split, int(meta["splits"][split]["tokens"]))  # the checks
    stat = mask_path(data_dir, split).stat()
    return _cached_packing(str(mask_path(data_dir, split)), stat.st_size, stat.st_mtime_ns, block_size)


def packed_blocks(data_dir: str | os.PathLike, meta: dict, block_size: int, packing_of=None) -> tuple[int, int]:
    """(train, val) packed blocks; logs what the packing did to each split. `packing_of(data_dir, split,
    block_size, meta)` packs a split (chat examples by default; preference pairs: finetune/pairs.py's)."""
    counts = []
    for split in ("train", "val"):
        packing = (packing_of or split_packing)(data_dir, split, block_size, meta)
        log.info("packed %s", packing.describe(split))
        counts.append(packing.num_blocks)
    return counts[0], counts[1]


# -----------------------------------------------------------------------------
# Dataset


class PackedChatDataset(Dataset):
    """Blocks of whole examples: input_ids, labels (-100 where nothing is trained) and position_ids that
    restart at each example. Memmaps are opened lazily (cheap to pickle into DataLoader workers)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, packing: Packing, dtype: str | np.dtype,
                 pad_token_id: int = 0):
        self.tokens_path = str(Path(data_dir) / SPLIT_FILES[split])
        self.mask_path = str(mask_path(data_dir, split))
        self.packing = packing
        self.block_size = packing.block_size
        self.dtype = np.dtype(dtype)
        self.pad_token_id = int(pad_token_id)
        self._maps: tuple[np.memmap, np.memmap] | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike, split: str, block_size: int, meta: dict) -> PackedChatDataset:
        packing = split_packing(data_dir, split, block_size, meta)
        return cls(data_dir, split, packing, meta["dtype"], meta.get("eos_token_id") or 0)

    def __len__(self) -> int:
        return self.packing.num_blocks

    def _map(self) -> tuple[np.memmap, np.memmap]:
        if self._maps is None:
            self._maps = (np.memmap(self.tokens_path, dtype=self.dtype, mode="r"),
                          np.memmap(self.mask_path, dtype=np.uint8, mode="r"))
        return self._maps

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        tokens, mask = self._map()
        input_ids = np.full(self.block_size, self.pad_token_id, dtype=np.int64)
        labels = np.full(self.block_size, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty(self.block_size, dtype=np.int64)
        p = self.packing
        at = 0
        for e in range(p.block_offsets[index], p.block_offsets[index + 1]):
            start, length = int(p.starts[e]), int(p.lengths[e])
            ids = tokens[start:start + length].astype(np.int64)
            input_ids[at:at + length] = ids
            labels[at:at + length] = np.where(mask[start:start + length] & TARGET_BIT, ids, IGNORE_INDEX)
            labels[at] = IGNORE_INDEX  # nothing before an example's first token belongs to it
            position_ids[at:at + length] = np.arange(length)
            at += length
        position_ids[at:] = np.arange(self.block_size - at)  # the padding: a sequence of its own, untrained
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(position_ids)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None  # never pickle the maps themselves
        return state
