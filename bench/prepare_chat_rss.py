"""Peak memory of prepare_data.py on a large file of conversations (chat records are streamed: one record,
its rendering and its ids are held at a time, never the file).

    python bench/prepare_chat_rss.py                  # 100 MB of conversations, GPT-2 tokenizer from ../shared
    python bench/prepare_chat_rss.py --mb 20 --tokenizer path/to/tokenizer

Writes --mb MB of JSON lines {"id", "messages"}: 1 to 4 user/assistant exchanges, a system turn in one
conversation of three, every turn a random slice (20 to 1,500 characters) of the Python documentation
bundled with CPython, one user turn in ten given as a list of text parts. GPT-2 has no chat template, so
the default template renders them. Then runs prepare_data.py on it in a subprocess and reports wall time
and the child's peak RSS (bench/_common.run_polled). Anything else on the command line
goes to prepare_data.py (e.g. --engine hf).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import prepare_rss_main, write_jsonl_of  # noqa: E402


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
    return write_jsonl_of(path, n_bytes, conversation, per_block=500, seed=seed)


def main() -> None:
    prepare_rss_main(__doc__, 100, "chats", "conversations", write_jsonl, ("train.bin", "train.mask.bin"))


if __name__ == "__main__":
    main()
