"""What the tests share, in one module (no test module imports another): the tiny tokenizer and model
builders, the one way to run a script (a subprocess, or its main() in-process), the one assert for a bad
input's error line, and the small run helpers several test files use.

Nothing here touches the network; the fixtures in conftest.py call the builders once per session.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.formats import checkpoints as ckpt
from finetune.formats.tokenfiles import META_FORMAT, META_VERSION, token_dtype, tokenizer_fingerprint

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_GPT2_TOKENIZER = REPO_ROOT.parent / "shared" / "gpt2-tokenizer"
WORDS = (
    "the a an of to in and or but river mountain ship captain whale sea wind storm "
    "quiet morning evening letter house garden door window old young small great "
    "said walked looked found heard thought remembered carried opened closed "
    "naïve café über 東京 こんにちは 🙂 🚀"
).split()


# -----------------------------------------------------------------------------
# Tiny tokenizer and model, built locally


def make_corpus(n_chars: int, seed: int = 0) -> str:
    """Deterministic English-like text with paragraphs, punctuation and some non-ASCII."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","])
        sep = rng.choice([" ", " ", " ", "\n", "\n\n"])
        parts.append(sentence + sep)
        size += len(sentence) + len(sep)
    return "".join(parts)[:n_chars]


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 400):
    """Train a byte-level BPE on the generated corpus and save it as a HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = make_corpus(60_000, seed=123)
    bpe.train_from_iterator(
        [corpus[i : i + 1000] for i in range(0, len(corpus), 1000)],
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.model_max_length = 128
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(out_dir: Path, vocab_size: int, n_positions: int = 128, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir)
    return model


# -----------------------------------------------------------------------------
# Running a script, and what a bad input must give


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's top-level scripts the way a user does, capturing its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(main, argv, capsys) -> subprocess.CompletedProcess:
    """A script's main() in this process (no start-up cost), its exit code and output packed as a subprocess
    would give them. main() returns an exit code (finetune_generative, generate) or something else on
    success (prepare_data); a bad input ends in SystemExit (exit_on_user_error)."""
    try:
        returned = main([str(a) for a in argv])
        code = returned if isinstance(returned, int) else 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad input must give exit code 2, an error line naming the problem, and no traceback; every
    fragment must be in stderr (case-insensitive)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert lines, result.stderr
    for line in lines:  # a sentence ends in one period: "..", never (an ellipsis "..." is fine)
        assert not re.search(r"(?<!\.)\.\.(?=\s|$)", line), line
    message = result.stderr.lower()
    for fragment in fragments:
        assert fragment.lower() in message, (fragment, result.stderr)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """assert_clean_error, stricter: exactly one error line, with a HINT, holding every fragment."""
    assert_clean_error(result, *fragments)
    (line,) = error_lines(result.stderr)
    assert "HINT:" in line, line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), (fragment, line)



# -----------------------------------------------------------------------------
# Training runs


BLOCK = 32


def base_args(model_dir, data_dir, out_dir, *extra) -> list[str]:
    return [
        "--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out_dir),
        "--block-size", str(BLOCK), "--batch-size", "8", "--grad-accum", "2", "--epochs", "2",
        "--lr", "3e-3", "--warmup-steps", "3", "--precision", "fp32", "--device", "cpu",
        "--num-workers", "0", "--log-every", "1", "--eval-every", "0", "--save-every", "0",
        "--save-total-limit", "0", "--seed", "11", *map(str, extra),
    ]


def train_records(out_dir: Path, kind: str = "train") -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def assert_trained_alike(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lrs: list[float]) -> None:
    """The weights of two implementations (or process counts) of the same training, after the optimizer steps
    whose learning rates are `lrs`: every element within a tenth of the summed learning rate.

    Why this bound and not an absolute 1e-5: AdamW's first step moves a weight by lr * g / (|g| + eps), about
    lr * sign(g). Where a gradient is near zero (|g| ~ eps = 1e-8) the kernels' rounding of g, which differs by
    CPU (AMD vs Intel with AVX-512/AMX) and by reduction order (DDP, FSDP), moves that weight by a visible
    fraction of lr; a real mismatch (a gradient of another sign, other tokens trained) moves it by up to 2 lr
    in that step. The losses, compared tightly next to this, catch what is smaller than a sign."""
    assert a.keys() == b.keys()
    bound = sum(lrs) / 10
    worst = max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)
    assert worst[0] <= bound, f"{worst[1]} differs by {worst[0]:.3g}, more than {bound:.3g} (sum of lr / 10)"


def checkpoint_names(out: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(out)]


SAVE_RUN = ["--batch-size", "8", "--grad-accum", "1", "--max-steps", "6", "--save-every", "2"]


def start(args: list, log: Path, cwd: Path | None = None, script: str | None = None) -> subprocess.Popen:
    """finetune_generative.py (or the Python source `script`, given the same argv) in a process of its own,
    its stderr written to `log`."""
    command = [sys.executable, str(REPO_ROOT / "finetune_generative.py")] if script is None else \
        [sys.executable, "-c", script]
    with open(log, "w") as stderr:
        return subprocess.Popen([*command, *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr)


def newest_step(out: Path) -> int:
    checkpoints = ckpt.list_checkpoints(out)
    return ckpt.checkpoint_step(checkpoints[-1]) if checkpoints else 0


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> bool:
    """True once checkpoint-{step} (or later) exists; False if the process ended first."""
    deadline = time.time() + timeout
    while newest_step(out) < step:
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, f"no checkpoint-{step} after {timeout}s"
        time.sleep(0.005)
    return True


def wait_for(condition, what: str, timeout: float = 180) -> None:
    """Poll `condition` until it holds; fail, naming `what`, after `timeout` seconds."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def catches(pid: int, signum: int) -> bool:
    """Has process `pid` installed a handler for `signum` (Linux: the SigCgt mask in /proc/PID/status)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def copy_data(data_dir: Path, dst: Path) -> tuple[Path, dict]:
    """A copy of a prepared data folder, to change, and its meta.json."""
    shutil.copytree(data_dir, dst)
    return dst, json.loads((dst / "meta.json").read_text())


class RunsCodeWhenUnpickled:
    """What an attacker puts in a pickle: unpickling calls open(marker, "w"), creating the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_refused_unsafely_loadable(result, marker: Path, *fragments: str) -> None:
    """A pickle that would run code is one error line in our words (not torch's advice), and never ran."""
    assert_clean_error(result, *fragments)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "weights_only" not in result.stderr and "Re-running" not in result.stderr  # torch's advice, not relayed
    assert not marker.exists()  # the payload never ran


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
         str(REPO_ROOT / "finetune_generative.py"), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


