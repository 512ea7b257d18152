"""evaluate.py in several processes (--nproc, torch's launcher) gives the one-process figures; its inputs are
read and scored streamingly (a text file in pieces, windows as a stream, rounds of bounded size); --nproc's
bad values are one error line."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from finetune.evaluation import documents as documents_module
from finetune.evaluation import perplexity
from finetune.evaluation.documents import Documents, TextCounts
from finetune.evaluation.metrics import count_bytes, count_words
from finetune.evaluation.windows import Window, stream_rolling_windows, stream_strided_windows
from helpers import (
    REPO_ROOT,
    assert_one_line_error,
    make_corpus,
    prepare_pairs,
    run_main,
    run_script,
    style_pairs,
    wait_for,
)

SUM_TOLERANCE = 1e-9  # relative: the same batches, float64 sums added in another order (parallel.py)


def scorer_of(model_dir, context: int, batch_size: int = 8):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.evaluation.scoring import Scorer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Scorer(model, AutoTokenizer.from_pretrained(model_dir), torch.device("cpu"), "fp32", context, batch_size,
                  "m")


# -----------------------------------------------------------------------------
# Two processes equal one


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A text file of many windows, records of one to a few windows each, and a task file of both kinds."""
    folder = tmp_path_factory.mktemp("parallel_inputs")
    text = folder / "long.txt"
    text.write_text(make_corpus(20_000, seed=3), encoding="utf-8")
    records = folder / "records.jsonl"
    records.write_text("".join(json.dumps({"text": make_corpus(300 + 97 * i, seed=i)}) + "\n" for i in range(9)),
                       encoding="utf-8")
    tasks = folder / "quiz.jsonl"
    tasks.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question": "The old captain", "choices": ["walked", "sea whale river"], "answer": 0},
        {"question": "A quiet", "choices": ["morning", "door", "old"], "answer": 1},
        {"question": "The sea was", "choices": ["storm", "blue", "a whale"], "answer": 2},
        {"question": "Night fell", "choices": ["over the ship", "quiet"], "answer": 0},
        {"prompt": "The sea", "answer": "storm"},
        {"prompt": "A ship", "answer": "sails"},
        {"prompt": "Night", "answer": "fell"},
    ]), encoding="utf-8")
    return {"text": text, "records": records, "tasks": tasks}


def one_process(argv: list, out: Path, capsys) -> dict:
    """evaluate.py in this process, on one thread as each of --nproc's processes runs (OMP_NUM_THREADS=1 below):
    the same fp32 kernels, so that only the sharing out of the batches differs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_main(evaluate.main, [*argv, "--output", out], capsys)
    finally:
        torch.set_num_threads(threads)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "eval.json").read_text(encoding="utf-8"))


def two_processes(argv: list, out: Path) -> tuple[dict, str]:
    result = run_script("evaluate.py", *argv, "--output", out, "--nproc", 2, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "eval.json").read_text(encoding="utf-8")), result.stderr


def assert_same_figures(one: dict, two: dict) -> None:
    """Every figure, per evaluation, per input and per document: counts and accuracies exactly, sums (and the
    ratios of sums) within SUM_TOLERANCE relative."""
    def same(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                same(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and not isinstance(b, bool):
            assert b == pytest.approx(a, rel=SUM_TOLERANCE, abs=0), where
        else:
            assert a == b, where  # counts, accuracies' booleans, names, greedy answers

    assert [e["name"] for e in one["evaluations"]] == [e["name"] for e in two["evaluations"]]
    for a, b in zip(one["evaluations"], two["evaluations"]):
        same(a["results"], b["results"], a["name"])
        for label, result in a["results"].items():  # accuracies: exactly, not within a tolerance
            for name in ("acc", "acc_norm", "exact_match", "preference_accuracy", "reward_accuracy"):
                assert result["figures"].get(name) == b["results"][label]["figures"].get(name)


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(tiny_model_dir, tiny_data_dir, inputs, tmp_path, capsys):
    """--data-dir (val blocks), --input (a text file of many windows and records), --tasks (multiple choice and
    exact match), batch size 2 so that every evaluation has several batches to share."""
    argv = ["--model", tiny_model_dir, "--data-dir", tiny_data_dir, "--input", inputs["text"], inputs["records"],
            "--tasks", inputs["tasks"], "--batch-size", 2, "--device", "cpu", "--precision", "fp32"]
    one = one_process(argv, tmp_path / "one", capsys)
    two, stderr = two_processes(argv, tmp_path / "two")
    assert_same_figures(one, two)
    text = one["evaluations"][1]["results"][one["models"][0]["label"]]
    assert text["figures"]["documents"] == 10 and text["figures"]["tokens"] > 20 * 128  # many windows
    assert "starting 2 processes on this machine" in stderr and "Traceback" not in stderr
    # each process scored a share: the first process's tokens are fewer than all of them
    scored = int(next(line for line in stderr.splitlines() if " tokens scored in " in line)
                 .split(": ")[1].split(" tokens")[0])
    windows_tokens = text["figures"]["tokens"] + one["evaluations"][0]["results"][one["models"][0]["label"]][
        "figures"]["tokens"]
    assert 0 < scored < windows_tokens


@pytest.mark.slow
def test_two_processes_give_the_preference_figures_of_one(tiny_model_dir, tmp_path, capsys):
    data = prepare_pairs(tmp_path / "pairs", tiny_model_dir, style_pairs(24, seed=1), style_pairs(20, seed=2))
    # two models, so that the second gets a reward accuracy against the first
    argv = ["--model", tiny_model_dir, "--model", tiny_model_dir, "--data-dir", data, "--batch-size", 2,
            "--device", "cpu", "--precision", "fp32"]
    one = one_process(argv, tmp_path / "one", capsys)
    two, _ = two_processes(argv, tmp_path / "two")
    assert_same_figures(one, two)
    figures = one["evaluations"][0]["results"][one["models"][0]["label"]]["figures"]
    assert figures["pairs"] == 20


# -----------------------------------------------------------------------------
# Streaming: windows, pieces, rounds


def reference_rolling(tokens: list[int], context: int, prefix: int) -> list[Window]:
    """lm-eval's rolling windows over a document held whole (the loop as evaluate.py had it before streaming)."""
    sequence, windows, done = [prefix, *tokens], [], 0
    while done < len(tokens):
        end = done + min(context, len(tokens) - done)
        windows.append(Window(sequence[max(0, end - context):end + 1], end - done))
        done = end
    return windows


