"""Tokenize text files or records into train.bin / val.bin / meta.json for fine-tuning.

    python prepare_data.py --input book.txt --tokenizer gpt2
    python prepare_data.py --input corpus/ --val-input held_out.txt --output-dir data/corpus
    python prepare_data.py --input chats.jsonl export.csv --text-field body
    python prepare_data.py --sample-book            # writes book.txt (Python's docs) for a first run

Output (nanoGPT-compatible): train.bin and val.bin hold raw little-endian token ids with
no header (uint16 when the vocabulary fits, else uint32); meta.json says how to read them
and where they came from (see dataset.load_meta). An end-of-text token follows each input file.

How it works, in the order the code runs:
- The text is streamed: read in 1 MB blocks, decoded incrementally, cut into pieces
  (~1M characters; 64K for the Hugging Face engine) *only where a cut cannot change the
  tokens* (see "Safe cuts"), tokenized by a pool of threads and written in order. Memory
  does not grow with the input; only a stretch with no whitespace and no change between
  letters, digits and other characters (one letter repeated) is held whole.
- Validation is not the head or the tail of the text: the byte stream of all inputs is
  divided into k equal slots (k = validation bytes / 4 MB, between 1 and 64) and each
  slot gives one contiguous validation range at a
  seeded random place inside it (never touching the start of the first slot or the end of
  the last). Range edges move forward to the next safe cut. meta.json records where each
  range sits, in bytes and in tokens, so train + val can be put back together.
- Record files (.jsonl, .json, .csv/.tsv, .parquet; finetune/records.py reads them as a
  stream) give one document per record with text in --text-field, an end-of-text token after
  each; the split takes whole records (see "Record inputs").
- Token ids equal `AutoTokenizer.from_pretrained(name)(text, add_special_tokens=False)`
  for each whole file, and for each record. GPT-2-style byte-level BPE tokenizers take a fast path through
  tiktoken (same vocabulary and merges, same regex), checked against the Hugging Face
  tokenizer before the run and on samples during it; any other tokenizer uses the
  Hugging Face `tokenizers` library. A tokenizer that an earlier run found to be exactly
  its tokenizer.json is loaded without transformers (finetune.models.remember_tokenizer,
  load_recorded_tokenizer), which saves seconds of start-up.
- Outputs are written under hidden temporary names and renamed at the very end, meta.json
  last, so an interrupted run never leaves a train.bin that looks valid. The run holds a lock
  on --output-dir (a second run into it is refused); a full disk is one error line, exit 4.
"""
from __future__ import annotations

import argparse
import bisect
import codecs
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import random
import re
import signal
import stat
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import (
    ArgumentParser,
    SaveFailed,
    UserError,
    exit_on_user_error,
    raise_if_problems,
    raise_if_write_failure,
)
from finetune.fsio import fsync_dir, locked_folder
from finetune.records import RECORD_FORMATS, RecordStats, check_record_file, is_utf8, read_records, record_format

# Which files a directory contributes (hidden files and folders are skipped): text, and records.
TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".rst", ".text")
RECORD_EXTENSIONS = tuple(RECORD_FORMATS)
OUTPUT_FILES = ("train.bin", "val.bin", "meta.json")

BLOCK_BYTES = 1 << 20         # read size
CHUNK_CHARS = 1 << 20         # target size of one tokenized piece (the tiktoken engine)
VAL_RANGE_BYTES = 4 << 20     # aim for validation ranges of about this size (at most MAX_VAL_RANGES)
MAX_VAL_RANGES = 64
RECORD_VAL_RANGE_BYTES = 16 << 10  # with records: smaller ranges, so whole records are drawn from all over
MAX_RECORD_VAL_RANGES = 1024
SAMPLE_BOOK = "book.txt"
VERIFY_WINDOW = 512           # characters each side of a cut checked for tokenizers without a proof
SAMPLE_BYTES = 16 << 10       # input sample the fast path is checked on before the run
CHECK_EVERY = 8               # during the run, check every 8th piece's start against Hugging Face
CHECK_CHARS = 16 << 10

# GPT-2's pre-tokenizer regex, as used by the Hugging Face ByteLevel pre-tokenizer.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# -----------------------------------------------------------------------------
# Command line


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Tokenize text or records into train.bin / val.bin / meta.json for fine-tuning "
                    "(raw little-endian token ids, nanoGPT-compatible; an end-of-text token after each file "
                    "and each record).",
        epilog="example: python prepare_data.py --input books/ --tokenizer gpt2 --output-dir data",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", default=[SAMPLE_BOOK], metavar="PATH",
                    help=f"text files ({'/'.join(TEXT_EXTENSIONS)}), record files ({'/'.join(RECORD_EXTENSIONS)}: "
                         "one document per record) or folders of them, mixed freely; a folder gives those files, "
                         "recursively, sorted by path, hidden files and folders skipped (default: book.txt)")
    io.add_argument("--text-field", default="text", metavar="NAME",
                    help="the field (JSON) or column (CSV/TSV/Parquet) that holds each record's text "
                         "(default: %(default)s)")
    io.add_argument("--output-dir", default="data", metavar="DIR",
                    help="where train.bin, val.bin and meta.json go (default: %(default)s)")
    io.add_argument("--encoding", default="utf-8", help="text encoding of the input files (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs in --output-dir")
    io.add_argument("--sample-book", nargs="?", const=SAMPLE_BOOK, default=None, metavar="PATH",
                    help="write a sample text to PATH (default: book.txt) and stop: the Python documentation "
                         "bundled with CPython (pydoc_data, ~470 kB), for a first run without a book of your own")

    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default="gpt2", metavar="NAME_OR_PATH",
                     help="Hugging Face model name or local folder holding the tokenizer (default: %(default)s)")
    tok.add_argument("--engine", choices=("auto", "tiktoken", "hf"), default="auto",
                     help="auto: the tiktoken fast path for GPT-2-style byte-level BPE when it checks out, else "
                          "Hugging Face tokenizers; the token ids are the same either way (default: %(default)s)")

    split = parser.add_argument_group("validation split")
    split.add_argument("--val-fraction", type=float, default=None, metavar="F",
                       help="share of the text held out for validation, taken from inside the text, "
                            "never its head or tail (default: 0.1)")
    split.add_argument("--val-input", nargs="+", default=None, metavar="PATH",
                       help="separate validation text (files or folders) instead of a split of --input")
    split.add_argument("--seed", type=int, default=1337, metavar="N",
                       help="chooses where the validation ranges sit (default: %(default)s)")

    train = parser.add_argument_group("training settings, for the size check and the summary only")
    train.add_argument("--block-size", type=int, default=1024, metavar="N",
                       help="tokens per training block; each split must hold one (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=8, metavar="N",
                       help="blocks per micro-batch (default: %(default)s)")
    train.add_argument("--grad-accum", type=int, default=1, metavar="N",
                       help="micro-batches per optimizer step (default: %(default)s)")

    perf = parser.add_argument_group("performance")
    perf.add_argument("--num-workers", type=int, default=default_workers(), metavar="N",
                      help="tokenizer threads (default: the CPUs available, at most 8; here %(default)s)")
    return parser.parse_args(argv)


