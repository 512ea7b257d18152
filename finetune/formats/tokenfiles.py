"""The token files' description, with no torch: meta.json's format, its writing and its checks, the token dtype, the
tokenizer and data fingerprints, the splits read back. prepare_data.py imports this (a torch import would
cost it seconds of start-up); finetune/data/dataset.py re-exports it next to the PyTorch dataset."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from finetune.core.errors import UserError

META_FORMAT = "finetune-gpt2-tokens"
META_VERSION = 1
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
MASK_FILES = {"train": "train.mask.bin", "val": "val.mask.bin"}  # chat data only (docs/chat.md)


class DataError(UserError):
    """Bad data or a mismatch between data and model: a message for the user, not a bug (one `error:` line,
    exit 2, wherever it is raised)."""


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


def build_meta(tokenizer, *, name_or_path: str, tokenizer_class: str, dtype: np.dtype, max_token_id: int,
               tokens: dict[str, int], chars: dict[str, int], sources: list[dict], split: dict, encoding: str,
               **extra) -> dict:
    """meta.json as prepare_data.py writes it and load_meta reads it: the format, how to read the token
    files, the tokenizer that made them, the splits, where the text came from (`sources`, `split`), then
    `extra` (prepare's "records" or "chat" facts)."""
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "max_token_id": max_token_id,
        "tokenizer": {"name_or_path": name_or_path,
                      "fingerprint": getattr(tokenizer, "fingerprint", None) or tokenizer_fingerprint(tokenizer),
                      "class": tokenizer_class, "add_special_tokens": False},
        "splits": {split_name: {"file": SPLIT_FILES[split_name], "tokens": tokens[split_name],
                                "chars": chars[split_name]} for split_name in ("train", "val")},
        "sources": sources,
        "split": split,
        "encoding": encoding,
        "eos_after_each_source": True,
        "input_formats": sorted({source["format"] for source in sources}),
        **extra,
    }


def write_meta(path: Path, meta: dict) -> None:
    """meta.json's bytes (2-space indent, UTF-8 as is, a final newline), on disk (fsync) before the caller
    renames it into place."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def load_meta(data_dir: str | os.PathLike, model: str | None = None) -> dict:
    """Read meta.json and check it against the .bin files beside it.

    Raises DataError naming the problem and the fix when the folder is not a complete,
    consistent output of prepare_data.py (missing file, truncated file, wrong version).
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    tokenizer = shlex.quote(str(model)) if model else "MODEL"  # the data must be tokenized for the model trained
    hint = (f"HINT: run `python prepare_data.py --input YOUR_TEXT --tokenizer {tokenizer} --output-dir "
            f"{shlex.quote(str(data_dir))}` to (re)create it (--input: text files, folders or record files)")
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


def check_data_matches_model(meta: dict, model_vocab_size: int, tokenizer=None,
                             data_dir: str | os.PathLike | None = None) -> list[str]:
    """Problems (as messages) that make this data unusable with this model/tokenizer. With `data_dir`, the
    token files themselves are read too (largest_token_id): meta.json may under-state their ids."""
    problems = []
    if int(meta["max_token_id"]) >= model_vocab_size:
        problems.append(
            f"the data holds token id {meta['max_token_id']} but the model's vocabulary has only "
            f"{model_vocab_size} entries (HINT: prepare the data with this model's tokenizer)"
        )
    elif data_dir is not None:  # an id beyond the embedding would be an IndexError mid-run
        for filename in SPLIT_FILES.values():
            path = Path(data_dir) / filename
            largest = largest_token_id(path, np.dtype(meta["dtype"]))
            if largest >= model_vocab_size:
                problems.append(
                    f"{path} holds token id {largest} but the model's vocabulary has only {model_vocab_size} "
                    f"entries, though meta.json says the largest id is {meta['max_token_id']} (the files no longer "
                    f"match what prepare_data.py wrote). HINT: prepare the data again with this model's "
                    f"tokenizer: python prepare_data.py --tokenizer MODEL --output-dir {data_dir}")
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


def largest_token_id(path: Path, dtype: np.dtype, chunk_tokens: int = 1 << 24) -> int:
    """The largest id in a token file (-1 when empty), read in chunks of 16M tokens: constant memory."""
    if path.stat().st_size == 0:
        return -1
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return max(int(tokens[i:i + chunk_tokens].max()) for i in range(0, len(tokens), chunk_tokens))


