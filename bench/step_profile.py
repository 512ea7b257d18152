"""Where a training step's time goes: finetune_generative.py itself, timed by region.

    python bench/step_profile.py                                   # 124M, the script's defaults and --dropout 0
    python bench/step_profile.py --settings default --steps 6 --top-ops 15
    python bench/step_profile.py --precision bf16 --settings default,dropout0

Each setting runs the training script's own main() in a child process (bench/step_profile.py --child),
unchanged but for timers hooked onto its pieces (no code path differs from a plain run):

  data loader     fetching the step's micro-batches (finetune_generative.next_window; DataLoader workers
                  prefetch, so this is the wait for them)
  forward blocks  the transformer body (embeddings, every block, the final LayerNorm): a hook on the model's
                  .transformer; less the dropout masks drawn inside it
  dropout masks   drawing the keep masks (finetune.models.cpu_dropout.keep_mask), every dropout of the forward pass
  LM head         the vocabulary projection forward (hooks on .lm_head): the (tokens x vocab) logits
  loss            finetune.train.loss.next_token_loss: the chunked log-softmax, the loss and its gradient
  backward head   from .backward() to the moment the gradient reaches the transformer's output (a tensor
                  hook): the loss's backward and the LM head's two backward GEMMs
  backward blocks the rest of .backward(): every block's backward and the embeddings'
  clip            the gradient norm and clipping (the strategy's clip_gradients)
  optimizer       AdamW's step (optimizer step pre/post hooks)
  other           the rest of train_step (scaling the loss, zero_grad, the scheduler, the one host sync)

Each region's "at the roof" column is what the matrix multiplications of that region take when timed alone
at their real shapes on this machine, just before the runs (weight GEMMs as nn.Linear calls them, forward
X W^T, backward dY W and dY^T X, and attention's batched QK^T and PV, forward and backward; best of a few
repeats): the time a perfect implementation would need, which spends nothing outside those GEMMs. Regions
without matrix multiplications (masks, optimizer, data) cost nothing at that roof: they are pure overhead
to a GEMM-bound step. Peak RSS of each child is measured as bench/train_throughput.py does (VmHWM).

--top-ops N profiles one extra step with torch.profiler and prints the N operators with the most self CPU
time (that step is not in the region table: the profiler slows small ops).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_TOKENIZER_DIR,
    REPO,
    build_model_dir,
    loadavg,
    model_shape,
    run_polled,
    tail,
    wait_for_quiet,
    write_data_dir,
)

sys.path.insert(0, str(REPO))  # the child imports the training script itself

SETTINGS = {"default": [], "dropout0": ["--dropout", "0"]}
REGIONS = ("data loader", "forward blocks", "dropout masks", "LM head", "loss", "backward head", "backward blocks",
           "clip", "optimizer", "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=["gpt2", "small"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the training script's --precision (auto: what it picks on this machine)")
    p.add_argument("--settings", default="default,dropout0", help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=1, help="first steps left out (warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--top-ops", type=int, default=0, help="also profile one more step; print this many operators")
    p.add_argument("--extra", default="", help="more flags for finetune_generative.py, e.g. --extra=--torch-dropout")
    p.add_argument("--repo", default=str(REPO),
                   help="the checkout whose finetune_generative.py is timed (e.g. a worktree of the commit before a "
                        "change, for the profile before/after)")
    p.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR))
    p.add_argument("--work-dir", default="/tmp/finetune-bench")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--wait-quiet", type=float, default=30,
                   help="before each run, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON job of one instrumented run
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# The child: the training script with timers


class RegionTimer:
    """Seconds per region for each optimizer step. A step opens when its batches are fetched and closes when
    train_step returns; hooks that fire outside a step (the evaluations) are not counted."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.hidden_grad_at: float | None = None
        self.profile_step: int | None = None  # index of the step torch.profiler records (not timed)

    def open_step(self) -> None:
        self.current = dict.fromkeys(REGIONS, 0.0)
        self.current["step"] = 0.0
        self.usage_at_open = resource.getrusage(resource.RUSAGE_SELF)

    def close_step(self, start: float) -> None:
        """The step's wall time, and the CPU time and page faults of this process (all its threads) during it."""
        self.current["step"] = time.perf_counter() - start
        usage, before = resource.getrusage(resource.RUSAGE_SELF), self.usage_at_open
        self.current["user_cpu"] = usage.ru_utime - before.ru_utime
        self.current["system_cpu"] = usage.ru_stime - before.ru_stime
        self.current["page_faults"] = usage.ru_minflt - before.ru_minflt
        self.steps.append(self.current)
        self.current = None

    def add(self, region: str, seconds: float) -> None:
        if self.current is not None:
            self.current[region] += seconds

    @contextmanager
    def timed(self, region: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(region, time.perf_counter() - start)


def instrument(timer: RegionTimer, top_ops: int, steps: int) -> None:
    """Hook the timers onto the training script's pieces (each target checked to exist, so a moved function
    stops the benchmark instead of silently timing nothing)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    import finetune_generative as fg
    from finetune.models import cpu_dropout
    from finetune.train import build, loss
    from finetune.train.strategies import base

    def wrap(owner, name, make):
        if not hasattr(owner, name):
            raise SystemExit(f"step_profile: {owner.__name__}.{name} does not exist; update bench/step_profile.py")
        setattr(owner, name, make(getattr(owner, name)))

    def timed_function(region):
        def make(original):
            def timed_call(*args, **kwargs):
                with timer.timed(region):
                    return original(*args, **kwargs)
            return timed_call
        return make

    def next_window(original):
        def call(*args, **kwargs):
            timer.open_step()
            start = time.perf_counter()
            window = original(*args, **kwargs)
            timer.current["data loader"] = time.perf_counter() - start
            timer.current["_start"] = start
            return window
        return call

    def train_step(original):
        def call(*args, **kwargs):
            if len(timer.steps) == timer.profile_step:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    result = original(*args, **kwargs)
                print("STEP_PROFILE_OPS\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                       row_limit=top_ops), flush=True)
                timer.current["profiled"] = True
            else:
                result = original(*args, **kwargs)
            timer.close_step(timer.current.pop("_start"))
            return result
        return call

    def backward(original):
        def call(self, *args, **kwargs):
            timer.hidden_grad_at = None
            start = time.perf_counter()
            result = original(self, *args, **kwargs)
            end = time.perf_counter()
            reached = timer.hidden_grad_at or end
            timer.add("backward head", reached - start)
            timer.add("backward blocks", end - reached)
            return result
        return call

    def build_model(original):
        def call(*args, **kwargs):
            model, files = original(*args, **kwargs)
            add_model_hooks(model)
            return model, files
        return call

    def add_model_hooks(model):
        starts = {}

        def pre(name):
            def hook(module, args, kwargs=None):
                starts[name] = time.perf_counter()
            return hook

        def post(name):
            def hook(module, args, output):
                timer.add(name, time.perf_counter() - starts.pop(name))
                hidden = getattr(output, "last_hidden_state", None)
                if name == "forward blocks" and hidden is not None and hidden.requires_grad:
                    hidden.register_hook(mark_hidden_grad)
            return hook

        def mark_hidden_grad(grad):
            timer.hidden_grad_at = time.perf_counter()

        for name, module in (("forward blocks", model.transformer), ("LM head", model.lm_head)):
            module.register_forward_pre_hook(pre(name))
            module.register_forward_hook(post(name))

    optimizer_start = {}
    register_optimizer_step_pre_hook(lambda opt, a, k: optimizer_start.update(t=time.perf_counter()))
    register_optimizer_step_post_hook(lambda opt, a, k: timer.add("optimizer", time.perf_counter() - optimizer_start["t"]))
    wrap(fg, "next_window", next_window)
    wrap(fg, "train_step", train_step)
    wrap(torch.Tensor, "backward", backward)
    wrap(build, "build_model", build_model)
    wrap(loss, "next_token_loss", timed_function("loss"))
    wrap(cpu_dropout, "keep_mask", timed_function("dropout masks"))
    wrap(base.Strategy, "clip_gradients", timed_function("clip"))
    if top_ops:
        timer.profile_step = steps - 1


def run_child(job: dict) -> int:
    sys.path.insert(0, job["repo"])  # the checkout whose training script is timed (--repo)
    timer = RegionTimer()
    instrument(timer, job["top_ops"], job["steps"])
    import finetune_generative as fg

    rc = fg.main(job["flags"])
    # what the run trained in (--precision auto's choice is recorded in train_config.json)
    config = json.loads((Path(job["output_dir"]) / "train_config.json").read_text())
    precision = "bf16" if config["precision"] in ("bf16", "fp16") else "fp32"
    # the roof right after the steps, in the same process: the same moment of a shared machine's load
    roof = region_gemm_seconds(Path(job["model_dir"]), job["batch_size"], job["block_size"], precision)
    roof["precision"] = precision
    Path(job["result"]).write_text(json.dumps({"rc": rc, "steps": timer.steps, "roof": roof}))
    return rc


# -----------------------------------------------------------------------------
# The roof: each region's GEMMs alone, at their real shapes


def region_gemm_seconds(model_dir: Path, batch: int, seq: int, dtype_name: str, repeats: int = 2) -> dict:
    """Seconds the matrix multiplications of each region take alone (best of `repeats`, the first warming up),
    and their FLOPs."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    s = model_shape(model_dir)
    d, n_layer, n_head, vocab = s["n_embd"], s["n_layer"], s["n_head"], s["vocab_size"]
    tokens, head_dim = batch * seq, d // n_head
    block_linears = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # (in, out) of each block's weight matrices

    def linear_operands(k, n):
        return (torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(tokens, n, dtype=dtype))

    linears = {shape: linear_operands(*shape) for shape in [*block_linears, (d, vocab)]}
    q, k_, v = (torch.randn(batch * n_head, seq, head_dim, dtype=dtype) for _ in range(3))
    scores = torch.randn(batch * n_head, seq, seq, dtype=dtype)

    def linear_forward(shape):
        x, w, _ = linears[shape]
        torch.nn.functional.linear(x, w)

    def linear_backward(shape):
        x, w, dy = linears[shape]
        dy @ w
        dy.T @ x

    def attention_forward():
        torch.bmm(q, k_.transpose(1, 2))
        torch.bmm(scores, v)

    def attention_backward():  # d(scores) = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
        torch.bmm(q, v.transpose(1, 2))
        torch.bmm(scores.transpose(1, 2), q)
        torch.bmm(scores, k_)
        torch.bmm(scores.transpose(1, 2), q)

    work = {
        "forward blocks": lambda: [[linear_forward(sh) for sh in block_linears] + [attention_forward()]
                                   for _ in range(n_layer)],
        "LM head": lambda: linear_forward((d, vocab)),
        "backward head": lambda: linear_backward((d, vocab)),
        "backward blocks": lambda: [[linear_backward(sh) for sh in block_linears] + [attention_backward()]
                                    for _ in range(n_layer)],
    }
    attention_flops = 2 * 2 * batch * n_head * seq * seq * head_dim  # QK^T and PV
    block_flops = n_layer * (sum(2 * tokens * k * n for k, n in block_linears) + attention_flops)
    flops = {"forward blocks": block_flops, "LM head": 2 * tokens * d * vocab,
             "backward head": 4 * tokens * d * vocab, "backward blocks": 2 * block_flops}
    seconds = {}
    for region, fn in work.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        seconds[region] = best
    return {"seconds": seconds, "flops": flops}


# -----------------------------------------------------------------------------
# The parent: runs, then the table


def child_flags(args, setting: str, model_dir: Path, data_dir: Path, out_dir: Path) -> list[str]:
    flags = ["--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out_dir), "--overwrite",
             "--max-steps", str(args.steps + (1 if args.top_ops else 0)), "--batch-size", str(args.batch_size),
             "--block-size", str(args.block_size), "--log-every", "1", "--eval-every", "0", "--save-every", "0",
             "--save-total-limit", "1", "--eval-batches", "1", "--precision", args.precision, *SETTINGS[setting]]
    return flags + args.extra.split()


def summarize(steps: list[dict], skip: int) -> dict:
    measured = [s for s in steps[skip:] if not s.get("profiled")] or steps[-1:]
    mean = {key: statistics.mean(s[key] for s in measured)
            for key in (*REGIONS, "step", "user_cpu", "system_cpu", "page_faults")}
    mean["forward blocks"] -= mean["dropout masks"]  # drawn inside the blocks' forward: counted on its own
    inside = sum(mean[r] for r in REGIONS if r != "data loader" and r != "other")
    mean["other"] = mean["step"] - mean["data loader"] - inside
    return {"mean": mean, "steps": len(measured), "step_seconds": [s["step"] for s in measured]}


def print_table(results: dict, args) -> None:
    names = list(results)
    precisions = "/".join(sorted({r["roof"]["precision"] for r in results.values()}))
    print(f"\nseconds per step by region (share of the step), and the region's matmuls alone at their real shapes "
          f"({precisions}, {args.batch_size} x {args.block_size} tokens; measured in the same process after the steps)")
    print(f"{'region':16s}" + "".join(f"{name:>22s}{'at the roof':>13s}" for name in names) + f"{'GFLOP':>7s}")
    for region in (*REGIONS, "step"):
        cells = ""
        for n in names:
            mean, roof = results[n]["mean"], results[n]["roof"]
            at_roof = sum(roof["seconds"].values()) if region == "step" else roof["seconds"].get(region, 0.0)
            cells += f"{mean[region]:10.3f} s ({100 * mean[region] / mean['step']:5.1f} %){at_roof:11.3f} s"
        roof = results[names[0]]["roof"]
        flops = sum(roof["flops"].values()) if region == "step" else roof["flops"].get(region, 0)
        print(f"{region:16s}{cells}{flops / 1e9:7.0f}")
    for n in names:
        r, roof = results[n], results[n]["roof"]
        at_roof = sum(roof["seconds"].values())
        print(f"{n}: {r['steps']} steps measured ({', '.join(f'{s:.2f}' for s in r['step_seconds'])} s); its matmuls "
              f"alone {at_roof:.2f} s ({sum(roof['flops'].values()) / at_roof / 1e9:.0f} GFLOP/s), so the step runs at "
              f"{100 * at_roof / r['mean']['step']:.0f} % of that roof; CPU per step {r['mean']['user_cpu']:.2f} s "
              f"user + {r['mean']['system_cpu']:.2f} s system, {r['mean']['page_faults']:,.0f} page faults; "
              f"peak RSS {r['peak_rss_mib']:,.0f} MiB; other processes "
              f"{100 * r['foreign_cpu_share']:.0f} % of the CPUs; load average {r['load_before']:.1f} -> "
              f"{r['load_after']:.1f}")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child))
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or set(settings) - set(SETTINGS):
        raise SystemExit(f"--settings must name {' and/or '.join(SETTINGS)}, got {args.settings!r}")
    if args.skip >= args.steps:
        raise SystemExit("--skip must be smaller than --steps")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, work, Path(args.tokenizer_dir) if args.tokenizer_dir else None)
    data_dir = write_data_dir(work / f"data-{args.model}", model_dir)
    import torch

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    print(f"cpu {cpu_name()} ({os.cpu_count()} CPUs; {', '.join(isa) or 'no AVX2'}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}", flush=True)
    results = {}
    for setting in settings:
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        out_dir = work / f"step-profile-{setting}-{os.getpid()}"
        result_file = work / f"step-profile-{setting}-{os.getpid()}.json"
        job = {"flags": child_flags(args, setting, model_dir, data_dir, out_dir), "result": str(result_file),
               "top_ops": args.top_ops, "steps": args.steps, "model_dir": str(model_dir),
               "batch_size": args.batch_size, "block_size": args.block_size, "output_dir": str(out_dir),
               "repo": str(Path(args.repo).resolve())}
        log_path = work / f"step-profile-{setting}-{os.getpid()}.log"
        print(f"- {setting}: finetune_generative.py {' '.join(job['flags'])}", flush=True)
        polled = run_polled([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, log_path=log_path)
        log_text = log_path.read_text(errors="replace")
        if polled["rc"] != 0:
            print(f"  FAILED (rc {polled['rc']}):\n{tail(log_path, 30)}")
            return 1
        if "STEP_PROFILE_OPS" in log_text:
            table = log_text.split("STEP_PROFILE_OPS\n", 1)[1]
            print("\n".join(table.splitlines()[: args.top_ops + 4]))
        data = json.loads(result_file.read_text())
        results[setting] = {**summarize(data["steps"], args.skip), **polled, "roof": data["roof"]}
        shutil.rmtree(out_dir, ignore_errors=True)  # a 124M run folder is ~1 GB
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu": cpu_name(), "results": results,
                                               "load": loadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
