"""Shared pieces of the benchmarks: random-weight models, token data, FLOP counts, matmul peak,
and a subprocess runner that polls peak memory.

Nothing here downloads anything: the 124M model is built from the GPT-2 architecture config in
../shared/gpt2-tokenizer (or from `GPT2Config()` defaults when that folder is absent) with random
weights; speed does not depend on the weights.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_DIR = REPO.parent / "shared" / "gpt2-tokenizer"

# name -> overrides of the GPT-2 config. "gpt2" is the 124M architecture unchanged.
MODELS = {
    "gpt2": {},
    "small": {"n_layer": 6, "n_embd": 384, "n_head": 6},
    # The bigger GPT-2 architectures (random weights; bench/lora_throughput.py).
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
}


# -----------------------------------------------------------------------------
# Model and data


def _fallback_tokenizer():
    """A 50,257-entry word-level tokenizer with <|endoftext|> = 50256, for machines without the GPT-2
    tokenizer files. Only its size and special ids matter to a speed benchmark."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(50256)}
    vocab["<|endoftext|>"] = 50256
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_model_dir(name: str, root: Path, tokenizer_dir: Path | None = DEFAULT_TOKENIZER_DIR,
                    activation: str | None = None) -> Path:
    """A folder with a random-weight model (seed 0) and its tokenizer; reused if already built."""
    folder = Path(root) / f"model-{name}{'-' + activation if activation else ''}"
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

    if tokenizer_dir is not None and (Path(tokenizer_dir) / "config.json").is_file():
        config = AutoConfig.from_pretrained(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        config = GPT2Config()
        tokenizer = _fallback_tokenizer()
    for key, value in MODELS[name].items():
        setattr(config, key, value)
    if activation:
        config.activation_function = activation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def write_data_dir(folder: Path, model_dir: Path, train_tokens: int = 400_000, val_tokens: int = 2_048,
                   seed: int = 0) -> Path:
    """train.bin/val.bin of uniformly random token ids (< 50257) and a meta.json that dataset.load_meta
    accepts. Speed does not depend on the ids. The val split is tiny on purpose (eval time is not what
    the benchmark measures)."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from dataset import META_FORMAT, META_VERSION, load_meta, tokenizer_fingerprint

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if (meta["tokenizer"]["fingerprint"] == fingerprint and meta["splits"]["train"]["tokens"] == train_tokens
                    and meta["splits"]["val"]["tokens"] == val_tokens):
                load_meta(folder)
                return folder
        except Exception:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    train = rng.integers(0, vocab - 1, size=train_tokens, dtype=np.uint16)
    val = rng.integers(0, vocab - 1, size=val_tokens, dtype=np.uint16)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    meta = {
        "format": META_FORMAT, "version": META_VERSION, "dtype": "uint16", "vocab_size": vocab,
        "eos_token_id": tokenizer.eos_token_id, "max_token_id": int(max(train.max(), val.max())),
        "tokenizer": {"name_or_path": str(model_dir), "fingerprint": fingerprint},
        "splits": {"train": {"file": "train.bin", "tokens": train_tokens},
                   "val": {"file": "val.bin", "tokens": val_tokens}},
        "sources": [], "split": {"policy": "benchmark: uniform random ids", "seed": seed},
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    load_meta(folder)
    return folder


def model_shape(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {"n_layer": cfg["n_layer"], "n_embd": cfg["n_embd"], "n_head": cfg["n_head"],
            "vocab_size": cfg["vocab_size"], "n_positions": cfg["n_positions"]}


def count_params(model_dir: Path) -> tuple[int, int]:
    """(all parameters, parameters without the position embeddings). The tied wte/lm_head counts once."""
    s = model_shape(model_dir)
    d, L, V, P = s["n_embd"], s["n_layer"], s["vocab_size"], s["n_positions"]
    per_layer = 12 * d * d + 13 * d  # qkv 3d^2+3d, proj d^2+d, fc 4d^2+4d, proj 4d^2+d, 2 LN 4d
    total = V * d + P * d + L * per_layer + 2 * d
    return total, total - P * d


def training_flops_per_token(model_dir: Path, seq: int) -> tuple[float, str]:
    """Training FLOPs per token (forward + backward), the PaLM / nanoGPT convention:
        6 * N + 12 * n_layer * n_embd * seq
    N = parameters without position embeddings (the lm_head matmul is counted once through the tied
    wte). 6N = 2 (fwd) + 4 (bwd) FLOPs per weight; the second term is attention scores and
    attention-weighted values (QK^T and AV, fwd+bwd, no causal-mask discount). Recomputation
    (gradient checkpointing) is not counted: MFU counts useful work only."""
    s = model_shape(model_dir)
    _, n = count_params(model_dir)
    return 6 * n + 12 * s["n_layer"] * s["n_embd"] * seq, "6*N + 12*n_layer*n_embd*seq (N excludes wpe)"


# -----------------------------------------------------------------------------
# Peak of this machine


def matmul_peak(device: str = "cpu", seconds: float = 2.0, sizes=(2048, 4096)) -> dict:
    """Best sustained GFLOP/s of a square matmul, bf16 and fp32, over a few sizes (best of 3 repeats).

    This is the roof the MFU figures use: what torch's own GEMM reaches on this machine, not a
    datasheet number."""
    import torch

    result = {}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            sync(device)
            start = time.perf_counter()
            a @ b  # the warm-up, timed: a dtype without fast kernels (bf16 on CPUs without AVX512-BF16 or AMX)
            sync(device)  # can take minutes per product at 4096, so it is not repeated nor taken to larger sizes
            warm_up = time.perf_counter() - start
            if warm_up > seconds:
                best = max(best, 2 * n ** 3 / warm_up / 1e9)
                del a, b
                break
            for _ in range(3):
                sync(device)
                start, count = time.perf_counter(), 0
                while time.perf_counter() - start < seconds / 3 or count < 2:
                    a @ b
                    count += 1
                sync(device)
                best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9)
            del a, b
        result[dtype_name] = best
    return result


def model_gemm_peak(model_dir: Path, tokens: int, device: str = "cpu", dtype_name: str = "bf16",
                    repeats: int = 3) -> float:
    """GFLOP/s of the GEMMs one training step of this model really does, at their real shapes.

    For every weight matrix (qkv, attention out, MLP in/out per layer, and the vocabulary projection) the
    forward X @ W, and the backward dY @ W^T and X^T @ dY, with X of `tokens` rows. Attention's own
    batched matmuls are left out. This is the roof for a step of this size: a perfect implementation that
    spends no time outside these GEMMs would reach it. Best of `repeats`."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    s = model_shape(model_dir)
    d, V = s["n_embd"], s["vocab_size"]
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * s["n_layer"] + [(d, V)]
    distinct = sorted(set(shapes))
    tensors = {}
    for k, n in distinct:
        tensors[(k, n)] = (torch.randn(tokens, k, dtype=dtype, device=device),
                           torch.randn(k, n, dtype=dtype, device=device),
                           torch.randn(tokens, n, dtype=dtype, device=device))

    def one_step():
        for k, n in shapes:
            x, w, dy = tensors[(k, n)]
            x @ w
            dy @ w.T
            x.T @ dy

    one_step()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        one_step()
        sync(device)
        best = min(best, time.perf_counter() - start)
    flops = sum(3 * 2 * tokens * k * n for k, n in shapes)
    return flops / best / 1e9


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine since boot, wall-clock now), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan"), time.time()
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), time.time()


