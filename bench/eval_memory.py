"""Peak memory of evaluate.py on large raw text (--input is read, tokenized and scored streamingly).

    python bench/eval_memory.py                          # 10 MB and 100 MB text files
    python bench/eval_memory.py --mb 10 100 300 --repo ../other-checkout   # another checkout's evaluate.py

Builds, in --workdir, a tiny byte-level BPE tokenizer (512 entries, trained on the Python documentation bundled
with CPython) and a tiny GPT-2 (1 layer, 32 wide, 256-token context, random weights): the model is small so
that a 100 MB file is scored in minutes on a CPU; what is measured is what evaluate.py holds besides the model.
OMP_NUM_THREADS is 1 unless set (on a loaded 2-core machine one thread scored 5x faster than two).
Writes one text file per --mb (random slices of that documentation, each file one document: the case where a
reader that holds a document whole holds the whole file), then runs `evaluate.py --model M --input FILE` in a
subprocess and reports its wall time and peak RSS (bench/_common.run_polled: VmHWM polled every 50 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, run_polled, tail  # noqa: E402

CONTEXT = 256


def documentation() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def build_model(folder: Path) -> Path:
    """The tiny tokenizer and model (reused when already built)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = documentation()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], vocab_size=512,
                            min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.model_max_length = CONTEXT
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def write_text(path: Path, n_bytes: int, seed: int = 0) -> None:
    """n_bytes of random slices (200 to 4,000 characters) of the documentation, one file, one document."""
    if path.is_file() and path.stat().st_size >= n_bytes:
        return
    source = documentation()
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            start, length = rng.randrange(len(source) - 4000), rng.randint(200, 4000)
            block = source[start:start + length] + "\n\n"
            f.write(block)
            written += len(block.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[10, 100], help="sizes of the text files (MB)")
    parser.add_argument("--workdir", default="/tmp/bench-eval-memory", help="model, inputs and reports go here")
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose evaluate.py runs (default: this one)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args, extra = parser.parse_known_args()  # anything else goes to evaluate.py (e.g. --nproc 2)

    work = Path(args.workdir)
    model = build_model(work / "model")
    rows = []
    for mb in args.mb:
        text = work / f"text_{mb:g}mb.txt"
        write_text(text, int(mb * 1e6))
        out, log = work / f"eval_{mb:g}mb", work / f"eval_{mb:g}mb.log"
        cmd = [sys.executable, str(Path(args.repo) / "evaluate.py"), "--model", str(model), "--input", str(text),
               "--output", str(out), "--device", "cpu", "--precision", "fp32", *extra]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        result = run_polled(cmd, env=env, log_path=log, timeout=args.timeout)
        if result["rc"] != 0:
            print(f"{mb:g} MB: evaluate.py failed (exit {result['rc']}):\n{tail(log, 20)}")
            rows.append((mb, None, result))
            continue
        figures = json.loads((out / "eval.json").read_text(encoding="utf-8"))["evaluations"][0]["results"]
        figures = next(iter(figures.values()))["figures"]
        rows.append((mb, figures, result))
        print(f"{mb:g} MB: {figures['tokens']:,} tokens, bits per byte {figures['bits_per_byte']:.4f}; "
              f"{result['wall_s']:.0f} s wall, peak RSS {result['peak_rss_mib']:.0f} MiB "
              f"(process tree {result['peak_tree_mib']:.0f} MiB), load {result['load_before']:.1f}-"
              f"{result['load_after']:.1f}", flush=True)
    print("\n| text file | tokens | wall | peak RSS |\n|---|---|---|---|")
    for mb, figures, result in rows:
        tokens = f"{figures['tokens']:,}" if figures else "failed"
        print(f"| {mb:g} MB | {tokens} | {result['wall_s']:.0f} s | {result['peak_rss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
