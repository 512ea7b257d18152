"""Rolling perplexity (issue 28): evaluate.py's scorer against lm-evaluation-harness's Hugging Face backend
(HFLM.loglikelihood_rolling), on the same model instance, the same documents, in the same process and CPU.

    pip install lm-eval   # in the environment that runs this (requirements-dev.txt has it)
    python bench/eval_throughput.py --model small --tokens 20000 --rounds 2 [--sweep 1,2,4]

The model is a random-weight GPT-2 architecture built locally (_common.MODELS; the GPT-2 tokenizer from
../shared/gpt2-tokenizer); the documents are this repository's Markdown files, cut to about --doc-tokens
tokens each (several rolling windows of the model's 1024-token context). The contenders alternate, --rounds
times each; every one scores the same documents and must agree on the total log-likelihood (printed):
  ours          evaluate.py's TextEvaluation.run on a Scorer (its defaults: --batch-size 8, --precision auto)
  ours_fp32     the same in fp32 (lm-eval runs a float32 model in fp32)
  lm_eval_b1    HFLM(pretrained=model, batch_size=1): lm-eval's default batch size
  lm_eval_b8    HFLM(..., batch_size=8)
  floor         ours (defaults) with the output layer's matmul and nothing after it (no log-sum-exp, no
                gather): the work no exact scorer of these windows in that precision can skip, so floor /
                lm_eval_b1 is the most any of them could reach over lm-eval on this model and CPU
tokens/s = the documents' tokens / the seconds of the scoring call (tokenizing included for both).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir  # noqa: E402

sys.path.insert(0, str(REPO))


def documents(tokenizer, total_tokens: int, doc_tokens: int) -> list[str]:
    """This repository's Markdown, cut into documents of about doc_tokens tokens, total_tokens in all."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(REPO.rglob("*.md")) if ".venv" not in p.parts)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < total_tokens:
        ids = ids + ids
    return [tokenizer.decode(ids[i:i + doc_tokens]) for i in range(0, total_tokens, doc_tokens)]


def ours(model, tokenizer, docs, precision: str, batch_size: int, floor: bool = False) -> tuple[float, int, float]:
    import numpy as np
    import torch

    from finetune.evaluation.documents import Document
    from finetune.evaluation.perplexity import TextEvaluation
    from finetune.evaluation.scoring import ROWS_PER_CHUNK, Scorer

    class FloorScorer(Scorer):
        def logprobs(self, rows, targets):
            for start in range(0, len(rows), ROWS_PER_CHUNK):
                self.head(rows[start:start + ROWS_PER_CHUNK])
            return np.zeros(len(rows))

    scorer = (FloorScorer if floor else Scorer)(model, tokenizer, torch.device("cpu"), precision,
                                                model.config.n_positions, batch_size, "ours")
    evaluation = TextEvaluation("bench", [Document("bench", f"doc {i}", text=d) for i, d in enumerate(docs)])
    started = time.perf_counter()
    result = evaluation.run(scorer)
    seconds = time.perf_counter() - started
    return -result.figures["loss"] * result.figures["tokens"], result.figures["tokens"], seconds


def lm_eval(model, tokenizer, docs, batch_size: int) -> tuple[float, int, float]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                for i, d in enumerate(docs)]
    started = time.perf_counter()
    lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    return float(sum(lls)), tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="an architecture of bench/_common.MODELS (default: small)")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--doc-tokens", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sweep", default="", help="comma list of batch sizes: also ours in fp32 at each (ours_bN)")
    parser.add_argument("--root", default=os.environ.get("BENCH_ROOT", "/tmp/bench-eval"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.runtime.device import cpu_model, resolve_precision

    folder = build_model_dir(args.model, Path(args.root))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    docs = documents(tokenizer, args.tokens, args.doc_tokens)
    auto = resolve_precision("auto", torch.device("cpu"), model.config.n_embd)
    contenders = {"ours": lambda: ours(model, tokenizer, docs, auto, 8),
                  "ours_fp32": lambda: ours(model, tokenizer, docs, "fp32", 8),
                  "lm_eval_b1": lambda: lm_eval(model, tokenizer, docs, 1),
                  "lm_eval_b8": lambda: lm_eval(model, tokenizer, docs, 8),
                  "floor": lambda: ours(model, tokenizer, docs, auto, 8, floor=True)}
    for size in filter(None, args.sweep.split(",")):
        contenders[f"ours_b{size}"] = lambda size=int(size): ours(model, tokenizer, docs, "fp32", size)
    runs: dict[str, list] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            runs[name].append(run())
    print(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": args.model,
                      "documents": len(docs), "precision_auto": auto}))
    for name, results in runs.items():
        ll, tokens, _ = results[0]
        best = min(seconds for _, _, seconds in results)
        print(f"{name:<11} {tokens / best:9.0f} tokens/s (best of {len(results)}: {best:.2f} s for {tokens:,} tokens), "
              + ("the matmuls only" if name == "floor" else f"log-likelihood {ll:.4f} ({ll / tokens:.6f} per token)"))
    def tokens_per_s(name: str) -> float:
        return runs[name][0][1] / min(seconds for *_, seconds in runs[name])

    print(f"ours (defaults) / lm-eval (defaults): {tokens_per_s('ours') / tokens_per_s('lm_eval_b1'):.2f}x; "
          f"floor / lm-eval (defaults): {tokens_per_s('floor') / tokens_per_s('lm_eval_b1'):.2f}x, the most an "
          f"exact scorer in {auto} could reach here")
    same = math.isclose(runs["ours_fp32"][0][0], runs["lm_eval_b8"][0][0], rel_tol=1e-4)
    print(f"fp32 log-likelihoods agree within 1e-4: {same}")

if __name__ == "__main__":
    main()
