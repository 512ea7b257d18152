"""evaluate.py (issue 28): the val split scored as the training script scores it, documents in rolling and
strided windows against the Hugging Face perplexity guide's loop, task files, the report files, and every bad
input as one error line. Parity with lm-evaluation-harness itself: tests/test_evaluate_lm_eval.py."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import evaluate
import finetune_generative as ft
from finetune.evaluation.report import fmt
from helpers import (
    BLOCK,
    assert_one_line_error,
    base_args,
    make_conversations,
    make_corpus,
    run_main,
    train_records,
    write_chat_data,
)

LOSS_TOLERANCE = 1e-6  # --data-dir against the run's own last val loss: the same blocks, the same function


def evaluate_json(argv, capsys, out: Path) -> tuple[dict, str]:
    result = run_main(evaluate.main, [*argv, "--device", "cpu", "--precision", "fp32", "--output", out], capsys)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "eval.json").read_text(encoding="utf-8")), result.stdout


def figures(report: dict, evaluation: int = 0, model: int = 0) -> dict:
    label = report["models"][model]["label"]
    return report["evaluations"][evaluation]["results"][label]["figures"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A finished run on the tiny corpus (2 epochs, an evaluation at step 0 and at the end)."""
    out = tmp_path_factory.mktemp("eval_run") / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--eval-batches", "0")) == 0
    return out


@pytest.fixture(scope="module")
def heldout_texts(tmp_path_factory) -> dict[str, Path]:
    """Text like the run's corpus (not in it), and text unlike it."""
    folder = tmp_path_factory.mktemp("heldout")
    like = folder / "like.txt"
    like.write_text(make_corpus(3000, seed=99), encoding="utf-8")
    rng = random.Random(5)
    unlike = folder / "unlike.txt"
    unlike.write_text(" ".join("".join(rng.choice("0123456789xyzqjk#%") for _ in range(rng.randint(2, 9)))
                               for _ in range(400)), encoding="utf-8")
    return {"like": like, "unlike": unlike}


# -----------------------------------------------------------------------------
# --data-dir: the training script's own number


def test_data_dir_loss_equals_the_runs_last_val_loss(trained_run, tiny_data_dir, tmp_path, capsys):
    last = train_records(trained_run, "eval")[-1]["val_loss"]
    report, _ = evaluate_json(["--model", trained_run, "--data-dir", tiny_data_dir], capsys, tmp_path / "e")
    found = figures(report)
    assert abs(found["loss"] - last) <= LOSS_TOLERANCE, (found["loss"], last)
    # bits per byte from the predicted tokens' bytes: the loss in bits spread over them
    assert found["bits_per_byte"] == pytest.approx(found["loss"] * found["tokens"] / found["bytes"] / math.log(2))
    assert 0 < found["bytes"] and found["tokens"] == found["blocks"] * (BLOCK - 1)


