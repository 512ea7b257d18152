"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny GPT-2, built locally.

Nothing here touches the network. The tokenizer is trained with `tokenizers` on a
generated corpus and saved with `save_pretrained`, so every test goes through the real
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained` code paths.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_GPT2_TOKENIZER = REPO_ROOT.parent / "shared" / "gpt2-tokenizer"

# Tests must never reach a model hub, even by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def shared_config_dir(tmp_path_factory) -> Path:
    """matplotlib's font cache, built once per session instead of once per test."""
    return tmp_path_factory.mktemp("mplconfig")


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch, shared_config_dir):
    """Every cache a script could write goes into this test's temp folder, never the user's ~/.cache:
    running the tests leaves the machine as it was, and no test sees what another left behind.
    Subprocesses inherit the environment, so scripts run by `run_script` are covered too."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("MPLCONFIGDIR", str(shared_config_dir))

WORDS = (
    "the a an of to in and or but river mountain ship captain whale sea wind storm "
    "quiet morning evening letter house garden door window old young small great "
    "said walked looked found heard thought remembered carried opened closed "
    "naïve café über 東京 こんにちは 🙂 🚀"
).split()


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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding only the tiny tokenizer."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A folder holding the tiny tokenizer and a tiny randomly initialised GPT-2 (2 layers, 32 wide)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.save_pretrained(out)
    build_tiny_model(out, vocab_size=len(tok))
    return out


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(make_corpus(40_000, seed=1), encoding="utf-8")
    return path


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


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad input must produce exit code 2, a one-line error naming the problem, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines, result.stderr
    for line in error_lines:  # a sentence ends in one period: "..", never (an ellipsis "..." is fine)
        assert not re.search(r"(?<!\.)\.\.(?=\s|$)", line), line
    message = result.stderr.lower()
    for fragment in fragments:
        assert fragment.lower() in message, (fragment, result.stderr)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """train.bin/val.bin/meta.json made by prepare_data.py from a generated corpus with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "book.txt"
    corpus.write_text(make_corpus(40_000, seed=7), encoding="utf-8")
    result = run_script("prepare_data.py", "--input", corpus, "--tokenizer", tiny_model_dir,
                        "--output-dir", root / "data", "--block-size", 32, "--seed", 0)
    assert result.returncode == 0, result.stderr
    return root / "data"