def data_fingerprint(meta: dict, data_dir: str | os.PathLike) -> str:
    """Identifies the exact token files (their bytes, not only meta.json): a resume on other data is refused.

    Reads both .bin files once (sha256 runs at over 1 GB/s), at the start of a run, through files it then
    keeps open (hold_token_file): the run trains on the bytes fingerprinted here, even if prepare_data.py
    replaces the files while the model loads.
    """
    digest = hashlib.sha256()
    key = {
        "tokenizer": meta.get("tokenizer", {}).get("fingerprint"),
        "splits": {k: v.get("tokens") for k, v in meta["splits"].items()},
        "sources": [(s.get("sha256"), s.get("bytes")) for s in meta.get("sources", [])],
        "split_policy": meta.get("split"),
    }
    digest.update(json.dumps(key, sort_keys=True).encode())
    masks = list(MASK_FILES.values()) if isinstance(meta.get("chat"), dict) else []
    for filename in [*SPLIT_FILES.values(), *masks]:
        held = hold_token_file(Path(data_dir) / filename)
        held.file.seek(0)
        while chunk := held.file.read(1 << 24):
            digest.update(chunk)
        held.check_unchanged("while it was fingerprinted")
    return digest.hexdigest()[:16]


def read_split(data_dir: str | os.PathLike, meta: dict, split: str) -> np.ndarray:
    """One split's token ids, memory-mapped (an empty file reads as no ids)."""
    path = Path(data_dir) / meta["splits"][split]["file"]
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def reassemble(data_dir: str | os.PathLike) -> np.ndarray:
    """The inverse of prepare_data.py's split: the token stream of the inputs, validation ranges put back
    where meta.json says they came from (train alone when the validation text came from --val-input)."""
    meta = load_meta(data_dir)
    train, val = read_split(data_dir, meta, "train"), read_split(data_dir, meta, "val")
    parts, t = [], 0
    for r in meta["split"].get("val_ranges", []):
        parts += [train[t:r["train_tokens_before"]], val[r["val_token_start"]:r["val_token_start"] + r["tokens"]]]
        t = r["train_tokens_before"]
    parts.append(train[t:])
    return np.concatenate(parts)


# -----------------------------------------------------------------------------
# Token files held open from the fingerprint to the end of the run


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: the inode (a replaced file) and its size and
    modification time (a file rewritten in place)."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class HeldTokenFile:
    """A token file opened once, at its fingerprint; the datasets map this open file, not the path, so a
    file replaced under the run (prepare_data.py --overwrite renames new files into place) does not change
    what it trains on. A file rewritten in place is noticed by check_unchanged()."""
    path: Path
    file: BinaryIO
    identity: tuple[int, int, int, int]  # file_identity() when it was opened

    def check_unchanged(self, since: str = "since this run fingerprinted it") -> None:
        if file_identity(os.fstat(self.file.fileno())) != self.identity:
            raise DataError(f"{self.path} was rewritten {since}, so the run would train on other data than it "
                            f"recorded. HINT: let prepare_data.py finish before starting the run, or prepare "
                            f"into another --output-dir, then start the run again")


_HELD: dict[str, HeldTokenFile] = {}  # resolved path -> the file this process fingerprinted


def hold_token_file(path: Path) -> HeldTokenFile:
    """Open `path` (once per process and version: a file replaced since is opened anew) and keep it open."""
    key = str(Path(path).resolve())
    held = _HELD.get(key)
    if held is None or held_file_replaced(held):
        file = open(key, "rb")  # noqa: SIM115  (held for the life of the process)
        held = _HELD[key] = HeldTokenFile(Path(path), file, file_identity(os.fstat(file.fileno())))
    return held


def held_file_replaced(held: HeldTokenFile) -> bool:
    try:
        return file_identity(os.stat(held.path)) != held.identity
    except OSError:
        return True


def held_token_file(path: str | os.PathLike) -> HeldTokenFile | None:
    """The file data_fingerprint() held for `path`, or None if this process did not fingerprint it."""
    return _HELD.get(str(Path(path).resolve()))
