"""Peak memory of prepare_data.py on a large file of conversations (chat records are streamed: one record,
its rendering and its ids are held at a time, never the file).

    python bench/prepare_chat_rss.py                  # 100 MB of conversations, GPT-2 tokenizer from ../shared
    python bench/prepare_chat_rss.py --mb 20 --tokenizer path/to/tokenizer

Writes --mb MB of JSON lines {"id", "messages"}: 1 to 4 user/assistant exchanges, a system turn in one
conversation of three, every turn a random slice (20 to 1,500 characters) of the Python documentation
bundled with CPython, one user turn in ten given as a list of text parts. GPT-2 has no chat template, so
the default template renders them. Then runs prepare_data.py on it in a subprocess and reports wall time
and the child's peak RSS (getrusage of the waited-for child, exact). Anything else on the command line
goes to prepare_data.py (e.g. --engine hf).
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


def conversation(rng: random.Random, source: str, number: int) -> dict:
    def text(longest: int) -> str:
        start = rng.randrange(len(source) - longest)
        return source[start:start + rng.randint(20, longest)].strip() or "Hello."

    messages = [{"role": "system", "content": text(300)}] if number % 3 == 0 else []
    for _ in range(rng.randint(1, 4)):
        user = text(600)
        if rng.random() < 0.1:
            cut = len(user) // 2
            user = [{"type": "text", "text": user[:cut]}, {"type": "text", "text": user[cut:]}]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text(1500)}]
    return {"id": number, "messages": messages}


def write_jsonl(path: Path, n_bytes: int, seed: int = 0) -> int:
    """Conversations until the file holds n_bytes; returns how many."""
    import pydoc_data.topics as topics

    source = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    rng = random.Random(seed)
    written = count = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            lines = []
            for _ in range(500):
                lines.append(json.dumps(conversation(rng, source, count), ensure_ascii=False))
                count += 1
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="MB of conversations (default: %(default)s)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--workdir", default=None, help="keep the input and outputs here (default: a temp dir)")
    args, extra = parser.parse_known_args()  # anything else goes to prepare_data.py

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"chats_{args.mb:g}mb.jsonl"
        started = time.perf_counter()
        count = write_jsonl(path, int(args.mb * 1e6))
        print(f"wrote {path.stat().st_size / 1e6:.1f} MB, {count:,} conversations in "
              f"{time.perf_counter() - started:.0f} s")
        cmd = [sys.executable, str(REPO_ROOT / "prepare_data.py"), "--input", str(path), "--tokenizer",
               args.tokenizer, "--output-dir", str(work / "data"), "--overwrite", *extra]
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            sys.exit(f"prepare_data.py failed:\n{result.stderr}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KB; the only child
        sizes = {name: (work / "data" / name).stat().st_size for name in ("train.bin", "train.mask.bin")}
    print(f"prepare_data.py {' '.join(extra)}".rstrip() + f": {seconds:.0f} s wall, peak RSS {peak_mb:.0f} MB; "
          f"train.bin {sizes['train.bin'] / 1e6:.1f} MB, train.mask.bin {sizes['train.mask.bin'] / 1e6:.1f} MB")
    print("summary:\n  " + result.stdout.strip().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