def check_args(args) -> None:
    """Every problem with the flags, in one error."""
    problems = []
    if args.val_input and args.val_fraction is not None:
        problems.append("--val-fraction and --val-input exclude each other. HINT: give --val-input for a "
                        "separate validation text, or --val-fraction to split --input")
    if args.val_fraction is None:
        args.val_fraction = 0.1
    if not 0.0 < args.val_fraction < 1.0:
        problems.append(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}. "
                        "HINT: e.g. --val-fraction 0.1 holds out 10% of the text")
    for flag, value, low in (("--block-size", args.block_size, 2), ("--batch-size", args.batch_size, 1),
                             ("--grad-accum", args.grad_accum, 1), ("--num-workers", args.num_workers, 1)):
        if value < low:
            problems.append(f"{flag} must be at least {low}, got {value}. HINT: pass {flag} {low} or more")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        problems.append(f"unknown --encoding {args.encoding!r}. HINT: e.g. utf-8, utf-8-sig, latin-1, cp1252")
    if not args.text_field:
        problems.append("--text-field is empty. HINT: name the field or column that holds the text, e.g. text")
    raise_if_problems(problems, "the flags")


# -----------------------------------------------------------------------------
# Input files and the output folder


def find_text_files(paths: list[str], flag: str, problems: list[str]) -> list[Path]:
    """Files named directly, plus the text and record files found (recursively, sorted) in named folders.

    A folder contributes regular files only: a link to a device or a FIFO would be read forever, so
    such entries are skipped and named in a note (as is a meta.json of ours, beside its train.bin).
    Problems are added to `problems`.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            skipped: list[str] = []
            found = sorted(_walk_text_files(path, skipped), key=lambda p: p.relative_to(path).as_posix())
            if skipped:
                shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
                print(f"note: {flag} folder {path}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'}"
                      f" that are not regular text or record files: {shown}", file=sys.stderr)
            if not found:
                problems.append(
                    f"{flag} folder {path} holds no text files ({', '.join(TEXT_EXTENSIONS)}) or record files "
                    f"({', '.join(RECORD_EXTENSIONS)}); hidden files are skipped. HINT: name the files directly "
                    "or give them one of those extensions")
            files.extend(found)
        elif path.exists():
            problems.append(f"{flag} {path} is not a regular file or folder. HINT: give text files or folders")
        else:
            sample = (f"; or write a sample text there with `python prepare_data.py --sample-book {path}`"
                      if path.name == SAMPLE_BOOK else "")
            problems.append(f"{flag} {path} does not exist. "
                            f"HINT: check the path (relative paths start at {Path.cwd()}){sample}")
    unique, seen = [], set()
    for path in files:  # the same file twice (named and inside a folder) would be counted twice
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _walk_text_files(folder: Path, skipped: list[str]) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        for d in sorted(dirs):
            if not d.startswith(".") and os.path.islink(os.path.join(root, d)):
                skipped.append(f"{Path(root, d)} (a link to a folder, not followed)")
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(TEXT_EXTENSIONS + RECORD_EXTENSIONS):
                continue
            path = Path(root) / name
            why = not_regular(path) or ("an output of prepare_data.py" if name == "meta.json" and
                                        (path.parent / "train.bin").is_file() else "")
            if why:
                skipped.append(f"{path} ({why})")
            else:
                yield path


def not_regular(path: Path) -> str:
    """Why `path` (after links) is not a regular file; "" when it is."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return "a broken link" if path.is_symlink() else exc.strerror
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    kind = next((what for test, what in kinds if test(mode)), "not a regular file")
    return f"{'a link to ' + kind if path.is_symlink() else kind}, not a regular file"


