"""prepare_data.py end to end against tiktoken's one-core encode and against transformers' start-up.

    python bench/prepare_speed.py                          # 100 MB of Python source, GPT-2 tokenizer
    python bench/prepare_speed.py --corpus generated --mb 200 --tokenizer path/to/tokenizer

Everything below runs in one invocation, alternating rounds, so the ratios compare runs that
shared the machine's load (the load average is printed before and after):

1. The corpus. `python-source` (default): real text nobody here wrote, the .py files of this
   interpreter's standard library, then of the installed packages (sysconfig's stdlib, then
   purelib), sorted by path, valid UTF-8 only, concatenated to --mb MB. `generated`: seeded
   English-like word salad (real words at their frequencies in the Python docs plus a Zipf tail
   of made-up words).
2. prepare_data.py on the corpus in a subprocess: wall time, start-up included, and that
   child's own peak RSS (os.wait4).
3. tiktoken's one-core encode of the same text: the same vocabulary and regex, encode_to_numpy
   over ~1 MB pieces cut at safe places (its fastest one-core way here; reading the text and
   building the encoding are not timed), in its own process.
4. A 1 MB book (the corpus' first MB): prepare_data.py end to end with the tokenizer recorded
   by an earlier run (what every run after the first does) and with an empty record cache (a
   first run), against a bare `import transformers` + AutoTokenizer.from_pretrained in a
   subprocess.
5. Checks: prepare_data.py's ids (validation ranges put back) equal tiktoken's for the whole
   corpus, and AutoTokenizer's for its first --check-mb MB.

With --compare-commit COMMIT, instead: prepare_data.py of COMMIT (a `git worktree add --detach` checkout,
removed at the end) and of the working tree, side by side: each round runs both on the corpus and on the
1 MB book (each with its own recorded tokenizer), in alternating order, and the report gives each side's
medians and the ratio after / before. The two sides' outputs must be byte-identical.

    python bench/prepare_speed.py --compare-commit e95220c --mb 50 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from finetune.formats.tokenfiles import reassemble  # noqa: E402
from finetune.prepare.cuts import Cutter  # noqa: E402  (the safe-cut rule)
from finetune.prepare.engines import GPT2_PATTERN, byte_level_ranks  # noqa: E402

DEFAULT_TOKENIZER = REPO_ROOT.parent / "shared" / "gpt2-tokenizer"


# -----------------------------------------------------------------------------
# Text


def real_words() -> tuple[np.ndarray, np.ndarray]:
    """English words with their counts, from the Python documentation shipped with Python."""
    import collections
    import pydoc_data.topics
    import re

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


def python_source(path: Path, n_bytes: int) -> int:
    """The interpreter's own .py files (stdlib, then installed packages), sorted, to n_bytes; returns files used."""
    stdlib, purelib = Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])
    roots = [(stdlib, lambda p: "site-packages" not in p.relative_to(stdlib).parts), (purelib, lambda p: True)]
    written, files = 0, 0
    with open(path, "wb") as f:
        for root, keep in roots:
            for source in sorted(p for p in root.rglob("*.py") if keep(p)):
                try:
                    data = source.read_bytes()
                    data.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue  # not UTF-8: prepare_data.py would refuse the whole corpus
                f.write(data)
                written, files = written + len(data), files + 1
                if written >= n_bytes:
                    return files
    sys.exit(f"only {written / 1e6:.1f} MB of .py files under {stdlib} and {purelib}; ask for less --mb")


# -----------------------------------------------------------------------------
# Runs


def run_prepare(text_path: Path, out_dir: Path, tokenizer: str, extra: list[str], cache: Path,
                checkout: Path = REPO_ROOT) -> dict:
    cmd = [sys.executable, str(checkout / "prepare_data.py"), "--input", str(text_path), "--tokenizer", tokenizer,
           "--output-dir", str(out_dir), "--overwrite", *extra]
    result = run_child(cmd, {**os.environ, "XDG_CACHE_HOME": str(cache)})
    if result["returncode"] != 0:
        sys.exit(f"prepare_data.py failed:\n{result['stderr']}")
    stderr = result["stderr"]
    result["engine"] = next((line.split("engine: ", 1)[1] for line in stderr.splitlines() if "engine: " in line), "?")
    return result


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; its wall time and its own peak RSS (os.wait4 reports that child alone)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "returncode": proc.returncode,
                "cpu_seconds": usage.ru_utime + usage.ru_stime, "stdout": out.read(), "stderr": err.read()}