def reference_strided(tokens: list[int], context: int, stride: int, prefix: int) -> list[Window]:
    """The Hugging Face perplexity guide's loop over a document held whole."""
    sequence, windows, scored_up_to = [prefix, *tokens], [], 1
    for begin in range(0, len(sequence), stride):
        end = min(begin + context, len(sequence))
        windows.append(Window(sequence[begin:end], end - scored_up_to))
        scored_up_to = end
        if end == len(sequence):
            break
    return windows


def random_pieces(tokens: list[int], rng: random.Random) -> list[list[int]]:
    cuts = sorted(rng.sample(range(len(tokens) + 1), k=min(len(tokens) + 1, rng.randint(0, 12))))
    bounds = [0, *cuts, len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds, bounds[1:])]


def test_windows_of_a_token_stream_equal_those_of_the_whole_document():
    rng = random.Random(0)
    for _ in range(400):
        tokens = [rng.randrange(1000) for _ in range(rng.randint(1, 300))]
        context = rng.randint(2, 40)
        stride = rng.randint(1, context - 1)
        pieces = random_pieces(tokens, rng)
        assert list(stream_rolling_windows(pieces, context, 7)) == reference_rolling(tokens, context, 7)
        assert list(stream_strided_windows(pieces, context, stride, 7)) == reference_strided(tokens, context,
                                                                                             stride, 7)


