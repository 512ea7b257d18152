"""Token files written by prepare_data.py, served to PyTorch.

Layout of a data directory (see prepare_data.py):
    train.bin, val.bin   raw little-endian token ids, no header (nanoGPT-compatible)
    meta.json            dtype, vocabulary, token counts, sources, split policy

Shift convention: an item is one block of `block_size` consecutive tokens, returned as
`input_ids` and `labels` that are the *same* tensor. Hugging Face causal-LM heads shift the
labels internally (position t predicts token t+1), so each block trains on block_size - 1
next-token predictions. Blocks never overlap; a trailing remainder shorter than a block is
not used.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from finetune.formats.tokenfiles import (  # noqa: F401  (re-exported: the names users import from here)
    META_FORMAT,
    META_VERSION,
    SPLIT_FILES,
    DataError,
    check_data_matches_model,
    data_fingerprint,
    file_identity,
    held_file_replaced,
    held_token_file,
    load_meta,
    token_dtype,
    tokenizer_fingerprint,
)

log = logging.getLogger("finetune")

# -----------------------------------------------------------------------------
# Dataset


__all__ = ["META_FORMAT", "META_VERSION", "SPLIT_FILES", "DataError", "check_data_matches_model", "data_fingerprint",
           "load_meta", "token_dtype", "tokenizer_fingerprint", "TextDataset", "EpochShuffleSampler",
           "validation_blocks"]


class TextDataset(Dataset):
    """Non-overlapping blocks of `block_size` tokens from one .bin file.

    A file this process fingerprinted (data_fingerprint) is mapped from the file held open since, in this
    process, so DataLoader workers (forked) share that map: the run trains on the bytes it fingerprinted
    even if the path was replaced since. Otherwise the memmap is opened lazily on first access; the
    dataset pickles cheaply and a spawned worker maps the path, after checking it is still that file.
    """

    def __init__(self, path: str | os.PathLike, block_size: int, dtype: str | np.dtype = "uint16"):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.path = str(path)
        self.block_size = int(block_size)
        self.dtype = np.dtype(dtype)
        self._tokens: np.memmap | None = None
        held = held_token_file(self.path)
        self.identity = held.identity if held else None  # the version of the file this dataset reads
        if held is None:
            self.num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
            return
        held.check_unchanged()  # rewritten in place since the fingerprint: stop, naming it
        if held_file_replaced(held):
            log.warning("%s was replaced since this run fingerprinted it; the run goes on with the file as it "
                        "was then (held open), which is what its checkpoints record", self.path)
        self.num_tokens = held.identity[2] // self.dtype.itemsize
        if self.num_tokens:
            self._tokens = np.memmap(held.file, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike, split: str, block_size: int,
                      meta: dict | None = None) -> TextDataset:
        meta = meta if meta is not None else load_meta(data_dir)
        return cls(Path(data_dir) / SPLIT_FILES[split], block_size, meta["dtype"])

    def __len__(self) -> int:
        return self.num_tokens // self.block_size

    def _map(self) -> np.memmap:
        if self._tokens is None:
            if self.identity is not None and file_identity(os.stat(self.path)) != self.identity:
                raise DataError(f"{self.path} changed since this run fingerprinted it. HINT: let prepare_data.py "
                                f"finish before starting the run, then start it again")
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        block = torch.from_numpy(self._map()[start : start + self.block_size].astype(np.int64))
        return {"input_ids": block, "labels": block}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = None  # never pickle the map itself
        return state


# -----------------------------------------------------------------------------
# Sampling order


class EpochShuffleSampler(Sampler[int]):
    """Each epoch visits every block once, in an order fixed by (seed, epoch).

    - `set_epoch(e)` picks the epoch's permutation.
    - `set_start(k)` skips the first k samples *of this rank's share*, so a resumed run
      continues exactly where it stopped inside an epoch.
    - With `num_replicas > 1`, rank r takes positions r, r + R, r + 2R, ... of the
      permutation; the permutation is cut to a multiple of R so every rank gets the same
      number of samples (at most R - 1 blocks per epoch are skipped).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, num_replicas: int = 1):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def samples_per_replica(self) -> int:
        return self.num_samples // self.num_replicas

    def epoch_order(self) -> list[int]:
        """This rank's full order for the current epoch (ignoring the start offset)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        usable = self.samples_per_replica() * self.num_replicas
        return order[:usable][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.samples_per_replica() - self.start)


def validation_blocks(num_blocks: int, num_chosen: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's share of `num_chosen` validation blocks spread evenly over the split (all of them when
    num_chosen >= num_blocks): the same blocks at every evaluation, and whatever the number of processes,
    the ranks taking turns (their shares differ by at most one block)."""
    limit = min(num_blocks, num_chosen)
    chosen = range(num_blocks) if limit == num_blocks else [i * num_blocks // limit for i in range(limit)]
    return list(chosen[rank::world_size])
