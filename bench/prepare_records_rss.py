"""Peak memory of prepare_data.py on a large JSON-lines file (records are streamed, never held whole).

    python bench/prepare_records_rss.py                 # 1 GB of JSONL, GPT-2 tokenizer from ../shared
    python bench/prepare_records_rss.py --mb 100 --tokenizer path/to/tokenizer

Writes --mb MB of JSON lines: records {"id", "text", "source"} whose text is a random slice (200 to 4,000
characters) of the Python documentation bundled with CPython; one record in 50 has an empty text. Then
runs prepare_data.py on it in a subprocess and reports wall time and the child's peak RSS (getrusage of
the waited-for child, exact).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = REPO_ROOT.parent / "shared" / "gpt2-tokenizer"


def write_jsonl(path: Path, n_bytes: int, seed: int = 0) -> int:
    """Records until the file holds n_bytes; returns how many."""
    import pydoc_data.topics as topics

    source = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    rng = random.Random(seed)
    written = count = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            lines = []
            for _ in range(1000):
                start, length = rng.randrange(len(source) - 4000), rng.randint(200, 4000)
                text = "" if count % 50 == 49 else source[start:start + length]
                lines.append(json.dumps({"id": count, "text": text, "source": "pydoc_data"}, ensure_ascii=False))
                count += 1
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=1000, help="MB of JSON lines (default: %(default)s)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--workdir", default=None, help="keep the input and outputs here (default: a temp dir)")
    args, extra = parser.parse_known_args()  # anything else goes to prepare_data.py

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"records_{args.mb:g}mb.jsonl"
        started = time.perf_counter()
        records = write_jsonl(path, int(args.mb * 1e6))
        print(f"wrote {path.stat().st_size / 1e6:.1f} MB, {records:,} records in {time.perf_counter() - started:.0f} s")
        cmd = [sys.executable, str(REPO_ROOT / "prepare_data.py"), "--input", str(path), "--tokenizer",
               args.tokenizer, "--output-dir", str(work / "data"), "--overwrite", *extra]
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"prepare_data.py failed:\n{result.stderr}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KB; the only child
    print(f"prepare_data.py {' '.join(extra)}".rstrip() + f": {seconds:.0f} s wall, peak RSS {peak_mb:.0f} MB")
    print("summary:\n  " + result.stdout.strip().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
