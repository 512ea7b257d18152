"""Generation speed: generate.py, a bare transformers model.generate(), and llama.cpp on export.py's GGUF.

    python bench/generate_speed.py                                  # 124M, batch 1 and 8, 64 new tokens, 2 rounds
    python bench/generate_speed.py --batches 1 --rounds 3 --llama-venv /work/venv-llama
    python bench/generate_speed.py --same-process 3 --new-tokens 24   # the decoding paths alone, in one process

Every run is its own process (the start-up is part of what a user waits for), the contenders alternate
round by round, and each run is split into three phases:

  start-up   process creation (the kernel's time, psutil) to the start of the first forward pass: the
             interpreter, imports, reading the flags, the tokenizer and the weights
  prompt     the first forward pass, over the whole prompt (prefill), and the first token's sampling:
             prompt tokens / s
  decoding   from the end of the first forward pass to the end of the last: every further token, one
             forward pass each (with the key/value cache) plus sampling; new tokens / s (per sequence)

  ours       `generate.py --model M --prompt-file P --max-new-tokens N` (--greedy at batch 1; at batch 8
             --num-samples 8, sampling at its default temperature 0.8), run by this script's child mode with
             forward hooks on the model it loads (nothing else changed), in the precision it picks
             (--precision auto: fp32 on a CPU without bf16 instructions)
  hf         the few lines a user writes: AutoTokenizer + AutoModelForCausalLM.from_pretrained (its default
             dtype: the checkpoint's, fp32) + model.generate() with the same settings (greedy, or
             do_sample with temperature 0.8, top_k 0, num_return_sequences 8, max_new_tokens N)
  llama-f16 / llama-q8_0
             llama.cpp (llama-cpp-python, its own venv: --llama-venv, built as bench/gguf_llamacpp.py does) on
             the GGUF file `export.py --outtype f16|q8_0` writes of the same model, --llama-threads (2), greedy, batch 1
             only (its high-level API decodes one sequence): Llama() load, eval(prompt), then one eval per token

The model is the 124M GPT-2 architecture with random weights (bench/_common.build_model_dir); a random model
rarely emits the end-of-text token, and each row says how many tokens it generated.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_TOKENIZER_DIR, REPO, build_model_dir, run_polled, tail  # noqa: E402

sys.path.insert(0, str(REPO))

LLAMA_WORKER = Path(__file__).resolve().parent / "_llamacpp_speed_worker.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=["gpt2", "small"])
    p.add_argument("--contenders", default="ours,hf,llama-f16,llama-q8_0")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (llama.cpp: 1 only)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128, help="about this many prompt tokens")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--llama-threads", type=int, default=2, help="llama.cpp's n_threads")
    p.add_argument("--llama-venv", default="/work/venv-llama", help="a venv whose python imports llama_cpp")
    p.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR))
    p.add_argument("--work-dir", default="/tmp/finetune-bench")
    p.add_argument("--json", default=None)
    p.add_argument("--same-process", type=int, default=0, metavar="ROUNDS",
                   help="instead: generate.py's generation path (finetune/infer/sampling.py, with and without its streamer) "
                        "and a bare model.generate() alternating ROUNDS times on one model in one process, batch 1 "
                        "greedy: the decoding paths alone, free of start-up and of the load's drift between processes")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Children: one generation each, phases stamped by forward hooks


class ForwardClock:
    """Wall-clock stamps of every forward pass of a model: [start of the first, end of each]."""

    def __init__(self):
        self.first_start: float | None = None
        self.ends: list[float] = []

    def attach(self, model) -> None:
        def pre(module, args):
            if self.first_start is None:
                self.first_start = time.time()

        def post(module, args, output):
            self.ends.append(time.time())

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)

    def result(self, job: dict) -> dict:
        import psutil

        return {"process_start": psutil.Process().create_time(), "first_forward_start": self.first_start,
                "forward_ends": self.ends, "done": time.time()}


def child_ours(job: dict) -> dict:
    import generate

    clock = ForwardClock()
    original = generate.load_weights

    def load_weights(*args, **kwargs):
        model = original(*args, **kwargs)
        clock.attach(model)
        return model

    generate.load_weights = load_weights
    flags = ["--model", job["model_dir"], "--prompt-file", job["prompt_file"], "--max-new-tokens",
             str(job["new_tokens"]), "--seed", "0", "--output", job["samples_file"]]
    flags += ["--greedy"] if job["batch"] == 1 else ["--num-samples", str(job["batch"])]
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            rc = generate.main(flags)
        finally:
            sys.stdout = stdout
    if rc != 0:
        raise SystemExit(f"generate.py exited {rc}")
    samples = [json.loads(line) for line in Path(job["samples_file"]).read_text().splitlines()]
    return {**clock.result(job), "new_tokens": max(s["new_tokens"] for s in samples),
            "precision": samples[0]["settings"]["precision"]}


def child_hf(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"])
    clock = ForwardClock()
    clock.attach(model)
    inputs = tokenizer(Path(job["prompt_file"]).read_text().strip(), return_tensors="pt")
    torch.manual_seed(0)
    settings = dict(do_sample=False) if job["batch"] == 1 else dict(do_sample=True, temperature=0.8, top_k=0,
                                                                      num_return_sequences=job["batch"])
    out = model.generate(**inputs, max_new_tokens=job["new_tokens"], pad_token_id=tokenizer.eos_token_id, **settings)
    return {**clock.result(job), "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
            "precision": str(model.dtype).replace("torch.float32", "fp32")}


def run_child(job: dict) -> int:
    result = {"ours": child_ours, "hf": child_hf}[job["contender"]](job)
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# -----------------------------------------------------------------------------
# The parent


def phases(result: dict, prompt_tokens: int, batch: int) -> dict:
    """Start-up, prompt and decoding seconds and rates from one child's stamps."""
    ends = result["forward_ends"]
    startup = result["first_forward_start"] - result["process_start"]
    prompt = ends[0] - result["first_forward_start"]
    decode = ends[-1] - ends[0]
    decoded = result["new_tokens"] - 1  # the first new token comes from the prompt's forward pass
    return {"startup_s": startup, "prompt_s": prompt, "prompt_tok_s": prompt_tokens * batch / prompt,
            "decode_s": decode, "decode_tok_s": decoded / decode if decode > 0 else float("nan"),
            "new_tokens": result["new_tokens"], "total_s": result["done"] - result["process_start"],
            "precision": result.get("precision")}