def common_args(model_dir, data_dir, out, batch_size: int, *extra) -> list[str]:
    # Dropout off: the two runs draw dropout masks from different RNG streams.
    return [*base_args(model_dir, data_dir, out, "--epochs", "1", "--dropout", "0", "--save-every", "4",
                       "--eval-every", "4"),
            "--batch-size", str(batch_size), *extra]


# -----------------------------------------------------------------------------
# Tokenizer reference for prepare_data


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def reference_ids(tok, text: str) -> list[int]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "longer than the model's maximum length" is expected here
    return list(tok(text, add_special_tokens=False)["input_ids"])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -----------------------------------------------------------------------------
# Chat data folders written directly (ids + mask bits)
# A writer of chat data folders for the training-side tests (the format of docs/chat.md, "Token files"), made directly
# with numpy: each conversation rendered with a chat template set on the tiny tokenizer, the assistant
# tokens (the template's {% generation %} spans: each reply and its end-of-turn token) marked as targets.
#
# It stands in for prepare_data.py's chat path in the tests of tests/test_chat_training.py; the folder it
# writes has the files and meta.json keys that finetune_generative.py reads.


# Adds no token to the tiny tokenizer (eos ends every turn); the headers end in a newline, so the rendering
# of a conversation up to "Assistant:\n" is a token prefix of the conversation with the reply.
TEST_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ':\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\n' }}{%- endif -%}"
)


def sentence(rng: random.Random, low: int, high: int) -> str:
    ascii_words = [w for w in WORDS if w.isascii()]
    return " ".join(rng.choice(ascii_words) for _ in range(rng.randint(low, high)))