def check_has_text(files: list[Path], encoding: str, flag: str) -> str | None:
    """Empty or whitespace-only text input, as a problem (reads only up to the first visible character)."""
    for path in files:
        decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        with open(path, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                if decoder.decode(block).strip().lstrip("\ufeff"):  # a byte-order mark alone is no text
                    return None
    what = "empty" if all(p.stat().st_size == 0 for p in files) else "whitespace only"
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    return (f"{flag} is {what} ({names}): there is no text to train on. "
            "HINT: check that the path points at your text")


def output_dir_problems(out: Path, overwrite: bool) -> list[str]:
    if out.exists() and not out.is_dir():
        return [f"--output-dir {out} is a file, not a folder. HINT: choose another --output-dir"]
    problems = []
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not overwrite:
        problems.append(f"{out} already holds {', '.join(existing)}. "
                        "HINT: pass --overwrite to replace them, or choose another --output-dir")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        problems.append(f"--output-dir {out} is not writable. HINT: choose a folder you can write to")
    return problems


def make_output_dir(out: Path) -> list[Path]:
    """Create the output folder; return the folders created, so a failed run can remove them."""
    created = [p for p in [out, *out.parents] if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output-dir {out} ({exc.strerror}). "
                        "HINT: choose a folder you can write to") from None
    return created


@contextlib.contextmanager
def claimed_output_dir(out: Path, overwrite: bool):
    """Create --output-dir and lock it for this run (a second run into it is refused with our PID).

    Under the lock: the outputs check again (another run may have finished since the first check) and
    the temporary files of a killed run go. On the way out, whatever happened, the lock file goes, and
    so do the folders this run created if they are still empty.
    """
    created = make_output_dir(out)
    try:
        with locked_folder(out, "prepare_data.py", remove_at_exit=True):
            raise_if_problems(output_dir_problems(out, overwrite))
            for name in OUTPUT_FILES:
                for leftover in out.glob(f".{name}.tmp-*"):
                    leftover.unlink(missing_ok=True)
            yield
    finally:
        for folder in reversed(created):  # leave no empty folders behind either
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


# -----------------------------------------------------------------------------
# Tokenizer loading


def load_tokenizer(name_or_path: str):
    """AutoTokenizer from a local folder, the Hugging Face cache, or (when reachable) the hub; or, when
    this tokenizer was checked and recorded by an earlier run, the same tokenizer without transformers
    (finetune.models.load_recorded_tokenizer: ~0.15 s instead of ~3 s of start-up)."""
    from finetune.models import load_recorded_tokenizer, remember_tokenizer
    from finetune.models import load_tokenizer as load

    tokenizer = load_recorded_tokenizer(name_or_path)
    if tokenizer is None:
        tokenizer = load(name_or_path, flag="--tokenizer")  # heavy (imports transformers)
        with quiet_transformers():
            remember_tokenizer(name_or_path, tokenizer, probe_text() + added_tokens_text(tokenizer))
    return tokenizer


def tokenizer_class(tokenizer) -> str:
    return getattr(tokenizer, "class_name", type(tokenizer).__name__)  # a RecordedTokenizer says whose


def added_tokens_text(tokenizer) -> str:
    return " ".join(tokenizer.get_added_vocab())


@contextmanager
def quiet_transformers():
    """Silence "sequence longer than the model's maximum" while we only tokenize (no-op without transformers)."""
    if "transformers" not in sys.modules:
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def tokenizer_spec(tokenizer) -> dict | None:
    """The tokenizer.json of a Rust-backed tokenizer, or None (slow, Python-only tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def byte_level_regex_reason(spec: dict | None) -> str:
    """Why the GPT-2 cut rule is *not* proven for this tokenizer ("" when it is).

    The proof (see "Safe cuts") needs: no normalizer, the ByteLevel pre-tokenizer with GPT-2's
    regex and no added prefix space, and added tokens that contain no whitespace and do not
    strip the whitespace around them. The model (BPE or other) then sees each pre-token alone.
    """
    if spec is None:
        return "it has no Rust backend"
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return "its pre-tokenizer is not GPT-2's byte-level regex"
    for added in spec.get("added_tokens", []):
        content = added.get("content", "")
        if not content or any(ch.isspace() for ch in content) or added.get("lstrip") or added.get("rstrip") \
                or added.get("single_word"):
            return f"its added token {content!r} holds or strips whitespace"
    return ""


# -----------------------------------------------------------------------------
# Tokenizing engines: Hugging Face tokenizers, and the tiktoken fast path


class EngineMismatch(Exception):
    """The fast path disagreed with Hugging Face on a sample: the run restarts with --engine hf."""

    def __init__(self, message: str, source: int):
        super().__init__(message)
        self.source = source


class HFEngine:
    name = "hf"
    piece_chars = 64 << 10  # a Hugging Face Encoding costs ~70 bytes per token: keep pieces small

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode(self, text: str) -> np.ndarray:
        if self.backend is not None:
            # encode_batch releases the GIL (encode does not), so worker threads run in parallel
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.uint32)

    def encode_piece(self, piece: Piece) -> np.ndarray:
        return self.encode(piece.text)


class TiktokenEngine:
    """GPT-2-style byte-level BPE through tiktoken: the same merges, expressed as byte ranks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank; with rank =
    position of the merge rule that creates the token, that is the order Hugging Face's BPE
    applies its merges in. Ranks are mapped back to the tokenizer's ids at the end.
    """

    name = "tiktoken"
    piece_chars = CHUNK_CHARS

    def __init__(self, spec: dict, reference: HFEngine):
        import tiktoken

        self.reference = reference
        ranks, rank_to_id = byte_level_ranks(spec["model"])
        special = {added["content"]: added["id"] for added in spec.get("added_tokens", [])}
        special_ranks = {content: len(ranks) + i for i, content in enumerate(special)}
        rank_to_id.extend(special.values())
        self.encoding = tiktoken.Encoding("hf-byte-level-bpe", pat_str=GPT2_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=special_ranks)
        table = np.asarray(rank_to_id, dtype=np.uint32)
        self.rank_to_id = None if np.array_equal(table, np.arange(len(table))) else table  # GPT-2: identity

    def encode(self, text: str) -> np.ndarray:
        ranks = self.encoding.encode_to_numpy(text, allowed_special="all")  # releases the GIL
        return ranks if self.rank_to_id is None else self.rank_to_id[ranks]

    def encode_piece(self, piece: Piece) -> np.ndarray:
        ids = self.encode(piece.text)
        if piece.index % CHECK_EVERY == 0:  # cheap insurance: compare a sample with Hugging Face
            sample = piece.text[:CHECK_CHARS]
            if not np.array_equal(self.encode(sample), self.reference.encode(sample)):
                raise EngineMismatch("tiktoken and Hugging Face disagreed on a sample", piece.source)
        return ids


def byte_level_ranks(model: dict) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken's mergeable_ranks for a byte-level BPE model, and the rank -> id table."""
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("not a plain BPE model")
    vocab = model["vocab"]
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    rank_to_id: list[int] = []
    missing = [b for b, ch in bytes_to_unicode().items() if ch not in vocab]
    if missing:
        raise ValueError(f"byte {missing[0]} has no token")
    # Single bytes are never compared by rank, so rank them in id order (GPT-2: rank == id).
    for b, ch in sorted(bytes_to_unicode().items(), key=lambda item: vocab[item[1]]):
        ranks[bytes([b])] = len(rank_to_id)
        rank_to_id.append(vocab[ch])
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = left + right
        raw = bytes(byte_of[ch] for ch in token)
        if token not in vocab or raw in ranks:
            raise ValueError(f"merge {left!r} + {right!r} is not tiktoken-compatible")
        ranks[raw] = len(rank_to_id)
        rank_to_id.append(vocab[token])
    return ranks, rank_to_id


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def probe_text(seed: int = 0) -> str:
    """Text that exercises the corners where two implementations of the same tokenizer could differ."""
    rng = random.Random(seed)
    spaces = ("\t\n\v\f\r \x1c\x1d\x1e\x1f\x85\xa0\u1680\u180e\u2000\u2007\u200a\u200b"
              "\u2028\u2029\u202f\u205f\u3000\ufeff")
    parts = [
        "Hello world! It's, don't, I'll, we've, they're, she'd, I'm 'tis 'S 'LL 'Re\n",
        "  two  spaces   three\t\ttabs \n\n\n\r\n\r\n trailing   \n \n\t\n",
        "naïve café Übermut 東京 こんにちは 한국어 Ελληνικά русский\n",
        "עברית العربية हिन्दी 🙂🚀 👩‍👩‍👧 e\u0301\n",
        "12345 3.14159 1,000,000 ²³ ½ Ⅻ ٣٤ ① 0x1F 1e-5 $9.99 100% #tag @user http://x.y/z?a=1&b=2\n",
        "<|endoftext|> <s></s> [CLS] ```code``` --- *** ... !!! ??? ''' \"\"\" ((( ))) ~~~\n",
    ]
    parts += [f"a{c}b {c}x {c}{c} 1{c}2 '{c} \n{c}\t" for c in spaces]
    for _ in range(2000):  # random code points in typical contexts
        c = chr(rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x30000)]))
        if not 0xD800 <= ord(c) < 0xE000:
            parts.append(rng.choice([f"{c}", f" {c}", f"x{c}", f"{c}{c} ", f"'{c}", f"\n{c}", f"9{c}"]))
    return "".join(parts)


def choose_engine(tokenizer, spec: dict | None, requested: str, sample: str):
    """The engine to tokenize with, and a note saying why."""
    hf = HFEngine(tokenizer)
    if requested == "hf":
        return hf, "Hugging Face tokenizers (--engine hf)"
    engine, reason = tiktoken_engine(tokenizer, spec, hf, sample)
    if engine is not None:
        return engine, "tiktoken fast path (GPT-2-style byte-level BPE, checked against Hugging Face)"
    if requested == "tiktoken":
        raise UserError(f"--engine tiktoken cannot be used with {tokenizer.name_or_path}: {reason}. "
                        "HINT: use --engine auto or hf")
    return hf, f"Hugging Face tokenizers ({reason})"


