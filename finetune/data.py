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

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

META_FORMAT = "finetune-gpt2-tokens"
META_VERSION = 1
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}


class DataError(Exception):
    """Bad data or a mismatch between data and model: a message for the user, not a bug."""


# -----------------------------------------------------------------------------
# meta.json


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id, added tokens included).

    Two tokenizers with equal fingerprints map text to the same ids for every token they
    share, which is what training data produced by one and read by the other relies on.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def token_dtype(max_token_id: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50k vocabulary), else uint32 (Llama-3, Qwen...)."""
    return np.dtype(np.uint16) if max_token_id < 2**16 else np.dtype(np.uint32)


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read meta.json and check it against the .bin files beside it.

    Raises DataError naming the problem and the fix when the folder is not a complete,
    consistent output of prepare_data.py (missing file, truncated file, wrong version).
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    hint = f"HINT: run `python prepare_data.py --output-dir {data_dir}` to (re)create it"
    if data_dir.exists() and not data_dir.is_dir():
        is_ours = data_dir.name in ("meta.json", *SPLIT_FILES.values())
        raise DataError(f"data directory {data_dir} is a file, not a folder. HINT: pass the folder prepare_data.py "
                        f"wrote (train.bin, val.bin and meta.json)" + (f": {data_dir.parent}" if is_ours else ""))
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist. {hint}")
    if not meta_path.is_file():
        raise DataError(f"{meta_path} is missing, so {data_dir} is not a prepared data directory. {hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path} is not readable JSON ({exc}). {hint}") from None
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise DataError(
            f"{meta_path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this version reads {META_FORMAT!r} version {META_VERSION}. {hint}"
        )
    try:
        dtype = np.dtype(meta["dtype"])
        splits = meta["splits"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{meta_path} lacks field {exc}. {hint}") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"{meta_path} names dtype {dtype}, expected uint16 or uint32. {hint}")
    if token_dtype(int(meta["max_token_id"])) != dtype:
        raise DataError(f"{meta_path}: dtype {dtype} does not match max_token_id {meta['max_token_id']}. {hint}")
    for split, filename in SPLIT_FILES.items():
        path = data_dir / filename
        expected = int(splits[split]["tokens"]) * dtype.itemsize
        if not path.is_file():
            raise DataError(f"{path} is missing. {hint}")
        actual = path.stat().st_size
        if actual != expected:
            raise DataError(
                f"{path} holds {actual} bytes but meta.json says {splits[split]['tokens']} tokens "
                f"of {dtype} = {expected} bytes (truncated or from another run). {hint}"
            )
    return meta


def check_data_matches_model(meta: dict, model_vocab_size: int, tokenizer=None) -> list[str]:
    """Problems (as messages) that make this data unusable with this model/tokenizer."""
    problems = []
    if int(meta["max_token_id"]) >= model_vocab_size:
        problems.append(
            f"the data holds token id {meta['max_token_id']} but the model's vocabulary has only "
            f"{model_vocab_size} entries (HINT: prepare the data with this model's tokenizer)"
        )
    if tokenizer is not None:
        fingerprint = tokenizer_fingerprint(tokenizer)
        recorded = meta.get("tokenizer", {}).get("fingerprint")
        if recorded != fingerprint:
            name = meta.get("tokenizer", {}).get("name_or_path")
            problems.append(
                f"the data was tokenized with {name!r} (fingerprint {recorded}) but the model's tokenizer "
                f"has fingerprint {fingerprint} (HINT: rerun prepare_data.py with --tokenizer set to the model)"
            )
    return problems


def data_fingerprint(meta: dict, data_dir: str | os.PathLike) -> str:
    """Identifies the exact token files (their bytes, not only meta.json): a resume on other data is refused.

    Reads both .bin files once (sha256 runs at over 1 GB/s), at the start of a run.
    """
    digest = hashlib.sha256()
    key = {
        "tokenizer": meta.get("tokenizer", {}).get("fingerprint"),
        "splits": {k: v.get("tokens") for k, v in meta["splits"].items()},
        "sources": [(s.get("sha256"), s.get("bytes")) for s in meta.get("sources", [])],
        "split_policy": meta.get("split"),
    }
    digest.update(json.dumps(key, sort_keys=True).encode())
    for filename in SPLIT_FILES.values():
        with open(Path(data_dir) / filename, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# Dataset


class TextDataset(Dataset):
    """Non-overlapping blocks of `block_size` tokens from one .bin file.

    The memmap is opened lazily on first access, so the dataset pickles cheaply and each
    DataLoader worker process opens its own map.
    """

    def __init__(self, path: str | os.PathLike, block_size: int, dtype: str | np.dtype = "uint16"):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.path = str(path)
        self.block_size = int(block_size)
        self.dtype = np.dtype(dtype)
        self.num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        self._tokens: np.memmap | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike, split: str, block_size: int,
                      meta: dict | None = None) -> "TextDataset":
        meta = meta if meta is not None else load_meta(data_dir)
        return cls(Path(data_dir) / SPLIT_FILES[split], block_size, meta["dtype"])

    def __len__(self) -> int:
        return self.num_tokens // self.block_size

    def _map(self) -> np.memmap:
        if self._tokens is None:
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


def validation_blocks(num_blocks: int, max_batches: int | None, batch_size: int,
                      rank: int = 0, world_size: int = 1) -> list[int]:
    """Deterministic, non-overlapping validation blocks for this rank (all of them by default).

    With `max_batches`, max_batches x batch_size x world_size blocks spread evenly over the split are
    used, so a partial pass covers the whole validation text and is the same subset at every evaluation.
    """
    limit = num_blocks if max_batches is None else min(num_blocks, max_batches * batch_size * world_size)
    chosen = range(num_blocks) if limit == num_blocks else [i * num_blocks // limit for i in range(limit)]
    return list(chosen[rank::world_size])
