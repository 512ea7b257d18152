"""export.py --to gguf against llama.cpp itself, and against llama.cpp's own converter.

    python bench/gguf_llamacpp.py --venv /tmp/llamacpp-venv --work /tmp/gguf-bench

Installs llama-cpp-python into its own venv (--venv; it compiles llama.cpp from source, several minutes;
skipped when the venv already imports llama_cpp) and takes llama.cpp's converter, convert_hf_to_gguf.py,
from the same release's sdist (`pip download --no-binary :all: --no-deps llama-cpp-python`). Then, on
random-weight models (no download: the 124M GPT-2 architecture from ../shared/gpt2-tokenizer with its real
tokenizer, and tiny GPT-2, Llama and Qwen2 configs with that tokenizer):

1. every file loads in llama.cpp, which tokenizes the prompt to the same ids as the HF tokenizer;
2. llama.cpp's last-position logits for the prompt vs the HF model's (max abs), for our files in
   f32/f16/q8_0 and for the converter's files of the same model;
3. our tensors vs the converter's (names, shapes, types; data bitwise in f32 and f16) and metadata;
   time and peak RSS of both on the 124M model;
4. 32 greedy tokens of llama.cpp on our f32 file vs `generate.py --greedy`;
5. a chat model (ChatML template) answers through llama.cpp's chat API with the embedded template.

Writes work/results.json and prints a Markdown summary (docs/export.md has the figures of one run).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_TOKENIZER_DIR, REPO, build_model_dir, run_polled  # noqa: E402

PROMPT = "The ship left the harbour at dawn, and the captain"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORKER = Path(__file__).resolve().parent / "_llamacpp_worker.py"
OUTTYPES = ("f32", "f16", "q8_0")


# -----------------------------------------------------------------------------
# llama.cpp: the Python binding in its own venv, the converter from the sdist


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_llamacpp(venv: Path, log: Path) -> str:
    """The llama-cpp-python version in `venv`, installed there first when missing."""
    check = [str(venv_python(venv)), "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    if venv_python(venv).exists():
        found = subprocess.run(check, capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.strip()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"installing llama-cpp-python into {venv} (builds llama.cpp; log: {log})", flush=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
           "CMAKE_ARGS": "-DLLAVA_BUILD=OFF"}  # the multimodal library is not needed here
    with open(log, "w") as out:
        subprocess.run(["nice", str(venv_python(venv)), "-m", "pip", "install", "-v", "llama-cpp-python", "numpy"],
                       stdout=out, stderr=subprocess.STDOUT, env=env, check=True)
    return subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip()


def ensure_converter(venv: Path, version: str, work: Path) -> Path:
    """convert_hf_to_gguf.py of the same llama.cpp (with its conversion/ package and gguf-py)."""
    src = work / f"llama.cpp-{version}"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src / "convert_hf_to_gguf.py"
    sdist = work / "sdist"
    if not list(sdist.glob(f"llama_cpp_python-{version}.tar.gz")):
        subprocess.run([str(venv_python(venv)), "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(sdist)], check=True, capture_output=True)
    (archive,) = sdist.glob(f"llama_cpp_python-{version}.tar.gz")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(src, members=members, filter="data")
    return src / "convert_hf_to_gguf.py"


def llamacpp(venv: Path, job: dict) -> dict:
    done = subprocess.run([str(venv_python(venv)), str(WORKER)], input=json.dumps(job), capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed on {job.get('path')}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


# -----------------------------------------------------------------------------
# Models (random weights, the real GPT-2 tokenizer)


def tiny_model(work: Path, kind: str, tokenizer_dir: Path) -> Path:
    folder = work / f"model-tiny-{kind}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "chat":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    vocab = len(tokenizer)
    small = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=50256, eos_token_id=50256)
    config = {"gpt2": lambda: GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2),
              "chat": lambda: GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2),
              "llama": lambda: LlamaConfig(**small), "qwen2": lambda: Qwen2Config(**small)}[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms and biases away from 1 and 0, so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def with_n_ctx(folder: Path, work: Path) -> Path:
    """A copy whose config.json has `n_ctx`, which llama.cpp's converter reads for GPT-2 and transformers 5 no
    longer writes (the converter fails on the folder as saved)."""
    copy = work / f"{folder.name}-with-n_ctx"
    if not copy.exists():
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.gguf", "Modelfile"))
        config = json.loads((copy / "config.json").read_text())
        if config.get("model_type") == "gpt2":
            config["n_ctx"] = config["n_positions"]
        (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def hf_last_logits(folder: Path, token_ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1].numpy()


# -----------------------------------------------------------------------------
# Writing the files, ours and the converter's


def measured(cmd: list[str], log: Path) -> dict:
    """Wall time and peak RSS of `cmd`. The peak is GNU time's %M (the command's own high-water mark): this
    process holds a model by then, and a child forked from it starts with its resident size counted
    (Linux carries ru_maxrss across fork and exec), so run_polled's ru_maxrss would report ours."""
    run = run_polled(["/usr/bin/time", "-f", "peak_rss_kib=%M", *cmd], log_path=log, interval=0.2)
    peaks = [line.split("=", 1)[1] for line in log.read_text().splitlines() if line.startswith("peak_rss_kib=")]
    run["peak_rss_mib"] = int(peaks[-1]) / 1024 if peaks else None
    return run


def export_ours(folder: Path, outtype: str, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "export.py"), "--model", str(folder), "--to", "gguf", "--outtype", outtype,
           "--output", str(out), "--overwrite"]
    run = measured(cmd, out.with_suffix(".log"))
    if run["rc"] != 0:
        raise RuntimeError(f"export.py failed: {out.with_suffix('.log').read_text()[-2000:]}")
    return run


