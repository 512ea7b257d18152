"""How rendering one conversation grows with its turns: prepare_data.py's chat renderer (finetune/formats/chat.py,
ChatRenderer) on one conversation of N user/assistant exchanges, GPT-2's tokenizer (../shared/gpt2-tokenizer)
with the tiktoken engine prepare_data.py picks for it, the default chat template.

    python bench/chat_render_turns.py --turns 1000 4000

Each user message and reply is 12 words, so a turn is ~16 tokens. Printed per N: seconds to render and
tokenize the conversation (ids + loss mask), best of --rounds, and the seconds per 1,000 messages: flat
when the work is linear in the turns, growing with N when it is quadratic (it is: each reply is checked
against the rendering of the history before it). Above finetune.formats.chat.MAX_MESSAGES the conversation is
refused, and the line says how fast.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_TOKENIZER_DIR, REPO  # noqa: E402

sys.path.insert(0, str(REPO))

from finetune.core.errors import UserError  # noqa: E402
from finetune.formats.chat import ChatRenderer, Conversation, choose_template  # noqa: E402
from finetune.prepare.chatstream import CheckedEncoder  # noqa: E402
from finetune.prepare.engines import choose_engine, load_tokenizer, tokenizer_spec  # noqa: E402

WORDS = "the sea wind ship captain quiet morning letter house garden door window old young said found".split()


def conversation(exchanges: int, seed: int = 0) -> Conversation:
    rng = random.Random(seed)
    messages = []
    for _ in range(exchanges):
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(12))})
        messages.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(12))})
    return Conversation(messages, [m["role"] == "assistant" for m in messages])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[1000, 4000],
                        help="messages per conversation (user + assistant), one measurement each")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER_DIR))
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer, full=True)  # as prepare_data.py loads it for chat records
    engine, why = choose_engine(tokenizer, tokenizer_spec(tokenizer), "auto", "")
    print(f"tokenizer {args.tokenizer}, engine: {why}")
    renderer = ChatRenderer(tokenizer, choose_template(tokenizer, None), CheckedEncoder(engine))
    for turns in args.turns:
        example = conversation(turns // 2)
        best = float("inf")
        try:
            for _ in range(args.rounds):
                start = time.perf_counter()
                rendered = renderer.render(example, "bench")
                best = min(best, time.perf_counter() - start)
        except UserError as exc:  # beyond finetune.formats.chat.MAX_MESSAGES: refused before any render
            print(f"{turns:>7,} messages: refused in {time.perf_counter() - start:.3f} s: {str(exc)[:90]}...")
            continue
        print(f"{turns:>7,} messages: {best:8.2f} s ({len(rendered.ids):,} tokens, "
              f"{int(rendered.mask.sum() & 0xFFFFFFFF):,} mask sum), {1000 * best / turns:.3f} s per 1,000 messages")


if __name__ == "__main__":
    main()