def tiktoken_engine(tokenizer, spec: dict | None, hf: HFEngine, sample: str):
    """A TiktokenEngine that matches AutoTokenizer on the probe text and `sample`, or None and why not."""
    reason = byte_level_regex_reason(spec)
    if reason:
        return None, reason
    if importlib.util.find_spec("tiktoken") is None:
        return None, "tiktoken is not installed; pip install tiktoken for a ~10x faster run"
    try:
        engine = TiktokenEngine(spec, hf)
    except ValueError as exc:
        return None, f"its BPE cannot be expressed in tiktoken: {exc}"
    specials = " ".join(added["content"] for added in spec.get("added_tokens", []))
    text = probe_text() + specials + sample
    with quiet_transformers():
        reference = tokenizer(text, add_special_tokens=False)["input_ids"]  # AutoTokenizer (or its record) judges
    if not np.array_equal(engine.encode(text), np.asarray(reference, dtype=np.uint32)):
        return None, "tiktoken disagreed with the Hugging Face tokenizer on a test sample"
    return engine, ""


# -----------------------------------------------------------------------------
# Safe cuts
#
# A long text is tokenized in pieces, so each cut must give exactly the tokens the whole text
# gives. The rule: cut at p (the right piece starts with text[p]) when text[p] is a space or
# a newline and text[p+1] is not whitespace, i.e. before the last whitespace character of a
# whitespace run that is followed by a visible character.
#
# Why that is safe for GPT-2's byte-level regex (GPT2_PATTERN): let W be that run and X the
# visible character after it. In the whole text, `\s+(?!\S)` matches W minus its last
# character (backtracking one step so the lookahead sees whitespace), then the last
# character is either glued to X (a space: ` ?\p{L}+` etc.) or matched alone by `\s+`.
# So p is a pre-token boundary. Cut there, the left piece ends with W minus its last
# character, which `\s+(?!\S)` matches whole at the end of the string (the lookahead
# succeeds at the end), and everything before it was matched without looking past it
# (letter/number/punctuation runs stop at whitespace; the regex never looks back). The
# right piece starts with the same last character + X as before. Pre-tokens are therefore
# identical and BPE sees them one by one.
#
# What is *not* safe, and why the rule is this narrow: cutting right after a newline that
# follows other whitespace (" \nX" cut before X gives " \n" as one pre-token instead of
# " " + "\n"), or after a space that precedes a letter (" X" is one pre-token).
# Python's str.isspace() is a superset of the regex's \s (checked over all of Unicode), so
# "not isspace" reliably means \S to the regex.
#
# Added tokens (GPT-2's "<|endoftext|>") are split off before the regex runs, so the text in
# front of one ends like a string does: "\n\n<|endoftext|>" gives the pre-token "\n\n", while a
# cut before the second newline gives "\n" + "\n". Hence no cut right before a character that
# can start an added token.
#
# Text without whitespace (a one-line JSON blob, CJK text, base64) gets a second rule: cut at p
# when text[p-1] and text[p] are both visible and belong to different classes of the regex,
# letter (\p{L}), number (\p{N}) or other (neither, nor whitespace), text[p-1] is not an
# apostrophe, and no added token occurs across p.
#
# Why that is safe: every alternative of GPT2_PATTERN that can match a visible character is a
# contraction ('s 't 're 've 'm 'll 'd) or a run of one class with an optional leading space.
# A run of text[p-1]'s class stops before text[p]; a contraction holds two classes only as an
# apostrophe followed by a letter, which is excluded. So the pre-token holding text[p-1] ends
# at p. The left piece is matched as before: each match in it ended at a character of a
# different class (or at p) and is found again when the string ends at p; no alternative that
# failed before can succeed now (contractions are fixed strings; the one lookahead,
# `\s+(?!\S)`, sees the same visible character before p). The right piece is matched from p
# exactly as the whole text is, since the regex never looks back. An added token across p
# would be broken in two; one that ends or starts at p splits the text there anyway.
#
# Python's Unicode tables can be older than the regex engine's: a code point Python does not
# know (category Cn) may be a letter to the regex, so no cut touches one. Whitespace cuts come
# first; this rule is used only where no whitespace cut lies within WHITESPACE_REACH characters.
#
# Other tokenizers (normalizers, Metaspace, other regexes) get the same candidate cuts but
# each cut is checked: tokens of a window around it must equal the tokens of its two halves.
# That check is local, not a proof: in a word longer than the window (text without any
# whitespace, for a pre-tokenizer that splits only at spaces) it sees the window only.
#
# A text with neither (one letter repeated, a DNA sequence on one line) is one pre-token and
# has no safe cut at all: it is held whole, and a validation range inside it cannot be placed.

WHITESPACE_REACH = 256
CHANGE_CANDIDATES = re.compile(r"\b|(?<=\d)(?=[^\W\d_])|(?<=[^\W\d_])(?=\d)")  # a superset, mostly


def regex_class(ch: str) -> str | None:
    """GPT2_PATTERN's class of a visible character: "L", "N" or "P" (other); None for whitespace
    and for code points Python's Unicode tables do not know."""
    category = unicodedata.category(ch)
    if ch.isspace() or category in ("Cn", "Cs"):
        return None
    return category[0] if category[0] in "LN" else "P"