def export_theirs(converter: Path, folder: Path, outtype: str, out: Path) -> dict:
    cmd = [sys.executable, str(converter), str(folder), "--outtype", outtype, "--outfile", str(out)]
    run = measured(cmd, out.with_suffix(".log"))
    if run["rc"] != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {out.with_suffix('.log').read_text()[-2000:]}")
    return run


# -----------------------------------------------------------------------------
# Comparisons


def compare_files(ours: Path, theirs: Path) -> dict:
    """Tensors (names, shapes, types, bytes) and metadata of two GGUF files."""
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    common = sorted(set(ta) & set(tb))
    result = {"tensors_only_ours": sorted(set(ta) - set(tb)), "tensors_only_theirs": sorted(set(tb) - set(ta)),
              "shape_differs": [n for n in common if list(ta[n].shape) != list(tb[n].shape)],
              "type_differs": [f"{n}: {ta[n].tensor_type.name} vs {tb[n].tensor_type.name}" for n in common
                               if ta[n].tensor_type != tb[n].tensor_type],
              "data_differs": [n for n in common if not np.array_equal(np.asarray(ta[n].data).view(np.uint8),
                                                                       np.asarray(tb[n].data).view(np.uint8))],
              "n_tensors": [len(ta), len(tb)]}
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    result["metadata_only_ours"] = sorted(set(fa) - set(fb))
    result["metadata_only_theirs"] = sorted(set(fb) - set(fa))
    result["metadata_differs"] = {k: [short(fa[k]), short(fb[k])] for k in sorted(set(fa) & set(fb)) if fa[k] != fb[k]}
    return result


def short(value):
    return f"[{len(value)} items]" if isinstance(value, list) and len(value) > 8 else value


def logits_check(venv: Path, path: Path, token_ids: list[int], reference) -> dict:
    import numpy as np

    got = llamacpp(venv, {"op": "logits", "path": str(path), "token_ids": token_ids, "text": PROMPT})
    logits = np.array(got["logits"][:len(reference)])
    return {"max_abs": float(np.abs(logits - reference).max()), "same_token_ids": got["own_token_ids"] == token_ids,
            "argmax_equal": int(logits.argmax()) == int(reference.argmax())}


def greedy_check(venv: Path, folder: Path, path: Path, token_ids: list[int], work: Path) -> dict:
    samples = work / "generate-greedy.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model", str(folder), "--prompt", PROMPT,
                           "--greedy", "--max-new-tokens", "32", "--precision", "fp32", "--device", "cpu",
                           "--output", str(samples)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"generate.py failed: {done.stderr[-2000:]}")
    ours = json.loads(samples.read_text().splitlines()[0])
    theirs = llamacpp(venv, {"op": "greedy", "path": str(path), "token_ids": token_ids, "n": 32})
    return {"generate_py": ours["completion"], "llama_cpp": theirs["text"],
            "equal": ours["completion"] == theirs["text"], "llama_cpp_tokens": len(theirs["tokens"])}


def chat_check(venv: Path, folder: Path, path: Path) -> dict:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is the ship?"}]
    got = llamacpp(venv, {"op": "chat", "path": str(path), "messages": messages, "max_tokens": 8})
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    return {**got, "template_is_ours": got["template"] == CHATML, "prompt_equals_hf": got["prompt"] == expected}


# -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/llamacpp-venv"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-bench"))
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER_DIR)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    version = ensure_llamacpp(args.venv, work / "pip-install.log")
    converter = ensure_converter(args.venv, version, work)
    from transformers import AutoTokenizer

    results = {"llama_cpp_python": version, "prompt": PROMPT, "models": {}}
    models = {"gpt2-124M": build_model_dir("gpt2", work, args.tokenizer),
              **{f"tiny-{k}": tiny_model(work, k, args.tokenizer) for k in ("gpt2", "llama", "qwen2")}}
    for name, folder in models.items():
        token_ids = AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]
        reference = hf_last_logits(folder, token_ids)
        entry = results["models"][name] = {"ours": {}, "theirs": {}}
        for outtype in OUTTYPES:
            ours, theirs = work / "ours" / f"{name}-{outtype}.gguf", work / "theirs" / f"{name}-{outtype}.gguf"
            ours.parent.mkdir(exist_ok=True)
            theirs.parent.mkdir(exist_ok=True)
            run = export_ours(folder, outtype, ours)
            entry["ours"][outtype] = {**logits_check(args.venv, ours, token_ids, reference),
                                      "wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"]}
            try:
                run = export_theirs(converter, with_n_ctx(folder, work), outtype, theirs)
            except RuntimeError as exc:  # reported, not hidden: the converter's own limits
                entry["theirs"][outtype] = {"error": str(exc)[-500:]}
                continue
            entry["theirs"][outtype] = {**logits_check(args.venv, theirs, token_ids, reference),
                                        "wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"]}
            if outtype in ("f32", "f16"):
                entry[f"files_{outtype}"] = compare_files(ours, theirs)
        print(json.dumps({name: entry}, indent=1, default=str), flush=True)
    gpt2 = models["gpt2-124M"]
    ids = AutoTokenizer.from_pretrained(gpt2)(PROMPT)["input_ids"]
    results["greedy_32"] = greedy_check(args.venv, gpt2, work / "ours" / "gpt2-124M-f32.gguf", ids, work)
    chat = tiny_model(work, "chat", args.tokenizer)
    export_ours(chat, "f16", work / "ours" / "chat-f16.gguf")
    results["chat"] = chat_check(args.venv, chat, work / "ours" / "chat-f16.gguf")
    results["total_s"] = time.time() - started
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "models"}, indent=1, default=str))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
