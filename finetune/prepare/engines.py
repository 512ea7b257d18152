"""Tokenizer loading and the two engines that turn a piece of text into ids: Hugging Face `tokenizers`, and
a tiktoken fast path for GPT-2-style byte-level BPE (checked against Hugging Face before and during the run).

Either way the ids equal `AutoTokenizer.from_pretrained(name)(text, add_special_tokens=False)`.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from finetune.core.errors import UserError

if TYPE_CHECKING:
    from .piece import Piece

CHUNK_CHARS = 1 << 20         # target size of one tokenized piece (the tiktoken engine)
CHECK_EVERY = 8               # during the run, check every 8th piece's start against Hugging Face
CHECK_CHARS = 16 << 10

# GPT-2's pre-tokenizer regex, as used by the Hugging Face ByteLevel pre-tokenizer.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_tokenizer(name_or_path: str, full: bool = False):
    """AutoTokenizer from a local folder, the Hugging Face cache, or (when reachable) the hub; or, when
    this tokenizer was checked and recorded by an earlier run, the same tokenizer without transformers
    (recorded.load_recorded_tokenizer: a fraction of the start-up; docs/performance.md). `full`: always the
    AutoTokenizer (chat records need its chat template and special tokens)."""
    from finetune.models.loading import load_tokenizer as load

    from .recorded import load_recorded_tokenizer, remember_tokenizer

    tokenizer = None if full else load_recorded_tokenizer(name_or_path)
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


