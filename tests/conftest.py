"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny GPT-2, built locally once per session, the
token files and the one-step run several test modules read, and private caches for every test. The functions
they use live in helpers.py.

Nothing here touches the network. The tokenizer is trained with `tokenizers` on a
generated corpus and saved with `save_pretrained`, so every test goes through the real
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained` code paths.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Tests must never reach a model hub, even by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
# ...nor write into the user's caches. Libraries read these variables when they are first imported (datasets fixes
# its cache folder then), and test modules import them at collection, before any fixture runs: so the process's
# own caches go into a temporary folder now; the fixtures below then give each test a folder of its own.
_CACHES = tempfile.mkdtemp(prefix="finetune-test-caches-")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
for _variable, _folder in (("XDG_CACHE_HOME", "xdg-cache"), ("HF_HOME", "hf-home"),
                           ("HF_DATASETS_CACHE", "hf-datasets"), ("MPLCONFIGDIR", "mplconfig")):
    os.environ[_variable] = os.path.join(_CACHES, _folder)
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (-n 2, the README's command) each worker and every script it starts computes on one
# thread: two workers then fill the two cores without oversubscribing them, and a worker's subprocess start-up
# (imports, loading) overlaps the other's compute.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # the scripts and the finetune package, importable from every test
    sys.path.insert(0, _REPO)

from helpers import base_args, build_tiny_model, build_tiny_tokenizer, make_corpus, run_script  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)  # in case torch was imported before the variables above were set


@pytest.fixture(scope="session", autouse=True)
def session_caches(tmp_path_factory):
    """Private caches for the session's own fixtures: session- and module-scoped fixtures (which run
    prepare_data, build models) start before any test's `private_caches`, so they get these. matplotlib's
    font cache stays here for the whole session instead of being rebuilt for every test."""
    root = tmp_path_factory.mktemp("session-caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "xdg-cache"))
        patch.setenv("HF_HOME", str(root / "hf-home"))
        patch.setenv("MPLCONFIGDIR", str(root / "mplconfig"))
        yield root


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch, session_caches):
    """Every cache a script could write goes into this test's temp folder, never the user's ~/.cache:
    running the tests leaves the machine as it was, and no test sees what another left behind.
    Subprocesses inherit the environment, so scripts run by `run_script` are covered too."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


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


@pytest.fixture(scope="session")
def one_step(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> tuple[Path, str]:
    """A run of --max-steps 1 (base_args: lr 3e-3, 3 warmup steps), and what it printed on stderr. Read only:
    a test that changes it works on a copy."""
    import contextlib
    import io

    import finetune_generative as ft

    out = tmp_path_factory.mktemp("one_step") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1")) == 0
    return out, err.getvalue()