class Cutter:
    """Finds cut positions that cannot change the tokens."""

    def __init__(self, verify=None, added=()):
        self.verify = verify  # encode(text) -> ids, for tokenizers without a proof of the rules
        self.added = tuple(t for t in added if t)  # added tokens: never cut across one
        self.avoid = frozenset(t[0] for t in self.added)  # ... nor right before one after whitespace
        self.reach = max([2, *map(len, self.added)])  # is_safe looks at most this far past p

    def is_safe(self, text: str, p: int) -> bool:
        if not self.is_candidate(text, p):
            return False
        if self.verify is None:
            return True
        left, right = text[max(0, p - VERIFY_WINDOW):p], text[p:p + VERIFY_WINDOW]
        whole = self.verify(left + right)
        return np.array_equal(whole, np.concatenate([self.verify(left), self.verify(right)]))

    def is_candidate(self, text: str, p: int) -> bool:
        """One of the two rules holds at p (see "Safe cuts"); text must go `reach` characters past p."""
        if not 0 < p <= len(text) - self.reach:
            return False
        if text[p] in " \n":
            return not text[p + 1].isspace() and text[p + 1] not in self.avoid
        a, b = regex_class(text[p - 1]), regex_class(text[p])
        if a is None or b is None or a == b or text[p - 1] == "'":
            return False
        return not any(text.find(t, max(0, p - len(t) + 1), p + len(t) - 1) >= 0 for t in self.added)

    def last(self, text: str, lo: int, hi: int) -> int | None:
        """The largest safe cut in [lo, hi): at whitespace, else at a change of class close to hi."""
        cut = self.last_at_whitespace(text, lo, hi)
        if cut is None or hi - cut > WHITESPACE_REACH:
            near = self.last_at_change(text, lo if cut is None else cut + 1, hi)
            cut = near if near is not None else cut
        return cut

    def first(self, text: str, lo: int, hi: int) -> int | None:
        """The smallest safe cut in [lo, hi): at whitespace, else at a change of class close to lo."""
        cut = self.first_at_whitespace(text, lo, hi)
        end = hi if cut is None else cut
        if end - lo > WHITESPACE_REACH:
            near = self.first_at_change(text, lo, end)
            cut = near if near is not None else cut
        return cut

    def last_at_whitespace(self, text: str, lo: int, hi: int) -> int | None:
        space, newline = text.rfind(" ", lo, hi), text.rfind("\n", lo, hi)
        while max(space, newline) >= max(lo, 1):
            p = max(space, newline)
            if self.is_safe(text, p):
                return p
            if p == space:
                space = text.rfind(" ", lo, p)
            else:
                newline = text.rfind("\n", lo, p)
        return None

    def first_at_whitespace(self, text: str, lo: int, hi: int) -> int | None:
        lo = max(lo, 1)
        space, newline = text.find(" ", lo, hi), text.find("\n", lo, hi)
        while space >= 0 or newline >= 0:
            p = min(x for x in (space, newline) if x >= 0)
            if self.is_safe(text, p):
                return p
            if p == space:
                space = text.find(" ", p + 1, hi)
            else:
                newline = text.find("\n", p + 1, hi)
        return None

    def first_at_change(self, text: str, lo: int, hi: int) -> int | None:
        for match in CHANGE_CANDIDATES.finditer(text, max(lo, 1), hi):
            p = match.start()
            if p < hi and text[p] not in " \n" and self.is_safe(text, p):
                return p
        return None

    def last_at_change(self, text: str, lo: int, hi: int) -> int | None:
        window = 1024
        while hi > lo:  # backwards in growing windows: the regex only searches forwards
            start = max(lo, hi - window)
            found = [m.start() for m in CHANGE_CANDIDATES.finditer(text, max(start, 1), hi) if m.start() < hi]
            for p in reversed(found):
                if text[p] not in " \n" and self.is_safe(text, p):
                    return p
            hi, window = start, 4 * window
        return None


def make_cutter(tokenizer, spec: dict | None, engine) -> Cutter:
    """The GPT-2 rule as is where it is proven for this tokenizer, else with every cut verified."""
    proven = not byte_level_regex_reason(spec)
    return Cutter(None if proven else engine.encode, added=tokenizer.get_added_vocab())


# -----------------------------------------------------------------------------
# Validation ranges


def val_ranges(total_bytes: int, fraction: float, seed: int, range_bytes: int = VAL_RANGE_BYTES,
               max_ranges: int = MAX_VAL_RANGES) -> list[tuple[int, int]]:
    """Seeded validation ranges [start, end) in the byte stream: one per equal slot.

    Each range holds `fraction` of its slot and sits at a random place between 5% and 95% of
    the room left in the slot, so neither the head nor the tail of the text is validation.
    """
    k = max(1, min(max_ranges, round(total_bytes * fraction / range_bytes)))
    rng = random.Random(seed)
    slot = total_bytes / k
    length = fraction * slot
    ranges = []
    for i in range(k):
        start = i * slot + rng.uniform(0.05, 0.95) * (slot - length)
        ranges.append((int(start), int(start + length)))
    return ranges


def range_sizes(inputs: list[Path]) -> tuple[int, int]:
    """Range size and count for val_ranges: smaller, more ranges when records are among the inputs."""
    if any(record_format(p) for p in inputs):
        return RECORD_VAL_RANGE_BYTES, MAX_RECORD_VAL_RANGES
    return VAL_RANGE_BYTES, MAX_VAL_RANGES


# -----------------------------------------------------------------------------
# Reading and cutting into pieces


@dataclass
class Piece:
    text: str
    split: str        # "train" or "val"
    source: int       # index into the sources list of meta.json
    start: int        # offset of the piece in its byte stream (the inputs concatenated)
    nbytes: int
    doc_end: bool     # last piece of its file: an end-of-text token follows it
    index: int


