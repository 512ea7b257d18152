"""Runs inside the llama-cpp-python venv (no torch): one greedy generation, its phases stamped.

    python _llamacpp_speed_worker.py '{"path": "model-f16.gguf", "token_ids": [...], "n": 64}'

Prints one JSON line: the process's start (from /proc, as psutil reads it), when Llama() had loaded the file,
when the prompt's evaluation (and its first greedy token) was done, the tokens, and the end. bench/generate_speed.py
reads it.
"""
from __future__ import annotations

import json
import os
import sys
import time


def process_start() -> float:
    """This process's creation time (seconds since the epoch), from /proc like psutil."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def main() -> None:
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(sys.argv[1])
    llm = Llama(model_path=job["path"], n_ctx=512, n_threads=job.get("threads", 2), n_batch=512, verbose=False, seed=0)
    loaded = time.time()
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # greedy, from the last position's logits (the only ones llama.cpp computed)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    llm.eval(job["token_ids"])
    token = next_token()
    prompt_done = time.time()
    tokens = [token]
    while len(tokens) < job["n"]:
        llm.eval([token])
        token = next_token()
        tokens.append(token)
    done = time.time()
    print(json.dumps({"process_start": process_start(), "loaded": loaded, "prompt_done": prompt_done, "done": done,
                      "tokens": tokens}))


if __name__ == "__main__":
    main()
