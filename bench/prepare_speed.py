"""prepare_data.py end to end vs plain AutoTokenizer, on the same generated text.

    python bench/prepare_speed.py                       # 200 MB, GPT-2 tokenizer from ../shared
    python bench/prepare_speed.py --mb 50 --baseline-mb 10 --tokenizer path/to/tokenizer

1. Writes --mb MB of text: seeded word salad; 85% of the words are English words at their
   frequencies in the Python documentation (3,700 words), 15% come from a Zipf-distributed
   tail of 60,000 made-up words (so a BPE word cache is not unrealistically hot); plus
   punctuation, line breaks, paragraphs, numbers and some non-ASCII.
2. Runs prepare_data.py on it in a subprocess: wall time (startup included) and the child's
   peak RSS (getrusage of the waited-for child, exact).
3. Tokenizes the first --baseline-mb MB with AutoTokenizer in this process, tokenizer(piece)
   over ~1 MB pieces, one process, cut at safe places so the ids are comparable, and checks
   they equal prepare_data.py's ids for the same text.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import prepare_data  # noqa: E402  (for its safe-cut rule)

DEFAULT_TOKENIZER = REPO_ROOT.parent / "shared" / "gpt2-tokenizer"


# -----------------------------------------------------------------------------
# Text


def real_words() -> tuple[np.ndarray, np.ndarray]:
    """English words with their counts, from the Python documentation shipped with Python."""
    import collections
    import re

    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    counts = collections.Counter(re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text))
    words, freq = zip(*counts.most_common())
    return np.array(words, dtype=object), np.array(freq, dtype=float)


def pseudo_words(rng: np.random.Generator, n: int = 60_000) -> np.ndarray:
    """A long tail of rare made-up words (names, jargon): BPE has to split these."""
    consonants = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl br gr qu".split()
    vowels = "a e i o u y ai ea ou io ee oo".split()
    syllables = [c + v for c in consonants for v in vowels]
    picks, lengths = rng.integers(0, len(syllables), size=(2 * n, 3)), rng.integers(1, 4, size=2 * n)
    words = sorted({"".join(syllables[i] for i in row[:k]) for row, k in zip(picks.tolist(), lengths.tolist())})
    words = words[:n]
    rng.shuffle(words)
    extra = ["naïve", "café", "Übermut", "façade", "東京", "こんにちは", "北京市", "Привет", "Ελλάδα", "🙂",
             "🚀", "1999", "3.14", "42", "2,500", "(see", "e.g.", "--", '"quoted"', "[1]", "x = y + 1;"]
    return np.array(words + extra, dtype=object)


def generate_text(path: Path, n_bytes: int, seed: int = 0, rare_share: float = 0.15) -> None:
    """Word salad: real words at their real frequencies, rare made-up words (Zipf), punctuation."""
    rng = np.random.default_rng(seed)
    common, counts = real_words()
    rare = pseudo_words(rng)
    rare_weights = 1.0 / np.arange(1, len(rare) + 1)
    vocab = np.concatenate([common, rare])
    weights = np.concatenate([(1 - rare_share) * counts / counts.sum(),
                              rare_share * rare_weights / rare_weights.sum()])
    separators = np.array([" ", ", ", ". ", "! ", "? ", ".\n", ".\n\n", "; ", ":\n    "], dtype=object)
    sep_weights = np.array([1000, 60, 60, 4, 4, 10, 12, 2, 2], dtype=float)
    sep_weights /= sep_weights.sum()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            words = vocab[rng.choice(len(vocab), size=200_000, p=weights)]
            seps = separators[rng.choice(len(separators), size=200_000, p=sep_weights)]
            text = "".join(map(str.__add__, words, seps))
            f.write(text)
            written += len(text.encode("utf-8"))


# -----------------------------------------------------------------------------
# Runs


def run_prepare(text_path: Path, out_dir: Path, tokenizer: str, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO_ROOT / "prepare_data.py"), "--input", str(text_path), "--tokenizer", tokenizer,
           "--output-dir", str(out_dir), "--overwrite", *extra]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"prepare_data.py failed:\n{result.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KB; the only child so far
    engine = next((line.split("engine: ", 1)[1] for line in result.stderr.splitlines() if "engine: " in line), "?")
    return {"seconds": seconds, "peak_mb": peak_kb / 1024, "engine": engine, "summary": result.stdout.strip()}


def reassemble(out_dir: Path) -> np.ndarray:
    meta = json.loads((out_dir / "meta.json").read_text())
    train = np.memmap(out_dir / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(out_dir / "val.bin", dtype=meta["dtype"], mode="r")
    parts, t = [], 0
    for r in meta["split"]["val_ranges"]:
        parts += [train[t:r["train_tokens_before"]], val[r["val_token_start"]:r["val_token_start"] + r["tokens"]]]
        t = r["train_tokens_before"]
    parts.append(train[t:])
    return np.concatenate(parts)


def run_autotokenizer(text_path: Path, tokenizer: str, n_bytes: int) -> dict:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    with open(text_path, "rb") as f:
        text = f.read(n_bytes).decode("utf-8", errors="ignore")
    cutter = prepare_data.Cutter(avoid="".join(t[:1] for t in tok.get_added_vocab()))
    pieces, start = [], 0
    while start < len(text):  # ~1 MB pieces, cut where the ids cannot change
        cut = cutter.last(text, start + 500_000, start + 1_000_000) if start + 1_000_000 < len(text) else None
        end = cut if cut is not None else len(text)
        pieces.append(text[start:end])
        start = end
    pieces[-1] = pieces[-1][: cutter.last(pieces[-1], 1, len(pieces[-1])) or len(pieces[-1])]  # end at a safe cut
    ids = []
    started = time.perf_counter()
    for piece in pieces:
        ids.extend(tok(piece)["input_ids"])
    seconds = time.perf_counter() - started
    mb = sum(len(p.encode("utf-8")) for p in pieces) / 1e6
    return {"seconds": seconds, "mb": mb, "ids": np.asarray(ids)}


# -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="MB of text to prepare (default: %(default)s)")
    parser.add_argument("--baseline-mb", type=float, default=20,
                        help="MB tokenized by plain AutoTokenizer (default: %(default)s)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--seed", type=int, default=0, help="text generator seed")
    parser.add_argument("--workdir", default=None, help="keep the text and outputs here (default: a temp dir)")
    args, extra = parser.parse_known_args()  # anything else goes to prepare_data.py, e.g. --num-workers 1

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        text_path = work / f"bench_{args.mb:g}mb_seed{args.seed}.txt"
        if not text_path.exists():
            started = time.perf_counter()
            generate_text(text_path, int(args.mb * 1e6), args.seed)
            print(f"generated {text_path.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - started:.1f}s")
        mb = text_path.stat().st_size / 1e6
        prep = run_prepare(text_path, work / "data", args.tokenizer, extra)
        base = run_autotokenizer(text_path, args.tokenizer, int(args.baseline_mb * 1e6))
        same = np.array_equal(reassemble(work / "data")[: len(base["ids"])], base["ids"])

    prep_rate, base_rate = mb / prep["seconds"], base["mb"] / base["seconds"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"text: {mb:.1f} MB generated (seed {args.seed}); tokenizer {args.tokenizer}; {cpus} CPUs")
    print(f"prepare_data.py {' '.join(extra)}".rstrip() + f": engine {prep['engine']}")
    print(f"  {prep['seconds']:.1f}s wall = {prep_rate:.1f} MB/s end to end (startup included), "
          f"peak RSS {prep['peak_mb']:.0f} MB")
    print(f"AutoTokenizer, tokenizer(piece) over ~1 MB pieces, 1 process: {base['mb']:.1f} MB in "
          f"{base['seconds']:.1f}s = {base_rate:.2f} MB/s")
    print(f"ratio: {prep_rate / base_rate:.1f}x; ids identical on the first {base['mb']:.1f} MB: {same}")
    print("prepare_data.py summary:\n  " + prep["summary"].replace("\n", "\n  "))
    if not same:
        sys.exit("token ids differ from AutoTokenizer")


if __name__ == "__main__":
    main()