def read_text(path: Path, encoding: str, record: dict, base: int) -> Iterator[tuple[str, int]]:
    """Decode a file block by block; yield (text, stream offset just past that text).

    Fills record["bytes"] and record["sha256"] once the file is read. A UTF-8 byte-order mark at the
    start is dropped (it would be three tokens of noise) and noted as record["bom_stripped"].
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    sha, done = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            skip = len(codecs.BOM_UTF8) if done == 0 and is_utf8(encoding) and block.startswith(codecs.BOM_UTF8) else 0
            if skip:
                record["bom_stripped"] = True
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
    record.update(bytes=done, sha256=sha.hexdigest())


def char_offset(text: str, nbytes: int, encoding: str) -> int:
    """How many whole characters of `text` fit in its first `nbytes` encoded bytes."""
    return len(text[:nbytes].encode(encoding)[:nbytes].decode(encoding, errors="ignore"))


class Chunker:
    """Cuts a stream of files into pieces at safe places, switching split at the boundaries.

    `boundaries` are byte offsets in the stream (the files concatenated) where the split
    alternates, starting with `first`; each one is moved forward to the next safe cut (or
    the end of its file).
    """

    def __init__(self, files, records, encoding, cutter, boundaries=(), first="train",
                 chunk_chars=CHUNK_CHARS, first_index=0):
        self.files, self.records, self.encoding, self.cutter = files, records, encoding, cutter
        self.boundaries, self.first, self.chunk_chars = list(boundaries), first, chunk_chars
        self.first_index = first_index
        self.moved = 0  # the farthest a boundary had to move to a safe cut, in bytes

    def split(self, j: int) -> str:
        return self.first if j % 2 == 0 else ("val" if self.first == "train" else "train")

    def __iter__(self) -> Iterator[Piece]:
        j, stream, index = 0, 0, 0
        for source, (path, record) in enumerate(zip(self.files, self.records)):
            encoder = codecs.getincrementalencoder(self.encoding)()
            pending, start, resume = "", stream, 0
            for text, end in read_text(path, self.encoding, record, stream):
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
            stream += record["bytes"]
            if record["bytes"]:  # empty files add nothing, not even an end-of-text token
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


# -----------------------------------------------------------------------------
# Record inputs (JSON lines, JSON, CSV/TSV, Parquet; finetune/records.py reads them)
#
# Each record with text is one document: its pieces, then an end-of-text token. The split is
# decided per record, at the byte offset where it starts in the stream (the inputs concatenated):
# a record that starts inside a validation range is validation, whole, so no record is ever cut
# between the splits. Ranges are smaller with records (RECORD_VAL_RANGE_BYTES), so validation
# records come from all over the data set.


def stream_pieces(files, records, args, cutter, boundaries, first: str, chunk_chars: int,
                  first_index: int, moved: list[int] | None = None) -> Iterator[Piece]:
    """The pieces of `files` in order, one byte stream: runs of text files through a Chunker, record
    files record by record; the split alternates at `boundaries` (stream byte offsets), from `first`.
    `moved[0]` becomes the farthest a boundary had to move to a safe cut (Chunker.moved), in bytes."""
    base, i, index, step = 0, 0, 0, 0
    while i < len(files):
        j = i + 1
        if record_format(files[i]):
            pieces = record_pieces(files[i], records[i], args, cutter, chunk_chars, base, boundaries, first,
                                   first_index + i)
        else:
            while j < len(files) and not record_format(files[j]):
                j += 1
            chunker = Chunker(files[i:j], records[i:j], args.encoding, cutter,
                              [b - base for b in boundaries if b > base], split_at(base, boundaries, first),
                              chunk_chars, first_index + i)
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
        if moved is not None and not record_format(files[i]):
            moved[0] = max(moved[0], chunker.moved)
        base += sum(records[k]["bytes"] for k in range(i, j))
        i = j


def shifted(pieces: Iterator[Piece], base: int) -> Iterator[Piece]:
    """A Chunker counts bytes from the start of its own files; the stream from `base`."""
    for piece in pieces:
        piece.start += base
        yield piece


def split_at(offset: int, boundaries, first: str) -> str:
    """The split at a stream offset: it alternates at every boundary at or before it."""
    flips = bisect.bisect_right(boundaries, offset)
    return first if flips % 2 == 0 else ("val" if first == "train" else "train")


def record_pieces(path: Path, record: dict, args, cutter, chunk_chars: int, base: int, boundaries, first: str,
                  source: int) -> Iterator[Piece]:
    """The documents of one record file. A record's bytes run up to the next record's start (the first
    record's from the file's start), so the pieces' bytes add up to the file's size."""
    stats, counts = RecordStats(), {"train": 0, "val": 0}
    held = None  # one record of look-ahead: where the next one starts ends this one
    for offset, text in read_records(path, record_format(path), args.text_field, args.encoding, stats, record):
        if held is not None:
            yield from record_document(*held, base + offset, source, cutter, chunk_chars)
        start = base if held is None else base + offset
        held = (text, start, split_at(start, boundaries, first))
        counts[held[2]] += 1
    if held is not None:
        yield from record_document(*held, base + record["bytes"], source, cutter, chunk_chars)
    record.update(format=record_format(path), text_field=args.text_field, records=counts, skipped=stats.skipped)


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


# -----------------------------------------------------------------------------
# Tokenizing and writing


def encode_pieces(pieces, engine, workers: int) -> Iterator[tuple[Piece, np.ndarray]]:
    """Tokenize pieces on a thread pool, yielding results in order; reads stay a few pieces ahead."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
    queue: deque = deque()
    try:
        for piece in pieces:
            queue.append((piece, pool.submit(engine.encode_piece, piece)))
            if len(queue) > 2 * workers:
                piece, future = queue.popleft()
                yield piece, future.result()
        while queue:
            piece, future = queue.popleft()
            yield piece, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Outputs:
    """train.bin / val.bin / meta.json under hidden temporary names until commit()."""

    def __init__(self, out_dir: Path, dtype: np.dtype):
        self.out_dir, self.dtype = out_dir, dtype.newbyteorder("<")
        self.temp = {name: out_dir / f".{name}.tmp-{os.getpid()}" for name in OUTPUT_FILES}
        self.files = {}
        for split in ("train", "val"):
            try:
                self.files[split] = open(self.temp[f"{split}.bin"], "wb")
            except OSError as exc:
                self.discard()
                raise UserError(f"cannot write in --output-dir {out_dir} ({exc.strerror}). "
                                "HINT: choose a folder you can write to") from None

    @contextlib.contextmanager
    def writing(self):
        """A failed write (disk full, quota, I/O error) becomes SaveFailed: exit 4, not a traceback."""
        try:
            yield
        except OSError as exc:
            raise_if_write_failure(exc, f"{', '.join(OUTPUT_FILES)} in {self.out_dir}")
            raise

    def write(self, split: str, ids: np.ndarray) -> None:
        with self.writing():
            # file.write, not ndarray.tofile: a full disk then raises ENOSPC ("No space left on device"),
            # where tofile says only "N requested and M written"
            self.files[split].write(np.ascontiguousarray(ids.astype(self.dtype, copy=False)))

    def close(self) -> None:
        with self.writing():
            for f in self.files.values():
                if not f.closed:
                    _sync(f)
                    f.close()

    def narrow_to_uint16(self) -> None:
        with self.writing():
            self._narrow_to_uint16()

    def _narrow_to_uint16(self) -> None:
        """Rewrite uint32 files as uint16 (dataset.load_meta wants dtype == token_dtype(max id))."""
        for split in ("train", "val"):
            src = self.temp[f"{split}.bin"]
            dst = src.with_name(src.name + "16")
            wide = np.memmap(src, dtype="<u4", mode="r") if src.stat().st_size else np.zeros(0, "<u4")
            with open(dst, "wb") as f:
                for i in range(0, len(wide), 1 << 24):
                    f.write(wide[i:i + (1 << 24)].astype("<u2"))
                _sync(f)
            del wide
            os.replace(dst, src)
        self.dtype = np.dtype("<u2")

    def commit(self, meta: dict) -> None:
        """Rename into place. Old meta.json goes first and the new one comes last, so until the end
        the folder never holds a meta.json that describes .bin files it does not match."""
        self.close()
        with self.writing():
            with open(self.temp["meta.json"], "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, ensure_ascii=False)
                f.write("\n")
                _sync(f)
            (self.out_dir / "meta.json").unlink(missing_ok=True)
            for name in OUTPUT_FILES:
                os.replace(self.temp[name], self.out_dir / name)
            fsync_dir(self.out_dir)  # the renames themselves on disk

    def discard(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                f.close()
        for path in self.temp.values():
            path.unlink(missing_ok=True)
            path.with_name(path.name + "16").unlink(missing_ok=True)


def _sync(f) -> None:
    """Data on disk before the rename that publishes it (a crash must not publish a hole)."""
    f.flush()
    os.fsync(f.fileno())


class Tally:
    """Token and character counts per split and per source, and where the validation ranges landed."""

    def __init__(self, sources: list[dict], track_ranges: bool):
        self.tokens = {"train": 0, "val": 0}
        self.chars = {"train": 0, "val": 0}
        self.max_id = -1
        self.sources, self.track_ranges = sources, track_ranges
        self.ranges: list[dict] = []
        self.previous_split = None

    def add(self, piece: Piece, ids: np.ndarray) -> None:
        if self.track_ranges and piece.split == "val":
            if self.previous_split != "val":
                self.ranges.append({"stream_bytes": [piece.start, piece.start],
                                    "train_tokens_before": self.tokens["train"],
                                    "val_token_start": self.tokens["val"], "tokens": 0})
            self.ranges[-1]["stream_bytes"][1] = piece.start + piece.nbytes
            self.ranges[-1]["tokens"] += len(ids)
        self.previous_split = piece.split
        self.tokens[piece.split] += len(ids)
        self.chars[piece.split] += len(piece.text)
        source = self.sources[piece.source]
        source["chars"] += len(piece.text)
        source["tokens"] += len(ids)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))