def bare_transformers(tokenizer: str) -> dict:
    code = ("from transformers import AutoTokenizer; import sys; AutoTokenizer.from_pretrained(sys.argv[1])")
    result = run_child([sys.executable, "-c", code, tokenizer])
    if result["returncode"] != 0:
        sys.exit(f"AutoTokenizer.from_pretrained failed:\n{result['stderr']}")
    return result


def safe_pieces(text: str, added: list[str], size: int = 1_000_000) -> list[str]:
    """~size-character pieces cut where the ids cannot change (prepare_data's rule)."""
    cutter = Cutter(added=added)
    pieces, start = [], 0
    while start < len(text):
        cut = cutter.last(text, start + size // 2, start + size) if start + size < len(text) else None
        end = cut if cut is not None else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def tiktoken_encoding(tokenizer: str):
    """tiktoken with the tokenizer's own vocabulary and GPT-2's regex (as tiktoken's gpt2 encoding is)."""
    import tiktoken

    spec = json.loads((Path(tokenizer) / "tokenizer.json").read_text(encoding="utf-8"))
    ranks, rank_to_id = byte_level_ranks(spec["model"])
    if rank_to_id != list(range(len(rank_to_id))):
        sys.exit("this tokenizer's ids are not its BPE ranks; the tiktoken baseline needs a GPT-2-like one")
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    return tiktoken.Encoding("baseline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special), list(special)


def run_tiktoken(text_path: Path, tokenizer: str, ids_path: Path) -> dict:
    """The baseline in its own process (so this one stays small and the children's peak RSS is theirs)."""
    cmd = [sys.executable, __file__, "--tiktoken-child", str(ids_path), str(text_path), "--tokenizer", tokenizer]
    result = run_child(cmd)
    if result["returncode"] != 0:
        sys.exit(f"tiktoken baseline failed:\n{result['stderr']}")
    seconds, cpu_seconds = map(float, result["stdout"].split()[-2:])
    return {**result, "seconds": seconds, "cpu_seconds": cpu_seconds}


def tiktoken_child(ids_path: str, text_path: str, tokenizer: str) -> None:
    """Prints the seconds of the timed part only: encoding the pieces, one after the other, one core."""
    text = Path(text_path).read_bytes().decode("utf-8")
    encoding, added = tiktoken_encoding(tokenizer)
    pieces = safe_pieces(text, added)
    del text
    started, cpu_started = time.perf_counter(), time.process_time()
    ids = [encoding.encode_to_numpy(piece, allowed_special="all") for piece in pieces]
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    np.save(ids_path, np.concatenate(ids))
    print(seconds, cpu_seconds)


def autotokenizer_ids(tokenizer: str, text: str, added: list[str]) -> np.ndarray:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    return np.concatenate([tok(piece, add_special_tokens=False)["input_ids"] for piece in safe_pieces(text, added)])


# -----------------------------------------------------------------------------


def load_line(label: str) -> str:
    return f"{label} load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("python-source", "generated"), default="python-source")
    parser.add_argument("--mb", type=float, default=100, help="MB of text to prepare (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each run (default: %(default)s)")
    parser.add_argument("--check-mb", type=float, default=2,
                        help="MB whose ids are checked against AutoTokenizer itself (default: %(default)s)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="a local GPT-2-like tokenizer folder")
    parser.add_argument("--seed", type=int, default=0, help="text generator seed (--corpus generated)")
    parser.add_argument("--workdir", default=None, help="keep the text and outputs here (default: a temp dir)")
    parser.add_argument("--tiktoken-child", nargs=2, metavar=("IDS", "TEXT"), help=argparse.SUPPRESS)
    parser.add_argument("--compare-commit", default=None, metavar="COMMIT",
                        help="time prepare_data.py of COMMIT against the working tree's, side by side")
    args, extra = parser.parse_known_args()  # anything else goes to prepare_data.py, e.g. --num-workers 1
    if args.tiktoken_child:
        return tiktoken_child(*args.tiktoken_child, args.tokenizer)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        text_path, book = work / f"{args.corpus}_{args.mb:g}mb.txt", work / "book_1mb.txt"
        if not text_path.exists():
            if args.corpus == "generated":
                generate_text(text_path, int(args.mb * 1e6), args.seed)
            else:
                print(f"{python_source(text_path, int(args.mb * 1e6))} .py files")
        with open(text_path, "rb") as f:
            book.write_bytes(f.read(1_000_000).decode("utf-8", errors="ignore").encode("utf-8"))
        mb = text_path.stat().st_size / 1e6
        if args.compare_commit:
            return compare_commit(args, extra, work, text_path, book, mb)
        warm, cold = work / "record-cache", work / "empty-cache"
        run_prepare(book, work / "warmup", args.tokenizer, [], warm)  # records the tokenizer (a first run)

        print(load_line("before:"))
        rows = {"prepare": [], "tiktoken": [], "book": [], "book_first_run": [], "transformers": []}
        for _ in range(args.rounds):
            rows["prepare"].append(run_prepare(text_path, work / "data", args.tokenizer, extra, warm))
            rows["tiktoken"].append(run_tiktoken(text_path, args.tokenizer, work / "tiktoken_ids.npy"))
            rows["transformers"].append(bare_transformers(args.tokenizer))
            rows["book"].append(run_prepare(book, work / "book", args.tokenizer, extra, warm))
            shutil.rmtree(cold, ignore_errors=True)
            rows["book_first_run"].append(run_prepare(book, work / "book", args.tokenizer, extra, cold))
        print(load_line("after: "))
        prepared = reassemble(work / "data")
        baseline = np.load(work / "tiktoken_ids.npy", mmap_mode="r")
        same_tiktoken = np.array_equal(prepared[:-1], baseline)  # [-1]: the end-of-text token after the file
        n = int(args.check_mb * 1e6)
        with open(text_path, "rb") as f:
            text = f.read(n + 4).decode("utf-8", errors="ignore")
        added = tiktoken_encoding(args.tokenizer)[1]
        checked = text[:Cutter(added=added).last(text, n // 2, n) or n]  # ends at a safe cut
        reference = autotokenizer_ids(args.tokenizer, checked, added)
        same_hf = np.array_equal(prepared[:len(reference)], reference)
        report(args, extra, mb, rows, same_tiktoken, same_hf, len(checked.encode("utf-8")) / 1e6)
        if not (same_tiktoken and same_hf):
            sys.exit("token ids differ")


def compare_commit(args, extra: list[str], work: Path, text_path: Path, book: Path, mb: float) -> None:
    """--compare-commit: the commit's prepare_data.py and the working tree's, alternating, on the same text."""
    before = work / "before-checkout"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(before),
                    args.compare_commit], check=True)
    try:
        sides = {"before": before, "after": REPO_ROOT}
        for side, checkout in sides.items():  # records the tokenizer for each side (a first run, not timed)
            run_prepare(book, work / f"warmup-{side}", args.tokenizer, [], work / f"cache-{side}", checkout)
        print(load_line("before:"))
        rows = {(side, run): [] for side in sides for run in ("prepare", "book")}
        for round_no in range(args.rounds):
            for side in (("before", "after") if round_no % 2 == 0 else ("after", "before")):
                cache, checkout = work / f"cache-{side}", sides[side]
                rows[side, "prepare"].append(run_prepare(text_path, work / f"data-{side}", args.tokenizer, extra,
                                                         cache, checkout))
                rows[side, "book"].append(run_prepare(book, work / f"book-{side}", args.tokenizer, extra, cache,
                                                      checkout))
        print(load_line("after: "))
        differ = [f"{folder}/{name}" for folder in ("data", "book") for name in ("train.bin", "val.bin", "meta.json")
                  if (work / f"{folder}-before" / name).read_bytes() != (work / f"{folder}-after" / name).read_bytes()]
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(before)], check=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"text: {mb:.1f} MB ({args.corpus}); tokenizer {args.tokenizer}; {cpus} CPUs; {args.rounds} rounds, "
          f"alternating; before = {args.compare_commit}, after = the working tree; medians (rounds listed)")
    for run, label in (("prepare", f"{mb:.0f} MB, prepare_data.py {' '.join(extra)}".rstrip()),
                       ("book", "1 MB book, tokenizer recorded")):
        medians = {}
        for side in ("before", "after"):
            seconds = [r["seconds"] for r in rows[side, run]]
            medians[side] = float(np.median(seconds))
            peak = max(r["peak_mb"] for r in rows[side, run])
            rate = f"{mb / medians[side]:.1f} MB/s, " if run == "prepare" else ""
            print(f"{label} {side:6s}: {medians[side]:.2f}s ({' / '.join(f'{x:.2f}' for x in seconds)}), "
                  f"{rate}peak RSS {peak:.0f} MB")
        print(f"  after / before: {medians['after'] / medians['before']:.3f} (time)")
    print("outputs byte-identical before / after" if not differ else f"outputs DIFFER: {', '.join(differ)}")
    if differ:
        sys.exit(1)


def report(args, extra, mb, rows, same_tiktoken, same_hf, checked_mb) -> None:
    def seconds(name):
        return [r["seconds"] for r in rows[name]]

    def median(values):
        return float(np.median(values))

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    prep, tik = median(seconds("prepare")), median(seconds("tiktoken"))
    book, first, bare = median(seconds("book")), median(seconds("book_first_run")), median(seconds("transformers"))
    listed = lambda name: " / ".join(f"{x:.2f}" for x in seconds(name))  # noqa: E731
    print(f"text: {mb:.1f} MB ({args.corpus}); tokenizer {args.tokenizer}; {cpus} CPUs; "
          f"{args.rounds} rounds, medians (rounds listed)")
    print(f"prepare_data.py {' '.join(extra)}".rstrip() + f": engine {rows['prepare'][0]['engine']}")
    print(f"  {prep:.2f}s ({listed('prepare')}) = {mb / prep:.1f} MB/s end to end (start-up included), "
          f"peak RSS {max(r['peak_mb'] for r in rows['prepare']):.0f} MB")
    print(f"tiktoken encode_to_numpy, ~1 MB pieces, one core: {tik:.2f}s ({listed('tiktoken')}) = "
          f"{mb / tik:.1f} MB/s")
    print(f"  ratio end to end / tiktoken one core: {tik / prep:.2f}x")
    prep_cpu = median([r["cpu_seconds"] for r in rows["prepare"]])
    tik_cpu = median([r["cpu_seconds"] for r in rows["tiktoken"]])
    print(f"  CPU seconds: prepare_data.py {prep_cpu:.1f} (all of it, start-up included; {prep_cpu / prep:.2f} cores "
          f"busy on average), tiktoken {tik_cpu:.1f} (the timed encode)")
    print(f"1 MB book, prepare_data.py end to end: {book:.2f}s ({listed('book')}), peak RSS "
          f"{max(r['peak_mb'] for r in rows['book']):.0f} MB; first run (no record yet): {first:.2f}s "
          f"({listed('book_first_run')})")
    print(f"bare import transformers + AutoTokenizer.from_pretrained: {bare:.2f}s ({listed('transformers')})")
    print(f"  ratio book / bare transformers: {book / bare:.2f}x (first run: {first / bare:.2f}x)")
    print(f"ids equal tiktoken's on all {mb:.1f} MB: {same_tiktoken}; AutoTokenizer's on the first "
          f"{checked_mb:.1f} MB: {same_hf}")
    print("prepare_data.py summary:\n  " + rows["prepare"][-1]["stdout"].strip().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
