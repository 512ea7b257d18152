"""evaluate.py against lm-evaluation-harness itself (issue 28): the same tiny model, the same documents and
questions, given to lm-eval as local tasks (YAML with local data_files, no network) through its Hugging Face
backend (HFLM on the model instance). Skipped where lm-eval is not installed (requirements-dev.txt has it)."""
from __future__ import annotations

import json
import os
import random

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported: local files only
lm_eval = pytest.importorskip("lm_eval")

import evaluate  # noqa: E402
from helpers import WORDS, make_corpus, run_main  # noqa: E402

pytestmark = pytest.mark.slow  # lm-eval indexes its thousands of task files on every TaskManager
RELATIVE = 1e-4  # word/byte perplexity and bits per byte: float32 logits summed in different orders


def lm_eval_results(model_dir, task_folder, task: str) -> dict:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(task_folder)),
                          log_samples=False, bootstrap_iters=0)
    return out["results"][task]


def write_task(folder, name: str, data, body: str):
    data_file = folder / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in data), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"test_split: test\n{body}", encoding="utf-8")
    return data_file


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_eval_tasks")


def ours(argv, capsys, out) -> dict:
    result = run_main(evaluate.main, [*argv, "--device", "cpu", "--precision", "fp32", "--output", out], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    return report["evaluations"][0]["results"][report["models"][0]["label"]]["figures"]


def test_rolling_perplexity_equals_lm_evals(tiny_model_dir, task_folder, tmp_path, capsys):
    """24 documents, each several times the tiny model's 128-token context (many rolling windows)."""
    docs = [{"text": make_corpus(random.Random(i).randint(1200, 3000), seed=100 + i)} for i in range(24)]
    data_file = write_task(task_folder, "parity_rolling", docs,
                           "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                           "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                           "  - metric: bits_per_byte\n")
    theirs = lm_eval_results(tiny_model_dir, task_folder, "parity_rolling")
    found = ours(["--model", tiny_model_dir, "--input", data_file], capsys, tmp_path / "e")
    assert found["documents"] == 24 and found["tokens"] > 24 * 4 * 128
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert found[name] == pytest.approx(theirs[f"{name},none"], rel=RELATIVE), name


def test_multiple_choice_acc_equals_lm_evals(tiny_model_dir, task_folder, tmp_path, capsys):
    rng = random.Random(3)
    ascii_words = [w for w in WORDS if w.isascii()]
    questions = []
    for _ in range(40):
        choices = [" ".join(rng.choice(ascii_words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        questions.append({"question": " ".join(rng.choice(ascii_words) for _ in range(rng.randint(3, 9))),
                          "choices": choices, "answer": rng.randrange(4)})
    data_file = write_task(task_folder, "parity_mc", questions,
                           "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
                           "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    theirs = lm_eval_results(tiny_model_dir, task_folder, "parity_mc")
    found = ours(["--model", tiny_model_dir, "--tasks", data_file], capsys, tmp_path / "e")
    assert found["acc"] == theirs["acc,none"]
    assert found["acc_norm"] == theirs["acc_norm,none"]


def test_lm_eval_pass_through_adds_its_figures(tiny_model_dir, task_folder, tmp_path, capsys):
    """--lm-eval on a local task (the rolling one above): lm-eval's bits per byte beside ours, equal."""
    docs = [{"text": make_corpus(2000, seed=300 + i)} for i in range(3)]
    data_file = write_task(task_folder, "pass_rolling", docs,
                           "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                           "metric_list:\n  - metric: bits_per_byte\n")
    out = tmp_path / "e"
    result = run_main(evaluate.main, ["--model", tiny_model_dir, "--input", data_file, "--lm-eval", "pass_rolling",
                                      "--lm-eval-include", task_folder, "--device", "cpu", "--precision", "fp32",
                                      "--output", out], capsys)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    label = report["models"][0]["label"]
    ours_bpb = report["evaluations"][0]["results"][label]["figures"]["bits_per_byte"]
    theirs_bpb = report["evaluations"][1]["results"][label]["figures"]["pass_rolling/bits_per_byte"]
    assert ours_bpb == pytest.approx(theirs_bpb, rel=RELATIVE)
    assert "pass_rolling/bits_per_byte" in result.stdout


def test_lm_eval_bad_tasks_are_one_error_line(tiny_model_dir, capsys):
    from helpers import assert_one_line_error

    result = run_main(evaluate.main, ["--model", tiny_model_dir, "--lm-eval", "no_such_task_anywhere"], capsys)
    assert_one_line_error(result, "no task 'no_such_task_anywhere'")
    # a task whose data set is on the hub, which the tests never reach (HF_DATASETS_OFFLINE)
    result = run_main(evaluate.main, ["--model", tiny_model_dir, "--lm-eval", "lambada_openai", "--device", "cpu"],
                      capsys)
    assert_one_line_error(result, "data set could not be read", "hub")