def tokenize_to_files(args, inputs, val_inputs, tokenizer, engine, cutter: Cutter, out_dir: Path) -> dict:
    """Tokenize everything into temporary files in out_dir, then commit; return meta."""
    from finetune.tokenfiles import token_dtype

    sources = [{"path": str(p), "role": "input", "format": record_format(p) or "text", "chars": 0, "tokens": 0}
               for p in inputs]
    sources += [{"path": str(p), "role": "val-input", "format": record_format(p) or "text", "chars": 0, "tokens": 0}
                for p in val_inputs]
    records = [{} for _ in sources]  # bytes and sha256, filled in as the files are read
    ranges = [] if val_inputs else val_ranges(sum(p.stat().st_size for p in inputs), args.val_fraction, args.seed,
                                              *range_sizes(inputs))
    boundaries, size = [b for r in ranges for b in r], engine.piece_chars
    moved = [0]
    streams = [stream_pieces(inputs, records[:len(inputs)], args, cutter, boundaries, "train", size, 0, moved),
               stream_pieces(val_inputs, records[len(inputs):], args, cutter, (), "val", size, len(inputs))]
    pieces = (piece for stream in streams for piece in stream)
    total_bytes = sum(p.stat().st_size for p in [*inputs, *val_inputs])
    tally = Tally(sources, track_ranges=not val_inputs)
    # Decided before writing: wide enough for every id the tokenizer has.
    dtype = token_dtype(max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1) - 1)

    outputs = Outputs(out_dir, dtype)
    try:
        write_tokens(pieces, engine, args.num_workers, tokenizer.eos_token_id, outputs, tally, total_bytes)
        for source, record in zip(sources, records):
            source.update(record)
        check_some_text(sources, args)
        check_split_sizes(tally, args, ranges, moved[0])
        if dtype.itemsize == 4 and tally.max_id < 2**16:
            outputs.narrow_to_uint16()
        meta = build_meta(args, tokenizer, outputs.dtype, tally, sources, split_policy(args, ranges, tally))
        outputs.commit(meta)
        return meta
    except BaseException:  # error, Ctrl-C or SIGTERM: leave nothing behind
        outputs.discard()
        raise


def write_tokens(pieces, engine, workers: int, eos: int, outputs: Outputs, tally: Tally, total_bytes: int) -> None:
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizing",
              file=sys.stderr, dynamic_ncols=True) as bar, \
            closing(encode_pieces(pieces, engine, workers)) as results:  # closing: stops the threads on error
        for piece, ids in results:
            if piece.doc_end:
                ids = np.append(ids, np.uint32(eos))
            outputs.write(piece.split, ids)
            tally.add(piece, ids)
            bar.update(piece.nbytes)
    outputs.close()


def build_meta(args, tokenizer, dtype: np.dtype, tally: Tally, sources: list[dict], split: dict) -> dict:
    from finetune.tokenfiles import META_FORMAT, META_VERSION, SPLIT_FILES, tokenizer_fingerprint

    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "max_token_id": tally.max_id,
        "tokenizer": {"name_or_path": args.tokenizer,
                      "fingerprint": getattr(tokenizer, "fingerprint", None) or tokenizer_fingerprint(tokenizer),
                      "class": tokenizer_class(tokenizer), "add_special_tokens": False},
        "splits": {split_name: {"file": SPLIT_FILES[split_name], "tokens": tally.tokens[split_name],
                                "chars": tally.chars[split_name]} for split_name in ("train", "val")},
        "sources": sources,
        "split": split,
        "encoding": args.encoding,
        "eos_after_each_source": True,
        "input_formats": sorted({source["format"] for source in sources}),
        **records_meta(args, sources),
    }


def records_meta(args, sources: list[dict]) -> dict:
    """With record inputs: the field, documents per split and the records skipped (an end-of-text token
    follows each document, i.e. each record with text)."""
    mine = [s for s in sources if s["format"] != "text"]
    if not mine:
        return {}
    skipped = {why: sum(s["skipped"][why] for s in mine) for why in ("empty", "null", "missing")}
    return {"records": {"text_field": args.text_field,
                        "formats": sorted({s["format"] for s in mine}),
                        "train": sum(s["records"]["train"] for s in mine),
                        "val": sum(s["records"]["val"] for s in mine),
                        "skipped": sum(skipped.values()),
                        "skipped_by_reason": skipped,
                        "eos_after_each_record": True}}


def split_policy(args, ranges, tally: Tally) -> dict:
    if not ranges:
        return {"policy": "val-input", "seed": args.seed}
    return {
        "policy": "val-ranges",
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "stream": "the 'input' sources concatenated in order; stream_bytes index it",
        "requested_ranges": [list(r) for r in ranges],
        "val_ranges": tally.ranges,
    }


def check_some_text(sources: list[dict], args) -> None:
    """Record files whose records were all skipped can leave nothing to train on: say why."""
    for role, flag in (("input", "--input"), ("val-input", "--val-input")):
        mine = [s for s in sources if s["role"] == role]
        if mine and not any(s["tokens"] for s in mine) and all(s.get("format", "text") != "text" for s in mine):
            skipped = sum(sum(s["skipped"].values()) for s in mine)
            raise UserError(f"{flag} holds no text: all {skipped:,} records have an empty or null "
                            f"{args.text_field!r} field, or none. HINT: check --text-field (now "
                            f"{args.text_field!r})")


def check_split_sizes(tally: Tally, args, ranges=(), moved: int = 0) -> None:
    """Each split must hold at least one training block."""
    for split in ("train", "val"):
        n = tally.tokens[split]
        if n >= args.block_size:
            continue
        if ranges and moved >= min(b - a for a, b in ranges) / 2:
            raise UserError(
                f"the {split} split holds {n} tokens, less than one block of --block-size {args.block_size}, "
                f"because the text cannot be cut where the validation ranges go without changing its tokens "
                f"(a range edge moved {human_bytes(moved)}: a stretch with no whitespace and no change between "
                "letters, digits and other characters, such as one letter repeated). HINT: give the validation "
                "text as a separate file with --val-input")
        if args.val_input:
            fix = "add text to " + ("--input" if split == "train" else "--val-input")
        elif split == "val":
            fix = f"raise --val-fraction (now {args.val_fraction})"
        else:
            fix = f"lower --val-fraction (now {args.val_fraction})"
        raise UserError(f"the {split} split holds {n} tokens, less than one block of --block-size "
                        f"{args.block_size}. HINT: {fix}, lower --block-size, or add more text")


# -----------------------------------------------------------------------------
# Summary