def write_prompt(path: Path, model_dir: Path, n_tokens: int) -> int:
    """About n_tokens of real prose, on one line; returns its exact token count."""
    import pydoc_data.topics as topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = " ".join(topics.topics["assignment"].split()).split(" ")
    text = ""
    for i in range(len(words)):
        candidate = " ".join(words[: i + 1])
        if len(tokenizer(candidate)["input_ids"]) > n_tokens:
            break
        text = candidate
    path.write_text(text + "\n")
    return len(tokenizer(text)["input_ids"])


def gguf_file(model_dir: Path, outtype: str) -> Path:
    path = model_dir / f"model-{outtype}.gguf"
    if not path.is_file():
        subprocess.run([sys.executable, str(REPO / "export.py"), "--model", str(model_dir), "--outtype", outtype,
                        "--output", str(path)], check=True, capture_output=True)
    return path


def run_llama(args, path: Path, prompt_ids: list[int], log_path: Path) -> dict | None:
    python = Path(args.llama_venv) / "bin" / "python"
    job = json.dumps({"path": str(path), "token_ids": prompt_ids, "n": args.new_tokens, "threads": args.llama_threads})
    polled = run_polled([str(python), str(LLAMA_WORKER), job], log_path=log_path)
    if polled["rc"] != 0:
        print(f"  llama.cpp failed (rc {polled['rc']}):\n{tail(log_path)}")
        return None
    lines = log_path.read_text().splitlines()
    result = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    ph = {"startup_s": result["loaded"] - result["process_start"],
          "prompt_s": result["prompt_done"] - result["loaded"],
          "decode_s": result["done"] - result["prompt_done"], "new_tokens": len(result["tokens"]),
          "total_s": result["done"] - result["process_start"], "precision": path.stem.split("-")[-1]}
    ph["prompt_tok_s"] = len(prompt_ids) / ph["prompt_s"]
    ph["decode_tok_s"] = (ph["new_tokens"] - 1) / ph["decode_s"]
    return {**ph, "peak_rss_mib": polled["peak_rss_mib"], "foreign_cpu_share": polled["foreign_cpu_share"]}


