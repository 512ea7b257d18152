"""generate.py: the command line end to end, its error messages, and sample_during_training.

End-to-end cases run the script as a user does (a subprocess); cases that only compare the
outputs of several settings call main() in-process, which saves a Python + torch start each.
Everything runs on the CPU in fp32 so results do not depend on the machine's GPU or bf16 support.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate as generate_module
from helpers import REPO_ROOT, assert_clean_error, assert_one_line_error, run_main, run_script

CPU = ("--device", "cpu", "--precision", "fp32")
HEADER = re.compile(r"^--- sample (\d+)/(\d+) \((.*)\) ---$", re.MULTILINE)
# what transformers says when generate() is called without an attention mask or pad token
WARNING_WORDS = ("attention mask", "attention_mask", "pad_token_id", "pad token", "warn", "Traceback")


def generate(*args, **kwargs) -> subprocess.CompletedProcess:
    return run_script("generate.py", *CPU, *args, **kwargs)


def headers(stdout: str) -> list[tuple[str, str, str]]:
    return HEADER.findall(stdout)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_no_generate_warnings(stderr: str) -> None:
    for words in WARNING_WORDS:
        assert words.lower() not in stderr.lower(), stderr


# -----------------------------------------------------------------------------
# End to end, as a subprocess


@pytest.mark.slow
def test_same_seed_gives_same_text_and_streams_what_it_records(tiny_model_dir, tmp_path):
    runs = [generate("--model", tiny_model_dir, "--prompt", "The old captain", "--seed", "7",
                     "--max-new-tokens", "16", "--output", tmp_path / f"run{i}.jsonl") for i in range(2)]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert_no_generate_warnings(result.stderr)
    assert runs[0].stdout == runs[1].stdout
    (record,) = read_jsonl(tmp_path / "run0.jsonl")
    assert read_jsonl(tmp_path / "run1.jsonl") == [record]
    # one prompt, one sample: streamed, and what was streamed is what was recorded
    assert headers(runs[0].stdout) == [("1", "1", 'prompt: "The old captain"')]
    assert record["text"] in runs[0].stdout
    assert record["text"] == record["prompt"] + record["completion"]


@pytest.mark.slow
def test_num_samples_output_fields_and_max_new_tokens(tiny_model_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    result = generate("--model", tiny_model_dir, "--prompt", "the river", "--num-samples", "3",
                      "--max-new-tokens", "9", "--seed", "1", "--top-k", "50", "--top-p", "0.95",
                      "--repetition-penalty", "1.2", "--output", out)
    assert result.returncode == 0, result.stderr
    assert_no_generate_warnings(result.stderr)
    assert [h[:2] for h in headers(result.stdout)] == [("1", "3"), ("2", "3"), ("3", "3")]

    records = read_jsonl(out)
    assert [r["sample_index"] for r in records] == [0, 1, 2]
    for r in records:
        assert {"prompt", "prompt_index", "sample_index", "text", "completion", "new_tokens",
                "finish_reason", "settings"} <= set(r)
        assert r["prompt"] == "the river" and r["prompt_index"] == 0
        assert r["text"] in result.stdout
        assert 1 <= r["new_tokens"] <= 9
        assert r["finish_reason"] in ("eos", "length")
        assert r["settings"] | {"model": None} == {
            "model": None, "greedy": False, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
            "repetition_penalty": 1.2, "max_new_tokens": 9, "seed": 1, "device": "cpu", "precision": "fp32"}


@pytest.mark.slow
def test_prompts_from_stdin_and_prompt_file(tiny_model_dir, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a small house\n\n   \nthe sea\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "generate.py"), *CPU, "--model", str(tiny_model_dir),
         "--prompt", "-", "--prompt-file", str(prompt_file), "--max-new-tokens", "5", "--seed", "1"],
        input="The old captain\n", capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert headers(result.stdout) == [
        ("1", "1", 'prompt 1/3: "The old captain"'),  # stdin's trailing newline is not part of the prompt
        ("1", "1", 'prompt 2/3: "a small house"'),
        ("1", "1", 'prompt 3/3: "the sea"'),
    ]


# -----------------------------------------------------------------------------
# Settings compared in-process


def sample_texts(capsys, *args) -> list[str]:
    """Texts printed by one in-process run (one per header)."""
    import generate

    assert generate.main([*CPU, *map(str, args)]) == 0
    stdout = capsys.readouterr().out
    return [block.strip("\n") for block in HEADER.split(stdout)[4::4]]


def test_different_seed_gives_different_text(tiny_model_dir, capsys):
    common = ("--model", tiny_model_dir, "--prompt", "the river", "--temperature", "1.0", "--max-new-tokens", "24")
    first = sample_texts(capsys, *common, "--seed", "1")
    assert sample_texts(capsys, *common, "--seed", "1") == first
    assert sample_texts(capsys, *common, "--seed", "2") != first


def test_greedy_is_deterministic_whatever_the_seed(tiny_model_dir, capsys):
    common = ("--model", tiny_model_dir, "--prompt", "the river", "--greedy", "--max-new-tokens", "12")
    first = sample_texts(capsys, *common, "--seed", "1")
    # a temperature of 0 is fine with --greedy: it is only an error when sampling
    assert sample_texts(capsys, *common, "--seed", "2", "--temperature", "0") == first
    assert len(first) == 1 and first[0].startswith("the river")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded in-process, for tests of generate.py's functions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_generate_gets_attention_mask_and_pad_token(tiny, monkeypatch):
    from finetune.infer import sampling

    model, tokenizer = tiny
    assert tokenizer.pad_token is None  # like GPT-2's: eos has to stand in
    calls = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real_generate(**kw))
    kwargs = sampling.generation_kwargs(model, tokenizer, max_new_tokens=4)
    with torch.inference_mode():
        sampling.generate_samples(model, tokenizer, "the river", kwargs, num_samples=2, seed=0, device="cpu")
    (call,) = calls
    assert call["attention_mask"].shape == call["input_ids"].shape
    assert call["pad_token_id"] == tokenizer.eos_token_id
    assert call["top_k"] == 0  # off unless asked for, not transformers' implicit 50


def test_generation_stops_at_eos(tiny):
    from finetune.infer import sampling

    model, tokenizer = tiny
    kwargs = sampling.generation_kwargs(model, tokenizer, max_new_tokens=10, temperature=1.0)
    enc = tokenizer("the river", return_tensors="pt")
    with torch.inference_mode():
        (free,) = sampling.generate_samples(model, tokenizer, "the river", kwargs, num_samples=1, seed=0,
                                            device="cpu")
        assert (free.new_tokens, free.finish_reason) == (10, "length")
        sampling.seed_generators(0, torch.device("cpu"))
        new_ids = model.generate(**enc, **kwargs)[0, enc["input_ids"].shape[1]:].tolist()
        # declare a token sampled at a later step the end-of-text token: the same draws stop there
        step = next(i for i in range(1, len(new_ids)) if new_ids[i] not in new_ids[:i])
        kwargs["eos_token_id"] = new_ids[step]
        (ended,) = sampling.generate_samples(model, tokenizer, "the river", kwargs, num_samples=1, seed=0,
                                             device="cpu")
    assert (ended.new_tokens, ended.finish_reason) == (step + 1, "eos")
    assert ended.text == tokenizer.decode(enc["input_ids"][0].tolist() + new_ids[:step])


# -----------------------------------------------------------------------------
# Bad input: one `error: ... HINT: ...` line, exit code 2, no traceback


@pytest.fixture
def broken_models(tiny_model_dir, tmp_path):
    """Model folders missing one piece each, as an interrupted save leaves them."""
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, no_tokenizer)
    training_output = tmp_path / "out"
    shutil.copytree(tiny_model_dir, training_output / "best")
    return {"config_only": config_only, "no_tokenizer": no_tokenizer, "training_output": training_output}


BAD_SETTINGS = [
    (["--prompt", "x", "--temperature", "0"], ["--temperature", "--greedy"]),
    (["--prompt", "x", "--temperature", "-0.5"], ["--temperature", "--greedy"]),
    (["--prompt", "x", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--prompt", "x", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--prompt", "x", "--top-k", "-1"], ["--top-k"]),
    (["--prompt", "x", "--num-samples", "0"], ["--num-samples"]),
    (["--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--prompt", "x", "--greedy", "--num-samples", "2"], ["--greedy", "--num-samples"]),
    (["--prompt", "x", "--output", "no/such/folder/samples.jsonl"], ["--output", "does not exist"]),
    (["--prompt", ""], ["prompt 1 is empty"]),
    (["--prompt", "x", "--prompt", "   "], ["prompt 2 is empty"]),
    ([], ["no prompt given", "--prompt"]),
    (["--prompt-file", "no-such-prompts.txt"], ["no-such-prompts.txt", "does not exist"]),
    (["--prompt", "-", "--prompt", "-"], ["stdin"]),
    (["--prompt", "x", "--system", "Be brief."], ["--system gives the system turn of a --chat conversation"]),
]


@pytest.mark.parametrize("args,fragments", BAD_SETTINGS, ids=[" ".join(a) or "no prompt" for a, _ in BAD_SETTINGS])
def test_bad_settings(tiny_model_dir, args, fragments):
    assert_clean_error(generate("--model", tiny_model_dir, *args), *fragments, "HINT")


def test_blank_prompt_file(tiny_model_dir, tmp_path):
    prompt_file = tmp_path / "blank.txt"
    prompt_file.write_text("\n   \n\n", encoding="utf-8")
    assert_clean_error(generate("--model", tiny_model_dir, "--prompt-file", prompt_file), "no prompts", "HINT")


@pytest.mark.slow
def test_missing_and_incomplete_model_folders(broken_models, tmp_path):
    assert_clean_error(generate("--model", "./no-such-model", "--prompt", "x"), "does not exist", "HINT")
    # the default, --model out, from a folder where nothing was trained yet
    (tmp_path / "fresh").mkdir()
    assert_clean_error(generate("--prompt", "x", cwd=tmp_path / "fresh"), "out does not exist", "HINT")
    assert_clean_error(generate("--model", broken_models["config_only"], "--prompt", "x"), "no weights", "HINT")
    assert_clean_error(generate("--model", broken_models["no_tokenizer"], "--prompt", "x"), "no tokenizer", "HINT")
    # the training output folder itself, holding best/: point the user at it
    assert_clean_error(generate("--model", broken_models["training_output"], "--prompt", "x"),
                       "no config.json", "best", "HINT")


def test_prompt_and_max_new_tokens_longer_than_context(tiny_model_dir):
    # the tiny model's context is 128 tokens; the default --max-new-tokens is 200
    assert_clean_error(generate("--model", tiny_model_dir, "--prompt", "the river"),
                       "context of 128 tokens", "lower --max-new-tokens", "HINT")


def test_prompt_alone_longer_than_context(tiny_model_dir, capsys):
    long_prompt = "the river and the sea " * 40
    result = run_main(generate_module.main, [*CPU, "--model", tiny_model_dir, "--prompt", long_prompt, "--max-new-tokens", 4],
                      capsys)
    assert_clean_error(result, "context of 128 tokens", "shorten the prompt", "HINT")


def test_truncated_weights(tiny_model_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_clean_error(run_main(generate_module.main, [*CPU, "--model", damaged, "--prompt", "x", "--max-new-tokens", 4], capsys),
                       "cannot load the weights", "HINT")


def test_hub_name_that_is_not_cached(capsys):
    # conftest sets HF_HUB_OFFLINE=1, so this fails without trying the network
    assert_clean_error(run_main(generate_module.main, [*CPU, "--model", "no-such-org/no-such-model", "--prompt", "x"], capsys),
                       "no-such-org/no-such-model", "hugging face hub", "HF_HUB_OFFLINE",
                       "HINT: pass a local model folder")


# -----------------------------------------------------------------------------
# Samples during training


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports use deprecated torch.jit
def test_sample_during_training_leaves_training_untouched(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.infer.sampling import sample_during_training

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # its own: this test changes its modes
    model.train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was, not as all-train
    modes = [m.training for m in model.modules()]
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()

    prompts = ["the river", "A ship"]
    # as a training script may hold it: DataParallel (like DDP, the model under .module) around
    # a compiled model (the model under ._orig_mod; never called here, so nothing is compiled)
    wrapped = torch.nn.DataParallel(torch.compile(model))
    first = sample_during_training(wrapped, tokenizer, prompts, max_new_tokens=12, seed=5, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [m.training for m in model.modules()] == modes

    second = sample_during_training(model, tokenizer, prompts, max_new_tokens=12, seed=5, device="cpu")
    assert first == second
    assert len(first) == 2 and first[0].startswith("the river") and first[1].startswith("A ship")
    assert sample_during_training(model, tokenizer, prompts, max_new_tokens=12, seed=6, device="cpu") != first
    # more new tokens than the 128-token context holds: cut short, training goes on
    (long,) = sample_during_training(model, tokenizer, ["the river"], max_new_tokens=500, seed=5, device="cpu")
    assert long.startswith("the river")
    assert torch.equal(torch.get_rng_state(), rng_before)


# -----------------------------------------------------------------------------
# --output never replaces what it should not (issue 23, item 12: it used to overwrite the model it read)


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_refuses_the_model_and_run_files(tiny_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "out"
    shutil.copytree(tiny_model_dir, run_dir)
    shutil.copytree(tiny_model_dir, run_dir / "best")
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.0}\n')
    (tmp_path / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    quick = ("--prompt", "x", "--max-new-tokens", 2)
    for model, output, words in [
        (run_dir, run_dir / "config.json", ["would write into the model folder", "HINT"]),
        (run_dir, run_dir / "model.safetensors", ["would write into the model folder"]),
        (run_dir, run_dir / "metrics.jsonl", ["would write into the model folder"]),
        (run_dir / "best", run_dir / "metrics.jsonl", ["belong to the model or its training run"]),
        (run_dir / "best", run_dir / "best" / "tokenizer.json", ["would write into the model folder"]),
        (run_dir, tmp_path / "notes.txt", ["is not a sample file written by generate.py", "HINT"]),
    ]:
        assert_clean_error(run_main(generate_module.main, [*CPU, "--model", model, *quick, "--output", output], capsys), *words)
    assert snapshot(tmp_path) == before  # nothing replaced, no temporary left


def test_output_replaces_its_own_samples_atomically(tiny_model_dir, tmp_path):
    import generate

    out = tmp_path / "samples.jsonl"
    args = ["--model", str(tiny_model_dir), *CPU, "--prompt", "x", "--max-new-tokens", "2", "--seed", "1"]
    assert generate.main([*args, "--output", str(out)]) == 0
    assert [r["sample_index"] for r in read_jsonl(out)] == [0]
    assert generate.main([*args, "--num-samples", "2", "--output", str(out)]) == 0  # ours: replaced
    assert [r["sample_index"] for r in read_jsonl(out)] == [0, 1]
    # a sample file of ours beside the model's files is fine too
    run_dir = tmp_path / "out"
    shutil.copytree(tiny_model_dir, run_dir)
    assert generate.main([*args[2:], "--model", str(run_dir), "--output", str(run_dir / "mine.jsonl")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "samples.jsonl"]  # no temporary left


def test_prompt_file_folder_or_device_is_named_as_such(tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    from finetune.core.errors import UserError
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    generate_module = importlib.import_module("generate")
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)  # never opened: a read would block
    with pytest.raises(UserError) as error:
        generate_module.read_prompt_file(tmp_path)
    assert str(error.value) == (f"--prompt-file {tmp_path} is a folder, not a file. HINT: name a text file with "
                                f"one prompt per line")
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(UserError) as error:
            generate_module.read_prompt_file(path)
        assert str(error.value) == (f"--prompt-file {path} is not a regular file (a device, FIFO or socket). "
                                    f"HINT: save the prompts to a text file, one per line, or pass --prompt - "
                                    f"to read stdin")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_keeps_the_samples_written_as_ctrl_c_does(tiny_model_dir, tmp_path, signum):
    """`timeout` or a scheduler's SIGTERM after hundreds of samples used to leave no --output file and the
    samples in a hidden .tmp- that nothing removed; now it ends like Ctrl-C: the samples done are kept."""
    out = tmp_path / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "generate.py"), *CPU, "--model", str(tiny_model_dir),
                             "--prompt", "x", "--max-new-tokens", "4", "--num-samples", "100000", "--seed", "1",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tmp = list(tmp_path.glob(".tmp-samples.jsonl-*"))
            if tmp and tmp[0].stat().st_size > 0 and tmp[0].read_bytes().count(b"\n") >= 64:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (143 if signum == signal.SIGTERM else 130), stderr
    assert "Traceback" not in stderr, stderr
    records = read_jsonl(out)
    assert len(records) >= 64 and [r["sample_index"] for r in records] == list(range(len(records)))
    assert [p.name for p in tmp_path.iterdir()] == ["samples.jsonl"]  # no hidden temporary left


def test_a_killed_writers_temporary_is_removed_by_the_next_run(tiny_model_dir, tmp_path):
    """kill -9 runs no cleanup: the next run writing the same --output removes the hidden temporary of a writer
    that is gone, and keeps one whose writer still runs."""
    import generate

    out = tmp_path / "samples.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-samples.jsonl-{int(dead.stdout)}"
    stale.write_text('{"prompt": "x"}\n')
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    running = tmp_path / f".tmp-samples.jsonl-{writer.pid}"
    running.write_text('{"prompt": "y"}\n')
    try:
        assert generate.main(["--model", str(tiny_model_dir), *CPU, "--prompt", "x", "--max-new-tokens", "2",
                              "--seed", "1", "--output", str(out)]) == 0
    finally:
        writer.kill()
        writer.wait()
    assert not stale.exists() and out.is_file() and running.read_text() == '{"prompt": "y"}\n'


@pytest.mark.parametrize("locale,chat", [("C", False), ("C.UTF-8", True)])
def test_stdin_that_is_not_utf8_is_one_line_under_any_locale(tiny_model_dir, locale, chat):
    """Under a C or C.UTF-8 locale Python reads stdin with surrogateescape, so invalid bytes used to pass the
    check and crash in the tokenizer (TypeError: TextEncodeInput); now they are the documented line."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "generate.py"), *CPU, "--model", str(tiny_model_dir), "--prompt", "-",
         *(["--chat"] if chat else [])],
        input=b"The old \xff\xfe captain\n", capture_output=True, cwd=REPO_ROOT, timeout=300,
        env={**os.environ, "LC_ALL": locale, "LANG": locale, "PYTHONIOENCODING": ""})
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert_one_line_error(result, "stdin (--prompt -) is not valid UTF-8 text", "HINT: convert it to UTF-8")