def make_conversations(n: int, seed: int = 0, max_words: int = 12, turns: tuple[int, int] = (1, 2)) -> list[list[dict]]:
    """n conversations of mixed lengths: sometimes a system turn, 1-2 user/assistant exchanges."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng, 2, 5)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(*turns)):
            messages.append({"role": "user", "content": sentence(rng, 2, max_words)})
            messages.append({"role": "assistant", "content": sentence(rng, 1, max_words)})
        conversations.append(messages)
    return conversations


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask bytes) of one conversation: bit 0 on the assistant tokens, bit 1 on the first token."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    mask = [1 if m else 0 for m in encoded["assistant_masks"]]
    mask[0] |= 2
    return list(encoded["input_ids"]), mask


def write_chat_data(folder: Path, tokenizer, train: list[list[dict]], val: list[list[dict]],
                    template: str = TEST_TEMPLATE) -> Path:
    """train.bin/val.bin, train.mask.bin/val.mask.bin and meta.json (with its "chat" key) in `folder`."""
    tokenizer.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer) - 1)
    splits, max_id = {}, 0
    for split, conversations in (("train", train), ("val", val)):
        rendered = [render(tokenizer, messages) for messages in conversations]
        ids = np.array([t for r in rendered for t in r[0]], dtype=dtype)
        mask = np.array([m for r in rendered for m in r[1]], dtype=np.uint8)
        ids.tofile(folder / f"{split}.bin")
        mask.tofile(folder / f"{split}.mask.bin")
        max_id = max(max_id, int(ids.max()))
        splits[split] = {"file": f"{split}.bin", "tokens": len(ids), "chars": 0}
    meta = {
        "format": META_FORMAT, "version": META_VERSION, "dtype": dtype.name, "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id, "max_token_id": max_id,
        "tokenizer": {"name_or_path": str(tokenizer.name_or_path), "fingerprint": tokenizer_fingerprint(tokenizer),
                      "class": type(tokenizer).__name__, "add_special_tokens": False},
        "splits": splits, "sources": [], "split": {"policy": "test"},
        "chat": {"format": "messages", "template": template, "template_source": "test",
                 "train_only_replies": True, "examples": {"train": len(train), "val": len(val)},
                 "skipped": {"no_assistant_turn": 0, "nothing_to_train": 0}},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


# -----------------------------------------------------------------------------
# Preference pairs (DPO): JSON lines through prepare_data.py, what it stored, TRL's DPOTrainer beside it

PAIR_BLOCK = 64  # --block-size of the pair folders (prepare_data.py's size check; the training runs choose theirs)


def style_pairs(n: int, seed: int) -> list[dict]:
    """Standard pairs whose chosen answers all end the same way (a style to learn), rejected ones not."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isascii()]

    def text(low, high):
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    return [{"prompt": text(3, 8) + ":", "chosen": " " + text(1, 5) + " the captain said",
             "rejected": " " + text(2, 7)} for _ in range(n)]


def conversational_pairs(rows: list[dict]) -> list[dict]:
    """The same pairs in TRL's conversational format: a user turn, assistant completions."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare_pairs(folder: Path, model_dir, train: list[dict], val: list[dict]) -> Path:
    """folder/data: the pairs through prepare_data.py (in this process), val as --val-input."""
    import prepare_data

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    assert prepare_data.main(["--input", str(write_jsonl(folder / "train.jsonl", train)),
                              "--val-input", str(write_jsonl(folder / "val.jsonl", val)),
                              "--tokenizer", str(model_dir), "--output-dir", str(data),
                              "--block-size", str(PAIR_BLOCK)]) is not None
    return data


def stored_pairs(data: Path, split: str = "train") -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of each pair as prepare_data.py stored them, in file order."""
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    ids = np.fromfile(data / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    mask = np.fromfile(data / f"{split}.mask.bin", dtype=np.uint8)
    starts = [*np.flatnonzero(mask & 2).tolist(), len(ids)]
    pairs = []
    for a, b in zip(starts, starts[1:]):
        m, t = mask[a:b], ids[a:b]
        pairs.append((t[(m & 1) == 0].tolist(), t[(m & 5) == 1].tolist(), t[(m & 5) == 5].tolist()))
    return pairs


def load_fp32_model(model_dir):
    """The model in fp32, eager attention, every dropout 0 (what reference computations compare against)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def trl_dpo_trainer(tmp_path, model_dir, train_rows, model=None, lr: float = 1e-2, **extra):
    """TRL's DPOTrainer set as our DPO runs (sigmoid, beta 0.1, precomputed reference, every pair in each of 3
    steps, constant lr, no weight decay, fused AdamW, clip 1.0, fp32) on `train_rows`; the model of
    `model_dir`, or `model` (a peft model)."""
    import pytest

    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        per_device_train_batch_size=len(train_rows), gradient_accumulation_steps=1, max_steps=3,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=3, disable_tqdm=True,
        bf16=False, gradient_checkpointing=False, max_length=None, **extra)
    return trl.DPOTrainer(model=model if model is not None else load_fp32_model(model_dir), args=config,
                          processing_class=AutoTokenizer.from_pretrained(model_dir),
                          train_dataset=Dataset.from_list(train_rows))