def print_summary(meta: dict, args, out_dir: Path, seconds: float, tokenize_seconds: float) -> None:
    from finetune.plan import steps_per_epoch

    tokens = {s: meta["splits"][s]["tokens"] for s in ("train", "val")}
    chars = {s: meta["splits"][s]["chars"] for s in ("train", "val")}
    mb = sum(s["bytes"] for s in meta["sources"]) / 1e6
    ranges = meta["split"].get("val_ranges")
    where = f"{len(ranges)} range(s) inside the text" if ranges else "--val-input"
    # The rate is over the tokenizing alone: on a small input start-up (imports, tokenizer) dominates the
    # total, and an end-to-end MB/s would be misleading there.
    print(f"wrote {out_dir}/train.bin, val.bin, meta.json ({meta['dtype']}): {human_bytes(mb * 1e6)} of input "
          f"tokenized in {tokenize_seconds:.1f} s ({mb / max(tokenize_seconds, 1e-9):.1f} MB/s); "
          f"{seconds:.1f} s in all, start-up included")
    for note in input_notes(meta):
        print(f"  {note}")
    for split in ("train", "val"):
        per = chars[split] / max(tokens[split], 1)
        extra = f", from {where}" if split == "val" else ""
        print(f"  {split:5s} {tokens[split]:>14,} tokens {chars[split]:>14,} chars  {per:.2f} chars/token{extra}")
    blocks = tokens["train"] // args.block_size
    steps = steps_per_epoch(blocks, args.batch_size, args.grad_accum)
    print(f"  one epoch at block size {args.block_size}, batch size {args.batch_size}, grad accum {args.grad_accum}: "
          f"{blocks:,} blocks = {steps:,} optimizer steps; validation: {tokens['val'] // args.block_size:,} blocks")


def input_notes(meta: dict) -> list[str]:
    """What the summary says about records (documents per split, skipped) and byte-order marks."""
    notes = []
    records = meta.get("records")
    if records:
        why = ", ".join(f"{n:,} {reason}" for reason, n in records["skipped_by_reason"].items() if n)
        notes.append(f"records ({', '.join(records['formats'])}, field {records['text_field']!r}): "
                     f"{records['train']:,} train and {records['val']:,} val documents, whole records; "
                     f"{records['skipped']:,} skipped" + (f" ({why})" if why else ""))
    bom = [s["path"] for s in meta["sources"] if s.get("bom_stripped")]
    if bom:
        notes.append(f"stripped a UTF-8 byte-order mark from the start of {len(bom)} file(s): "
                     + ", ".join(bom[:3]) + (" ..." if len(bom) > 3 else ""))
    return notes


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


# -----------------------------------------------------------------------------
# Main


def keep_rss_flat() -> None:
    """Stop glibc from keeping freed 1 MB text and token buffers in its heap.

    glibc raises its mmap threshold each time a large mmapped block is freed; after that the
    pieces' buffers come from the heap, and RSS creeps up with the input (~0.4 MB per MB of
    text in tests). A fixed threshold keeps large blocks in mmap, returned to the OS on free.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 << 10)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def read_sample(paths: list[Path], encoding: str) -> str:
    """The start of the first input that holds text as such (JSON and CSV do, Parquet does not)."""
    path = next((p for p in paths if record_format(p) != "parquet"), None)
    if path is None:
        return ""
    with open(path, "rb") as f:
        return f.read(SAMPLE_BYTES).decode(encoding, errors="ignore")


def resolve_inputs(args) -> tuple[list[Path], list[Path]]:
    """The input and validation files, after the checks that need no tokenizer (every problem at once)."""
    problems: list[str] = []
    inputs = find_text_files(args.input, "--input", problems)
    val_inputs = find_text_files(args.val_input, "--val-input", problems) if args.val_input else []
    shared = {p.resolve() for p in inputs} & {p.resolve() for p in val_inputs}
    if shared:
        problems.append(f"{sorted(shared)[0]} is both training and validation input. "
                        "HINT: keep --val-input files out of --input")
    for files, flag in ((inputs, "--input"), (val_inputs, "--val-input")):
        text_files = [p for p in files if not record_format(p)]
        if text_files and len(text_files) == len(files):  # record files are checked as they are read
            problems.append(check_has_text(text_files, args.encoding, flag))
        problems += [check_record_file(p, record_format(p), args.text_field, args.encoding)
                     for p in files if record_format(p)]
    problems += output_dir_problems(Path(args.output_dir), args.overwrite)
    raise_if_problems([p for p in problems if p], "the input")
    return inputs, val_inputs


def write_sample_book(path: Path) -> None:
    """--sample-book: the Python documentation that ships with CPython, as one text file.

    Run again (the Quickstart line twice) it finds its own sample and succeeds; any other file there
    is never replaced."""
    try:
        import pydoc_data.topics as topics
    except ImportError:
        raise UserError("--sample-book: this Python has no pydoc_data module (some distributions ship it "
                        "separately). HINT: use any text file of your own as --input") from None
    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    if path.is_file() and path.stat().st_size == len(text.encode("utf-8")) and \
            path.read_text(encoding="utf-8") == text:
        print(f"{path} already holds the sample text. Next: python prepare_data.py --input {path}")
        return
    if path.exists():
        raise UserError(f"--sample-book: {path} already exists (and is not the sample). HINT: use it (python "
                        f"prepare_data.py --input {path}), or give --sample-book another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise UserError(f"--sample-book: cannot write {path} ({exc.strerror}). "
                        "HINT: choose a folder you can write to") from None
    print(f"wrote {path}: {human_bytes(path.stat().st_size)} of the Python documentation bundled with CPython "
          f"(pydoc_data). Next: python prepare_data.py --input {path}")


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.sample_book:
        return write_sample_book(Path(args.sample_book))
    check_args(args)
    started = time.time()
    keep_rss_flat()
    inputs, val_inputs = resolve_inputs(args)  # cheap checks first: bad input fails in a fraction of a second

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we run our own threads
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {args.tokenizer!r} has no end-of-text (eos) token to put between documents. "
                        "HINT: use the tokenizer of a causal language model")
    spec = tokenizer_spec(tokenizer)
    engine, why = choose_engine(tokenizer, spec, args.engine, read_sample(inputs, args.encoding))
    cutter = make_cutter(tokenizer, spec, engine)
    print(f"tokenizer {args.tokenizer} ({tokenizer_class(tokenizer)}, {len(tokenizer):,} entries); "
          f"engine: {why}; {args.num_workers} worker thread(s)", file=sys.stderr)

    out_dir = Path(args.output_dir)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    tokenize_started = time.time()
    try:
        with claimed_output_dir(out_dir, args.overwrite):
            try:
                meta = tokenize_to_files(args, inputs, val_inputs, tokenizer, engine, cutter, out_dir)
            except EngineMismatch as exc:
                print(f"note: {exc} in {[*inputs, *val_inputs][exc.source]}; starting over with --engine hf",
                      file=sys.stderr)
                meta = tokenize_to_files(args, inputs, val_inputs, tokenizer, HFEngine(tokenizer), cutter, out_dir)
        tokenize_seconds = time.time() - tokenize_started
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written or replaced. HINT: run the same command again",
              file=sys.stderr)
        raise SystemExit(130) from None
    except SaveFailed as exc:
        raise SaveFailed(f"{exc}; nothing in {out_dir} was replaced. HINT: free disk space, or choose "
                         "another --output-dir") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print_summary(meta, args, out_dir, time.time() - started, tokenize_seconds)
    return meta


if __name__ == "__main__":
    main()