@pytest.mark.parametrize("config,fragment", [("[]", "holds a JSON list, not the object of settings"),
                                             ('{"base_model_name_or_path": 123}',
                                              "base_model_name_or_path is a number (123)")])
def test_adapter_config_that_is_not_an_object_or_names_no_base_is_one_line(tmp_path, capsys, config, fragment):
    pytest.importorskip("peft")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config, encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    result = run_main(generate_module.main, [*CPU, "--model", adapter, "--prompt", "x"], capsys)
    assert_one_line_error(result, f"{adapter / 'adapter_config.json'}", fragment, "HINT:")


# -----------------------------------------------------------------------------
# The seed line only where it repeats something; many samples in batches


def test_greedy_does_not_offer_a_seed_to_repeat_its_samples(tiny_model_dir, capsys):
    import generate

    common = ("--device", "cpu", "--precision", "fp32", "--model", str(tiny_model_dir), "--prompt", "the river",
              "--max-new-tokens", "4")
    assert generate.main([*common, "--greedy"]) == 0
    assert "--seed" not in capsys.readouterr().err  # the same text every time: no seed to pass
    assert generate.main(list(common)) == 0
    assert "to get the same samples again" in capsys.readouterr().err  # sampling still says it



def test_many_samples_are_generated_in_batches_and_streamed(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import generate

    calls = []
    real_generate_samples = generate.generate_samples

    def counting(*args, num_samples, **kwargs):
        calls.append(num_samples)
        return real_generate_samples(*args, num_samples=num_samples, **kwargs)

    monkeypatch.setattr(generate, "generate_samples", counting)
    monkeypatch.setattr(generate, "SAMPLES_PER_BATCH", 2, raising=False)
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32", "--prompt", "The sea",
              "--max-new-tokens", "6", "--seed", "3"]
    assert generate.main([*common, "--num-samples", "5", "--output", str(tmp_path / "five.jsonl")]) == 0
    assert calls == [2, 2, 1]  # never more rows at once than a batch
    five = [json.loads(line) for line in (tmp_path / "five.jsonl").read_text().splitlines()]
    assert [r["sample_index"] for r in five] == [0, 1, 2, 3, 4]
    assert capsys.readouterr().out.count("--- sample ") == 5
    # The first batch is what one generate call seeded with --seed gives: the samples of --num-samples 2.
    assert generate.main([*common, "--num-samples", "2", "--output", str(tmp_path / "two.jsonl")]) == 0
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["text"] for r in two] == [r["text"] for r in five[:2]]
    assert len({r["text"] for r in five}) > 2  # later batches are not copies of the first