def same_process(args, model_dir: Path, prompt: str) -> None:
    """generate.py's path and the bare call, alternating on one model: seconds for --new-tokens greedy tokens."""
    import contextlib
    import io

    import torch
    from transformers import TextStreamer

    from finetune.infer.sampling import generate_samples, generation_kwargs
    from finetune.models.loading import load_tokenizer, load_weights

    tokenizer = load_tokenizer(str(model_dir))
    model = load_weights(str(model_dir), torch.float32).eval()
    settings = generation_kwargs(model, tokenizer, max_new_tokens=args.new_tokens, greedy=True)

    def ours(stream: bool):
        with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode():  # as generate.py's run()
            streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
            generate_samples(model, tokenizer, prompt, settings, num_samples=1, seed=0, device=torch.device("cpu"),
                             streamer=streamer)

    def bare():
        inputs = tokenizer(prompt, return_tensors="pt")
        model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    contenders = {"generate.py's path, streamed (batch 1)": lambda: ours(True), "bare model.generate()": bare,
                  "generate.py's path, not streamed": lambda: ours(False)}
    seconds = {name: [] for name in contenders}
    for round_no in range(1, args.same_process + 1):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            print(f"  round {round_no} {name}: {seconds[name][-1]:.2f} s", flush=True)
    print(f"\n{args.new_tokens} greedy tokens, one model, one process (prompt and decoding; fp32)")
    for name, runs in seconds.items():
        print(f"{name:40s} median {statistics.median(runs):6.2f} s (runs {', '.join(f'{r:.2f}' for r in runs)})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child))
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, work, Path(args.tokenizer_dir))
    prompt_file = work / "generate-prompt.txt"
    prompt_tokens = write_prompt(prompt_file, model_dir, args.prompt_tokens)
    if args.same_process:
        same_process(args, model_dir, prompt_file.read_text().strip())
        return 0
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(prompt_file.read_text().strip())["input_ids"]
    llama_ok = (Path(args.llama_venv) / "bin" / "python").exists()
    ggufs = {c: gguf_file(model_dir, c.split("-", 1)[1]) for c in contenders if c.startswith("llama-") and llama_ok}
    print(f"model {model_dir.name}, prompt {prompt_tokens} tokens, {args.new_tokens} new tokens, batches {batches}, "
          f"{args.rounds} round(s); llama.cpp venv {'found' if llama_ok else 'MISSING: llama.cpp left out'}",
          flush=True)
    rows = []
    for round_no in range(1, args.rounds + 1):
        for batch in batches:
            for name in contenders:
                if name.startswith("llama-") and (batch != 1 or name not in ggufs):
                    continue
                log_path = work / f"generate-{name}-{batch}.log"
                if name.startswith("llama-"):
                    ph = run_llama(args, ggufs[name], prompt_ids, log_path)
                    if ph is None:
                        continue
                else:
                    result_file = work / f"generate-{name}-{batch}.json"
                    job = {"contender": name, "batch": batch, "model_dir": str(model_dir),
                           "prompt_file": str(prompt_file), "new_tokens": args.new_tokens, "result": str(result_file),
                           "samples_file": str(work / f"generate-{name}-{batch}.jsonl")}
                    polled = run_polled([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                                        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, log_path=log_path)
                    if polled["rc"] != 0:
                        print(f"  {name} batch {batch} failed:\n{tail(log_path)}")
                        return 1
                    ph = {**phases(json.loads(result_file.read_text()), prompt_tokens, batch),
                          "peak_rss_mib": polled["peak_rss_mib"], "foreign_cpu_share": polled["foreign_cpu_share"]}
                row = {"contender": name, "batch": batch, "round": round_no, **ph}
                rows.append(row)
                print(f"  round {round_no} batch {batch} {name:10s} start-up {ph['startup_s']:6.2f} s, prompt "
                      f"{ph['prompt_s']:6.3f} s ({ph['prompt_tok_s']:7.0f} tok/s), decoding {ph['decode_s']:6.2f} s "
                      f"({ph['decode_tok_s']:6.1f} tok/s per sequence, {ph['new_tokens']} tokens), total "
                      f"{ph['total_s']:6.2f} s, peak RSS {ph['peak_rss_mib']:,.0f} MiB, other processes "
                      f"{100 * ph['foreign_cpu_share']:.0f} % of the CPUs", flush=True)
    print_summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


def print_summary(rows: list[dict]) -> None:
    print("\nmedians over the rounds")
    print(f"{'batch':>5s} {'contender':10s} {'precision':>9s} {'start-up s':>10s} {'prompt s':>9s} {'prompt tok/s':>12s} "
          f"{'decode tok/s':>12s} {'total s':>8s} {'peak RSS MiB':>12s}")
    keys = sorted({(r["batch"], r["contender"]) for r in rows}, key=lambda k: (k[0], rows.index(
        next(r for r in rows if (r["batch"], r["contender"]) == k))))
    for batch, name in keys:
        mine = [r for r in rows if r["batch"] == batch and r["contender"] == name]

        def med(key, mine=mine):
            return statistics.median(r[key] for r in mine)

        print(f"{batch:5d} {name:10s} {mine[0]['precision'] or '?':>9s} {med('startup_s'):10.2f} {med('prompt_s'):9.3f} "
              f"{med('prompt_tok_s'):12.0f} {med('decode_tok_s'):12.1f} {med('total_s'):8.2f} "
              f"{max(r['peak_rss_mib'] for r in mine):12,.0f}")


if __name__ == "__main__":
    sys.exit(main())
