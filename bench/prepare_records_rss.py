"""Peak memory of prepare_data.py on a large JSON-lines file (records are streamed, never held whole).

    python bench/prepare_records_rss.py                 # 1 GB of JSONL, GPT-2 tokenizer from ../shared
    python bench/prepare_records_rss.py --mb 100 --tokenizer path/to/tokenizer

Writes --mb MB of JSON lines: records {"id", "text", "source"} whose text is a random slice (200 to 4,000
characters) of the Python documentation bundled with CPython; one record in 50 has an empty text. Then
runs prepare_data.py on it in a subprocess and reports wall time and the child's peak RSS
(bench/_common.run_polled).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare_rss_main, write_jsonl_of  # noqa: E402


def text_record(rng: random.Random, source: str, number: int) -> dict:
    start, length = rng.randrange(len(source) - 4000), rng.randint(200, 4000)
    text = "" if number % 50 == 49 else source[start:start + length]
    return {"id": number, "text": text, "source": "pydoc_data"}


def write_jsonl(path: Path, n_bytes: int, seed: int = 0) -> int:
    """Records until the file holds n_bytes; returns how many."""
    return write_jsonl_of(path, n_bytes, text_record, per_block=1000, seed=seed)


def main() -> None:
    prepare_rss_main(__doc__, 1000, "records", "records", write_jsonl, ())


if __name__ == "__main__":
    main()