def test_a_text_file_is_read_in_pieces_that_give_the_whole_texts_tokens_bytes_and_words(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(documents_module, "PIECE_CHARS", 500)
    text = "\ufeff" + make_corpus(30_000, seed=11).replace(". ", ".  \n\t ") + " \n"  # runs of whitespace
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    (document,) = Documents([str(path)])
    assert document.text is None and document.path == path  # nothing of it is read until it is scored
    scorer = scorer_of(tiny_model_dir, 128)
    pieces = list(document.text_pieces(scorer.cutter()))
    whole = text[1:]  # the byte-order mark is dropped, as prepare_data.py drops it
    assert len(pieces) > 40 and max(map(len, pieces)) < 2 * 500 and "".join(pieces) == whole
    assert [t for p in pieces for t in scorer.encode(p)] == scorer.encode(whole)
    counts = TextCounts()
    for piece in pieces:
        counts.add(piece)
    assert counts.bytes == count_bytes(whole) and counts.words == count_words(whole)
    for cut in ([" a", " b"], ["a ", " b"], ["a \n", "\n b "], ["", "a", ""]):
        counts = TextCounts()
        for piece in cut:
            counts.add(piece)
        assert counts.words == count_words("".join(cut)), cut


def test_a_long_document_is_scored_in_rounds_of_bounded_size(tiny_model_dir, tmp_path, monkeypatch):
    """Memory does not grow with the input: no text longer than a piece is tokenized, no round holds more than
    ROUND_WINDOWS windows, and documents are read as they are scored, not before (the model is replaced by
    zeros: this is about what is held, not about the figures)."""
    monkeypatch.setattr(documents_module, "PIECE_CHARS", 2000)
    monkeypatch.setattr(perplexity, "ROUND_WINDOWS", 16)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(make_corpus(60_000, seed=i), encoding="utf-8")
    documents = Documents([str(folder)])
    scorer = scorer_of(tiny_model_dir, 32, 4)
    encoded, rounds, opened = [], [], []
    encode = scorer.encode
    monkeypatch.setattr(scorer, "encode", lambda text: encoded.append(len(text)) or encode(text))
    monkeypatch.setattr(scorer, "_run_batch", lambda windows: [np.zeros(w.n_targets) for w in windows])
    target_logprobs = scorer.target_logprobs

    def count_round(windows):
        rounds.append((len(windows), len(opened)))
        return target_logprobs(windows)

    monkeypatch.setattr(scorer, "target_logprobs", count_round)
    of_file = documents.of_file
    monkeypatch.setattr(documents, "of_file", lambda path: opened.append(path) or of_file(path))
    result = perplexity.TextEvaluation("t", documents).run(scorer)
    assert result.figures["tokens"] > 3 * 60_000 / 8 and result.figures["documents"] == 3
    assert max(encoded) < 2 * 2000
    assert len(rounds) > 100 and max(n for n, _ in rounds) <= 16
    assert rounds[0][1] == 1  # the first round was scored when only the first file was open
    assert result.figures["bytes"] == sum(count_bytes(p.read_text(encoding="utf-8")) for p in documents.files)


# -----------------------------------------------------------------------------
# --nproc: bad values, one line each, before anything starts


def test_bad_nproc_is_one_error_line(tiny_model_dir, inputs, tmp_path, capsys, monkeypatch):
    one_question = tmp_path / "one.jsonl"
    one_question.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n",
                            encoding="utf-8")
    model = ["--model", tiny_model_dir]
    cases = [
        ([*model, "--input", inputs["text"], "--nproc", 0], ["--nproc must be at least 1, got 0"]),
        ([*model, "--prompt", "The sea", "--nproc", 2], ["samples (--prompt) run in one process", "drop --nproc"]),
        ([*model, "--tasks", one_question, "--nproc", 3],
         ["work for at most 2 process(es)", "1 would have nothing to do", "HINT: --nproc 2"]),
        ([*model, "--lm-eval", "hellaswag", "--nproc", 2], ["--lm-eval runs lm-evaluation-harness whole in one "
                                                            "process", "without --nproc"]),
    ]
    for argv, fragments in cases:
        assert_one_line_error(run_main(evaluate.main, argv, capsys), *fragments)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    assert_one_line_error(run_main(evaluate.main, [*model, "--input", inputs["text"], "--nproc", 4], capsys),
                          "--nproc 4 under torchrun, which started 2 process(es)", "python evaluate.py --nproc 4")


@pytest.mark.slow
def test_a_killed_process_is_one_line_and_no_report(tiny_model_dir, tmp_path):
    """kill -9 of one of --nproc 2's processes: the launcher's line (rerun: there is nothing to resume), exit 137,
    no traceback, no report."""
    import os
    import subprocess
    import sys

    import psutil

    big = tmp_path / "big.txt"
    big.write_text(make_corpus(2_000_000, seed=5), encoding="utf-8")
    out, log = tmp_path / "e", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "evaluate.py"), "--model", str(tiny_model_dir),
                                 "--input", str(big), "--output", str(out), "--nproc", "2", "--device", "cpu"],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wait_for(lambda: "loading " in log.read_text(), "the processes to load the model")
    (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    rank1.kill()
    assert proc.wait(timeout=120) == 137, log.read_text()[-3000:]
    err = log.read_text()
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors[-1] == ("error: process 1 of 2 was killed by SIGKILL, and the others were stopped. HINT: out of "
                          "memory? (see `dmesg`) run the same command again"), errors
    assert len(errors) <= 2 and all("HINT:" in line for line in errors), errors
    assert not (out / "eval.json").exists()


def test_work_bound_is_an_upper_bound_on_the_windows(tiny_model_dir, inputs):
    """--nproc's check counts at most one window per `context` bytes of a document (a token is at least a byte):
    never fewer windows than there are."""
    documents = Documents([str(inputs["text"]), str(inputs["records"])])
    scorer = scorer_of(tiny_model_dir, 128)
    evaluation = perplexity.TextEvaluation("t", documents)
    windows = sum(1 for _, window in evaluation.scores(scorer) if window is not None)
    assert windows <= evaluation.most_shares(128) < 8 * windows  # loose by the bytes per token (3.5 here)
