"""Runs inside the llama-cpp-python venv (no torch, no transformers): what llama.cpp makes of a GGUF file.

Reads one JSON job from stdin, writes one JSON result to stdout. Jobs:
  {"op": "logits", "path", "token_ids", "text"}         -> last-position logits, llama.cpp's own token ids
  {"op": "greedy", "path", "token_ids", "n"}            -> n greedy tokens (argmax of the logits each step)
  {"op": "chat", "path", "messages", "max_tokens"}      -> the prompt the embedded template renders, an answer
"""
from __future__ import annotations

import json
import sys


def load(path: str, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0, **kwargs)


def last_logits(llm, token_ids: list[int]) -> list[float]:
    llm.reset()
    llm.eval(token_ids)
    return llm.scores[llm.n_tokens - 1].tolist()


def greedy(llm, token_ids: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(token_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def chat(job: dict) -> dict:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = load(job["path"])
    template = llm.metadata.get("tokenizer.chat_template")
    eos = llm.detokenize([llm.token_eos()]).decode("utf-8", "replace")
    bos = llm.detokenize([llm.token_bos()]).decode("utf-8", "replace")
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos) if template else None
    prompt = formatter(messages=job["messages"]).prompt if formatter else None
    answer = llm.create_chat_completion(messages=job["messages"], max_tokens=job["max_tokens"], temperature=0.0)
    return {"chat_format": llm.chat_format, "template": template, "prompt": prompt,
            "answer": answer["choices"][0]["message"]["content"], "finish_reason": answer["choices"][0]["finish_reason"]}


def main() -> None:
    job = json.loads(sys.stdin.read())
    if job["op"] == "chat":
        result = chat(job)
    else:
        llm = load(job["path"])
        if job["op"] == "logits":
            own_ids = llm.tokenize(job["text"].encode("utf-8"), add_bos=False, special=False)
            result = {"logits": last_logits(llm, job["token_ids"]), "own_token_ids": own_ids,
                      "n_vocab": llm.n_vocab()}
        else:
            tokens = greedy(llm, job["token_ids"], job["n"])
            result = {"tokens": tokens, "text": llm.detokenize(tokens).decode("utf-8", "replace")}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