def wait_for_quiet(max_wait: float, threshold: float = 0.15, sample: float = 3.0) -> float:
    """Wait (up to max_wait s) until other work uses less than `threshold` of the machine's CPUs over a
    `sample`-second window. Returns the busy share of the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_seconds()
        time.sleep(sample)
        b1, t1 = cpu_busy_seconds()
        share = (b1 - b0) / ((t1 - t0) * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() >= deadline:
            return share
        time.sleep(2.0)


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -----------------------------------------------------------------------------
# Subprocesses with memory polling


def run_polled(cmd: list[str], env: dict | None = None, interval: float = 1.0, log_path: Path | None = None,
               timeout: float | None = None) -> dict:
    """Run `cmd` and measure its memory.

    peak_rss_mib: the kernel's high-water mark of the child's resident memory. ru_maxrss (wait4) alone is
    wrong when this process is large: a child starts as a copy of its parent, and the kernel carries that
    copy's resident size into the child's ru_maxrss across exec, so a 2 GB parent reports 2 GB for any
    child. So VmHWM (/proc/PID/status, the high-water mark of the program's own memory, reset at exec) is
    read every 50 ms while it runs, and ru_maxrss counts only when it exceeds this process's own peak at
    the start (then it can only be the child's, or that of the descendants it reaped, e.g. DataLoader
    workers, whichever is larger, not their sum). What the last 50 ms of a child below that size add is
    not seen.
    peak_tree_mib: polled every `interval` s (cheap; can miss sub-second spikes): main RSS + the USS of
    its children at the same instant (a forked worker's shared pages are counted once).
    Also the wall time, the run's own CPU seconds, foreign_cpu_share (the share of the machine's CPUs
    that *other* processes used meanwhile: the contention this run suffered), and the load average."""
    import psutil

    load_before = loadavg()
    busy_before, _ = cpu_busy_seconds()
    inherited_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the most a child's ru_maxrss inherits
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    peaks = {"tree": 0}
    stop = threading.Event()

    def poll():
        try:
            p = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.wait(interval):
            try:
                tree = p.memory_info().rss
                for child in p.children(recursive=True):
                    try:
                        tree += child.memory_full_info().uss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peaks["tree"] = max(peaks["tree"], tree)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout if timeout else None
    hwm = 0.0  # MiB, VmHWM as last read
    try:
        while True:
            hwm = max(hwm, vm_hwm_mib(proc.pid) or 0.0)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline and time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
    except BaseException:  # Ctrl-C: take the run and its DataLoader workers down too
        kill_group(proc.pid)
        raise
    kill_group(proc.pid)  # leftover workers of a killed run
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if log_path:
        out.close()
    # ru_maxrss is KiB on Linux; at or below what the child may have inherited it says nothing of the child
    peak_rss = max(hwm, usage.ru_maxrss / 1024 if usage.ru_maxrss > inherited_kib else 0.0)
    busy_after, _ = cpu_busy_seconds()
    # CPU time the rest of the machine used while this ran, as a share of all CPUs: the contention.
    own = usage.ru_utime + usage.ru_stime
    foreign = max(0.0, (busy_after - busy_before) - own) / (wall * (os.cpu_count() or 1))
    return {"rc": rc, "wall_s": wall, "cpu_s": own, "foreign_cpu_share": foreign, "peak_rss_mib": peak_rss,
            "peak_tree_mib": max(peaks["tree"] / 2**20, peak_rss),
            "load_before": load_before, "load_after": loadavg()}


def vm_hwm_mib(pid: int) -> float | None:
    """The peak resident memory of a running process's program (VmHWM), in MiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def kill_group(pgid: int) -> None:
    import signal
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def write_jsonl_of(path: Path, n_bytes: int, record, per_block: int, seed: int = 0) -> int:
    """JSON lines of `record(rng, source, number)` until the file holds n_bytes (written `per_block` at a time);
    returns how many. `source` is the text of CPython's bundled pydoc topics, for realistic prose."""
    import pydoc_data.topics as topics
    import random

    source = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    rng = random.Random(seed)
    written = count = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            lines = []
            for _ in range(per_block):
                lines.append(json.dumps(record(rng, source, count), ensure_ascii=False))
                count += 1
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    return count


def prepare_rss_main(doc: str, default_mb: float, stem: str, what: str, write, sizes_of: tuple[str, ...] = ()) -> None:
    """The main() of the prepare_*_rss benchmarks: write --mb MB of JSON lines with `write(path, n_bytes)` (it
    returns how many `what` it wrote), run prepare_data.py on them in a subprocess (anything else on the
    command line goes to it), and report the wall time, the child's peak RSS (run_polled) and the sizes
    of the outputs named in `sizes_of`."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=default_mb, help="MB of JSON lines (default: %(default)s)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER_DIR))
    parser.add_argument("--workdir", default=None, help="keep the input and outputs here (default: a temp dir)")
    args, extra = parser.parse_known_args()  # anything else goes to prepare_data.py

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / f"{stem}_{args.mb:g}mb.jsonl"
        started = time.perf_counter()
        count = write(path, int(args.mb * 1e6))
        print(f"wrote {path.stat().st_size / 1e6:.1f} MB, {count:,} {what} in {time.perf_counter() - started:.0f} s")
        cmd = [sys.executable, str(REPO / "prepare_data.py"), "--input", str(path), "--tokenizer", args.tokenizer,
               "--output-dir", str(work / "data"), "--overwrite", *extra]
        log = work / "prepare.log"
        result = run_polled(cmd, log_path=log)
        if result["rc"] != 0:
            sys.exit(f"prepare_data.py failed:\n{tail(log, 40)}")
        sizes = "".join(f"; {name} {(work / 'data' / name).stat().st_size / 1e6:.1f} MB" for name in sizes_of)
        lines = log.read_text(errors="replace").splitlines()
    summary = lines[max((i for i, line in enumerate(lines) if line.startswith("wrote ")), default=0):]
    print(f"prepare_data.py {' '.join(extra)}".rstrip() + f": {result['wall_s']:.0f} s wall, peak RSS "
          f"{result['peak_rss_mib']:.0f} MiB{sizes}")
    print("summary:\n  " + "\n  ".join(summary))


def steady_tokens_per_s(step_times: list[float], tokens_per_step: int, skip: int) -> tuple[float, float]:
    """(tokens/s over the steps after the first `skip`, median step seconds of those steps)."""
    measured = step_times[skip:] or step_times[-1:]
    if not measured:
        return float("nan"), float("nan")
    return tokens_per_step * len(measured) / sum(measured), float(np.median(measured))


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