def test_data_dir_of_chat_data_equals_the_runs_last_val_loss(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    data = write_chat_data(tmp_path / "data", AutoTokenizer.from_pretrained(tiny_model_dir),
                           make_conversations(16, seed=1), make_conversations(6, seed=2))
    out = tmp_path / "out"
    args = [*base_args(tiny_model_dir, data, out, "--block-size", 128, "--batch-size", 2, "--epochs", 1,
                       "--dropout", 0)]
    assert ft.main(args) == 0
    last = train_records(out, "eval")[-1]["val_loss"]
    report, _ = evaluate_json(["--model", out, "--data-dir", data], capsys, tmp_path / "e")
    found = figures(report)
    assert abs(found["loss"] - last) <= LOSS_TOLERANCE, (found["loss"], last)
    # chat: only the trained tokens (the replies) are scored, fewer than the blocks' predictions
    assert 0 < found["tokens"] < found["blocks"] * 127


# -----------------------------------------------------------------------------
# --input: rolling windows, --stride against the Hugging Face perplexity guide


def guide_strided_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The loop of the Hugging Face perplexity guide (perplexity.md), on `ids`: windows of max_length starting
    every `stride` tokens, each scoring the tokens the previous one did not. The guide weights each window's
    mean loss by (its targets - 1), one fewer than the targets that remain after the model's label shift on
    every window but the first; this sums the windows' exact losses instead."""
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("stride", [32, 100])
def test_stride_equals_the_perplexity_guides_loop(tiny_model_dir, heldout_texts, tmp_path, capsys, stride):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = heldout_texts["like"].read_text(encoding="utf-8")
    report, _ = evaluate_json(["--model", tiny_model_dir, "--input", heldout_texts["like"], "--stride", stride],
                              capsys, tmp_path / "e")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 4 * model.config.n_positions  # many windows
    nll, tokens = guide_strided_nll(model, ids, model.config.n_positions, stride)
    found = figures(report)
    assert found["tokens"] == tokens == len(ids) - 1
    assert abs(found["loss"] - nll / tokens) <= 1e-5, (found["loss"], nll / tokens)


def test_rolling_windows_score_every_token_once_with_full_context(tiny_model_dir, heldout_texts, tmp_path, capsys):
    """lm-eval's windows: the document's tokens each scored once; a window of fewer targets reads back a whole
    context. The figure is the sum of per-token losses computed here directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.evaluation.windows import rolling_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    text = heldout_texts["like"].read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = model.config.n_positions
    windows = rolling_windows(ids, context, tokenizer.eos_token_id)
    assert sum(w.n_targets for w in windows) == len(ids)
    assert all(len(w.tokens) - 1 == context for w in windows[1:])
    nll = 0.0
    for w in windows:
        with torch.no_grad():
            logits = model(torch.tensor([w.tokens[:-1]])).logits[0, -w.n_targets:]
        nll -= torch.log_softmax(logits, -1).gather(1, torch.tensor(w.tokens[-w.n_targets:])[:, None]).sum().item()
    report, _ = evaluate_json(["--model", tiny_model_dir, "--input", heldout_texts["like"]], capsys, tmp_path / "e")
    found = figures(report)
    assert found["tokens"] == len(ids) and found["bytes"] == len(text.encode("utf-8"))
    assert found["bits_per_byte"] == pytest.approx(nll / found["bytes"] / math.log(2), rel=1e-5)
    assert found["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)


# -----------------------------------------------------------------------------
# End to end: before and after, side by side


def test_fine_tuned_model_beats_its_base_on_its_kind_of_text_only(trained_run, tiny_model_dir, heldout_texts,
                                                                   tmp_path, capsys):
    out = tmp_path / "e"
    report, stdout = evaluate_json(["--model", tiny_model_dir, "--model", trained_run, "--input",
                                    heldout_texts["like"], heldout_texts["unlike"]], capsys, out)
    base, tuned = (report["evaluations"][0]["results"][m["label"]]["by_input"] for m in report["models"])
    like, unlike = str(heldout_texts["like"]), str(heldout_texts["unlike"])
    assert tuned[like]["bits_per_byte"] < base[like]["bits_per_byte"]
    gain_like = base[like]["bits_per_byte"] - tuned[like]["bits_per_byte"]
    gain_unlike = base[unlike]["bits_per_byte"] - tuned[unlike]["bits_per_byte"]
    assert gain_like > gain_unlike
    # the console shows eval.json's numbers
    for label in (m["label"] for m in report["models"]):
        shown = report["evaluations"][0]["results"][label]["figures"]
        for name in ("bits_per_byte", "loss", "word_perplexity"):
            assert fmt(shown[name]) in stdout
    assert (out / "eval.md").is_file() and (out / "eval.png").stat().st_size > 0
    changed = report["evaluations"][0]["changed_documents"]
    assert changed["better"] and changed["better"][0]["after"] < changed["better"][0]["before"]


def test_default_output_is_eval_in_the_run_and_no_model_file_is_touched(trained_run, heldout_texts, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*") if p.is_file()}
    result = run_main(evaluate.main, ["--model", trained_run / "best", "--input", heldout_texts["like"],
                                      "--device", "cpu", "--precision", "fp32"], capsys)
    assert result.returncode == 0, result.stderr
    assert json.loads((trained_run / "eval" / "eval.json").read_text())["models"][0]["source"].endswith("best")
    assert {p: p.stat().st_mtime_ns for p in before} == before


# -----------------------------------------------------------------------------
# --tasks


def test_tasks_multiple_choice_and_exact_match(tiny_model_dir, tmp_path, capsys):
    tasks = tmp_path / "quiz.jsonl"
    tasks.write_text("\n".join(json.dumps(q) for q in [
        {"question": "The old captain", "choices": ["walked", "sea whale river"], "answer": 0},
        {"question": "A quiet", "choices": ["morning", "door", "東京"], "answer": "door"},
        {"prompt": "The sea", "answer": "storm"},
    ]) + "\n", encoding="utf-8")
    report, _ = evaluate_json(["--model", tiny_model_dir, "--tasks", tasks], capsys, tmp_path / "e")
    found = figures(report)
    rows = report["evaluations"][0]["results"][report["models"][0]["label"]]["documents"]
    mc = [r for r in rows if "loglikelihoods" in r]
    acc = sum(max(range(len(r["loglikelihoods"])), key=r["loglikelihoods"].__getitem__) == answer
              for r, answer in zip(mc, (0, 1))) / 2
    assert found["acc"] == acc and found["questions"] == 3 and found["exact_match"] in (0.0, 1.0)


# -----------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing loaded


@pytest.mark.parametrize("lines, fragments", [
    (['{"question": "q", "choices": ["a", "b"], "answer": 0}', '{"question": "q", "choices": [a]}'],
     ["quiz.jsonl line 2", "malformed JSON"]),
    (['{"question": "q", "choices": [], "answer": 0}'], ["line 1", "'choices' is empty"]),
    (['{"question": "q", "choices": ["a", "b"], "answer": 2}'], ["line 1", "out of range for 2 choices"]),
])
def test_bad_task_file_is_one_error_line(tiny_model_dir, tmp_path, capsys, lines, fragments):
    tasks = tmp_path / "quiz.jsonl"
    tasks.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_main(evaluate.main, ["--model", tiny_model_dir, "--tasks", tasks], capsys)
    assert_one_line_error(result, *fragments)


def test_bad_models_and_data_are_one_error_line(tmp_path, tiny_model_dir, tiny_data_dir, trained_run, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "x.txt").write_text("not a model", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    cases = [
        (["--model", notes, "--input", text], ["no config.json", "not a saved model"]),
        (["--model", tiny_model_dir, "--input", empty], ["no text to evaluate on"]),
        (["--model", tiny_model_dir], ["nothing to evaluate on"]),
        (["--model", tiny_model_dir, "--input", text, "--output", trained_run / "best"], ["model folder"]),
        (["--model", tiny_model_dir, "--input", text, "--stride", 500], ["--stride 500", "context"]),
    ]
    for argv, fragments in cases:
        assert_one_line_error(run_main(evaluate.main, argv, capsys), *fragments)


def test_token_files_of_another_tokenizer_are_refused_before_loading(tmp_path, tiny_data_dir, capsys):
    from transformers import AutoTokenizer

    from helpers import build_tiny_model, build_tiny_tokenizer

    other = tmp_path / "other"
    build_tiny_tokenizer(other, vocab_size=300)
    build_tiny_model(other, vocab_size=len(AutoTokenizer.from_pretrained(other)))
    result = run_main(evaluate.main, ["--model", other, "--data-dir", tiny_data_dir], capsys)
    assert_one_line_error(result, "does not fit --model", "tokenizer")


# -----------------------------------------------------------------------------
# The report card and model card every training run writes


def test_run_writes_a_report_card_and_a_model_card_that_huggingface_hub_reads(trained_run):
    from huggingface_hub import ModelCard

    evals = train_records(trained_run, "eval")
    report = json.loads((trained_run / "report_card.json").read_text(encoding="utf-8"))
    labels = [m["label"] for m in report["models"]]
    assert labels[0] == "base (step 0)" and labels[-1].startswith("final")
    results = report["evaluations"][0]["results"]
    assert results[labels[0]]["figures"]["loss"] == evals[0]["val_loss"]
    final = results[labels[-1]]["figures"]
    assert final["loss"] == evals[-1]["val_loss"]
    assert final["bits_per_byte"] < results[labels[0]]["figures"]["bits_per_byte"]  # it learned
    card = ModelCard.load(trained_run / "README.md")
    assert card.data.base_model and card.data.library_name == "transformers"
    by_type = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_type["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-6)
    assert by_type["bits_per_byte"] == pytest.approx(final["bits_per_byte"], abs=1e-6)
    assert card.data.eval_results[0].dataset_split == "validation"
    assert "![training and validation loss](loss.png)" in card.text


def test_a_readme_the_user_wrote_is_never_replaced(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    out.mkdir()
    mine = "# My model\n\nNotes I wrote myself.\n"
    (out / "README.md").write_text(mine, encoding="utf-8")
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", 2)) == 0
    assert (out / "README.md").read_text(encoding="utf-8") == mine
    assert (out / "report_card.md").is_file()
    # ours is rewritten by the next run into that folder
    (out / "README.md").unlink()
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", 2, "--overwrite")) == 0
    from finetune.evaluation.card import MARKER

    assert MARKER in (out / "README.md").read_text(encoding="utf-8")


# -----------------------------------------------------------------------------
# Samples side by side; lm-eval absent


def test_prompts_are_sampled_by_every_model_as_generate_py_samples_them(tiny_model_dir, trained_run, tmp_path,
                                                                       capsys):
    import generate

    report, stdout = evaluate_json(["--model", tiny_model_dir, "--model", trained_run, "--prompt", "The old captain",
                                    "--max-new-tokens", 12, "--seed", 3], capsys, tmp_path / "e")
    (sample,) = report["samples"]
    assert list(sample["completions"]) == [m["label"] for m in report["models"]]
    result = run_main(generate.main, ["--model", trained_run, "--prompt", "The old captain", "--max-new-tokens", 12,
                                      "--seed", 3, "--device", "cpu", "--precision", "fp32",
                                      "--output", tmp_path / "g.jsonl"], capsys)
    assert result.returncode == 0, result.stderr
    generated = json.loads((tmp_path / "g.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert sample["completions"][str(trained_run)] == generated["completion"]
    assert json.dumps(generated["completion"], ensure_ascii=False) in stdout


def test_lm_eval_absent_is_one_line_with_the_pip_command(tiny_model_dir, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    result = run_main(evaluate.main, ["--model", tiny_model_dir, "--lm-eval", "hellaswag"], capsys)
    assert_one_line_error(result, "lm-evaluation-harness", "pip install lm-eval")


# -----------------------------------------------------------------------------
# Chat records: the replies scored, through each model's own template


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with the tests' chat template saved beside it (as a chat run saves it)."""
    import shutil

    from transformers import AutoTokenizer

    from helpers import TEST_TEMPLATE

    folder = tmp_path_factory.mktemp("chat_model") / "m"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEST_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_records_score_the_replies_only(chat_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import render

    conversations = make_conversations(5, seed=4)
    records = tmp_path / "chats.jsonl"
    records.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    report, _ = evaluate_json(["--model", chat_model_dir, "--input", records], capsys, tmp_path / "e")
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    nll, targets = 0.0, 0
    for messages in conversations:  # short conversations: one forward pass each, the reply tokens summed
        ids, mask = render(tokenizer, messages)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        for t in range(1, len(ids)):
            if mask[t] & 1:
                nll -= logprobs[t - 1, ids[t]].item()
                targets += 1
    found = figures(report)
    assert found["tokens"] == targets and found["documents"] == 5
    assert found["loss"] == pytest.approx(nll / targets, rel=1e-5)


def test_chat_model_answers_tasks_through_its_template(chat_model_dir, tmp_path, capsys):
    """The choices' log-likelihoods after the question rendered as a user turn (not as plain text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.infer.sampling import chat_prompt_ids

    tasks = tmp_path / "quiz.jsonl"
    tasks.write_text(json.dumps({"question": "How is the sea?", "choices": ["quiet", "old ship"], "answer": 0}) + "\n",
                     encoding="utf-8")
    report, _ = evaluate_json(["--model", chat_model_dir, "--tasks", tasks], capsys, tmp_path / "e")
    (row,) = report["evaluations"][0]["results"][report["models"][0]["label"]]["documents"]
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    context = chat_prompt_ids(tokenizer, [{"role": "user", "content": "How is the sea?"}])
    for choice, found in zip(["quiet", "old ship"], row["loglikelihoods"]):
        answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = context + answer
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], -1)
        expected = sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(answer))
        assert found == pytest.approx(expected, rel=1e-5)


def test_models_with_different_tokenizers_compare_per_byte(tiny_model_dir, heldout_texts, tmp_path, capsys):
    """Each model tokenizes the text itself: token counts differ, the bytes and words divided by do not."""
    from transformers import AutoTokenizer

    from helpers import build_tiny_model, build_tiny_tokenizer

    other = tmp_path / "other"
    build_tiny_tokenizer(other, vocab_size=300)
    build_tiny_model(other, vocab_size=len(AutoTokenizer.from_pretrained(other)))
    report, _ = evaluate_json(["--model", tiny_model_dir, "--model", other, "--input", heldout_texts["like"]],
                              capsys, tmp_path / "e")
    a, b = figures(report, model=0), figures(report, model=1)
    assert a["tokens"] != b["tokens"]
    assert a["bytes"] == b["bytes"] == len(heldout_texts["like"].read_bytes())
    assert a["words"] == b["words"]
    assert report["models"][0]["tokenizer_fingerprint"] != report["models"][1]["tokenizer_fingerprint"]
