"""One CLI system (finetune/core/cli.py, finetune/core/flags.py): every script's flags come from settings dataclasses, a
flag two scripts take means the same in both, `--config FILE` (TOML, YAML, JSON) gives any setting with the
flags winning over it, what a run records feeds back through --config, and a bad config file is one error line."""
from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest

import evaluate
import export
import finetune_generative as ft
import generate
import prepare_data
from finetune.core import cli
from finetune.core.flags import SHARED_FLAGS
from finetune.train import config
from helpers import REPO_ROOT, assert_one_line_error, make_corpus, run_main

# script -> (its settings class, its parser)
SCRIPTS = {
    "prepare_data.py": (prepare_data.PrepareSettings, prepare_data.build_arg_parser),
    "finetune_generative.py": (config.TrainConfig, config.build_arg_parser),
    "generate.py": (generate.GenerateSettings, generate.build_arg_parser),
    "export.py": (export.ExportSettings, export.build_arg_parser),
    "evaluate.py": (evaluate.EvaluateSettings, evaluate.build_arg_parser),
}


def parse(script: str, argv: list) -> object:
    settings_cls, make_parser = SCRIPTS[script]
    return cli.parse_config(settings_cls, make_parser, [str(a) for a in argv])[0]


# -----------------------------------------------------------------------------
# One meaning per flag


def declarations() -> dict[str, dict[str, dataclasses.Field]]:
    """flag name -> {script: its field}."""
    found: dict[str, dict[str, dataclasses.Field]] = {}
    for script, (settings_cls, _) in SCRIPTS.items():
        for f in dataclasses.fields(settings_cls):
            found.setdefault(f.name, {})[script] = f
    return found


def test_every_flag_two_scripts_take_is_one_shared_definition():
    """A flag in several scripts is declared with flags.shared everywhere: the same choices and item type, one
    meaning; only the default (and the metavar, and whether it repeats) is the script's."""
    shared_by_several = {name: by_script for name, by_script in declarations().items() if len(by_script) > 1}
    assert {"device", "precision", "seed", "num_workers", "model", "batch_size", "block_size"} <= set(shared_by_several)
    for name, by_script in shared_by_several.items():
        for script, f in by_script.items():
            assert f.metadata.get("shared") == name, f"{script}: --{name} is not declared with flags.shared"
        kinds = {script: cli.field_kind(f)[2] for script, f in by_script.items()}
        assert len(set(kinds.values())) == 1, (name, kinds)
        choices = {script: f.metadata.get("choices") for script, f in by_script.items()}
        assert len({repr(c) for c in choices.values()}) == 1, (name, choices)
    assert {name for by_script in declarations().values() for f in by_script.values()
            if (name := f.metadata.get("shared"))} <= set(SHARED_FLAGS)


def test_shared_runtime_flags_parse_alike_in_every_script():
    """--device, --precision and --seed: the same values accepted and read the same way wherever they exist."""
    for script, (settings_cls, _) in SCRIPTS.items():
        names = {f.name for f in dataclasses.fields(settings_cls)}
        argv = [*(["--device", "cpu"] if "device" in names else []),
                *(["--precision", "bf16"] if "precision" in names else []),
                *(["--seed", "7"] if "seed" in names else []),
                *(["--model", "m"] if script == "export.py" else [])]
        settings = parse(script, argv)
        for name, value in (("device", "cpu"), ("precision", "bf16"), ("seed", 7)):
            if name in names:
                assert getattr(settings, name) == value, (script, name)


@pytest.mark.parametrize("script", ["generate.py", "evaluate.py"])
def test_prompt_dash_reads_stdin_in_both_scripts_that_take_prompts(script, monkeypatch):
    """--prompt - once meant stdin in generate.py and the text "-" in evaluate.py: now stdin in both."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\n")))
    settings = parse(script, ["--prompt", "first", "--prompt", "-"])
    prompts = evaluate.read_prompts(settings) if script == "evaluate.py" else generate.prompt_texts(settings.prompt)
    assert prompts == ["first", "from stdin"]


def test_help_texts_do_not_depend_on_what_sys_modules_holds_now(monkeypatch):
    """An in-process --lm-eval puts Hugging Face's `evaluate` package where the imported evaluate.py was: the
    flags' help texts are still read from the file that defined them."""
    expected = cli.field_docs(evaluate.Runtime)
    monkeypatch.setitem(sys.modules, "evaluate", type(sys)("evaluate"))  # another module of that name
    assert cli.field_docs(evaluate.Runtime) == expected and expected
    assert parse("evaluate.py", []) == evaluate.EvaluateSettings()


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_are_the_fields_defaults(script):
    """No flag given: the settings are the dataclass's own defaults (one source for them)."""
    settings_cls, _ = SCRIPTS[script]
    argv = ["--model", "m"] if script == "export.py" else []
    parsed = parse(script, argv)
    expected = settings_cls(**({"model": "m"} if script == "export.py" else {}))
    if script == "finetune_generative.py":
        expected = config.with_absolute_paths(expected)
        parsed = config.with_absolute_paths(parsed)
    assert parsed == expected


def test_prepare_help_lists_every_input_extension():
    """The --input help is a docstring now, no longer built from the extension lists: it must name them all."""
    from finetune.prepare.sources import RECORD_EXTENSIONS, TEXT_EXTENSIONS

    help_text = " ".join(prepare_data.build_arg_parser().format_help().split())
    assert all(ext in help_text for ext in (*TEXT_EXTENSIONS, *RECORD_EXTENSIONS))


# -----------------------------------------------------------------------------
# --config: precedence flag > file > default, and each format


def test_flag_beats_file_beats_default(tmp_path):
    path = tmp_path / "gen.toml"
    path.write_text('temperature = 0.5\nseed = 3\nprompt = ["a", "b"]\nmax-new-tokens = 20\n', encoding="utf-8")
    settings = parse("generate.py", ["--config", path, "--seed", 4, "--prompt", "c"])
    assert (settings.temperature, settings.seed, settings.prompt, settings.max_new_tokens) == (0.5, 4, ["c"], 20)
    assert settings.top_k is None and settings.model == generate.DEFAULT_MODEL  # neither file nor flag: default


def test_keys_from_the_file_count_as_given_on_a_resume(tmp_path):
    """A resume keeps the checkpoint's value of every setting not given; a setting from --config was given."""
    path = tmp_path / "run.toml"
    path.write_text("lr = 0.001\nmax_steps = 9\n", encoding="utf-8")
    cfg, explicit = config.parse_config(["--config", str(path), "--epochs", "2"])
    assert (cfg.lr, cfg.max_steps, cfg.epochs) == (0.001, 9, 2) and explicit == {"lr", "max_steps", "epochs"}


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_each_format_gives_the_same_settings(tmp_path, suffix):
    values = {"model": "m", "outtype": "q8_0", "overwrite": True, "output": "x.gguf"}
    text = {".toml": "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()),
            ".yaml": "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()),
            ".json": json.dumps(values)}[suffix]
    path = tmp_path / f"export{suffix}"
    path.write_text(text, encoding="utf-8")
    assert parse("export.py", ["--config", path]) == export.ExportSettings(**values)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads 1e-4 as a string (YAML 1.1 wants a dot): a float setting takes it as the number meant."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nwarmup-ratio: 0\n", encoding="utf-8")
    cfg, _ = config.parse_config(["--config", str(path)])
    assert (cfg.lr, cfg.warmup_ratio) == (1e-4, 0.0) and isinstance(cfg.warmup_ratio, float)


# -----------------------------------------------------------------------------
# What each run records feeds back through --config


@pytest.mark.slow  # the one-step run (a session fixture other modules share)
def test_training_config_written_by_a_run_reloads_as_the_same_settings(one_step):
    out, _ = one_step
    saved = json.loads((out / "train_config.json").read_text(encoding="utf-8"))
    reloaded, _ = config.parse_config(["--config", str(out / "train_config.json")])
    assert reloaded == config.TrainConfig(**saved)
    assert dataclasses.asdict(reloaded) == saved  # every key, every value, no key added or lost


def test_prepare_records_its_settings_in_meta_json_and_they_reproduce_the_run(tmp_path, tiny_model_dir, capsys):
    corpus = tmp_path / "book.txt"
    corpus.write_text(make_corpus(20_000, seed=3), encoding="utf-8")
    first = tmp_path / "first"
    argv = ["--input", corpus, "--tokenizer", tiny_model_dir, "--output-dir", first, "--block-size", 32,
            "--seed", 5, "--val-fraction", 0.2, "--num-workers", 1]
    assert run_main(prepare_data.main, argv, capsys).returncode == 0
    meta = json.loads((first / "meta.json").read_text(encoding="utf-8"))
    # every flag but where the outputs go and how fast they are made (they change no byte of them)
    assert set(meta["settings"]) == {f.name for f in dataclasses.fields(prepare_data.PrepareSettings)} - {
        "output_dir", "overwrite", "num_workers", "engine", "sample_book"}
    reloaded = prepare_data.parse_args(["--config", str(first / "meta.json"), "--output-dir", str(first),
                                        "--num-workers", "1"])
    assert reloaded == prepare_data.parse_args([str(a) for a in argv])
    again = tmp_path / "again"
    result = run_main(prepare_data.main, ["--config", first / "meta.json", "--output-dir", again], capsys)
    assert result.returncode == 0, result.stderr
    for name in ("train.bin", "val.bin"):
        assert (again / name).read_bytes() == (first / name).read_bytes()


def test_evaluate_records_its_settings_in_eval_json_and_they_reproduce_the_run(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "held.txt"
    text.write_text(make_corpus(2000, seed=11), encoding="utf-8")
    argv = ["--model", tiny_model_dir, "--input", text, "--batch-size", 2, "--device", "cpu", "--precision", "fp32",
            "--seed", 3, "--output", tmp_path / "e1"]
    assert run_main(evaluate.main, argv, capsys).returncode == 0
    first = json.loads((tmp_path / "e1" / "eval.json").read_text(encoding="utf-8"))
    reloaded = evaluate.parse_args(["--config", str(tmp_path / "e1" / "eval.json"), "--output", str(tmp_path / "e1")])
    assert reloaded == evaluate.parse_args([str(a) for a in argv])
    result = run_main(evaluate.main, ["--config", tmp_path / "e1" / "eval.json", "--output", tmp_path / "e2"], capsys)
    assert result.returncode == 0, result.stderr
    second = json.loads((tmp_path / "e2" / "eval.json").read_text(encoding="utf-8"))
    assert second["evaluations"] == first["evaluations"] and second["settings"] == first["settings"]


@pytest.mark.parametrize("script", ["generate.py", "export.py"])
def test_every_setting_of_the_scripts_without_a_record_round_trips_through_a_file(script, tmp_path):
    """All fields written to a JSON file (as a user's --config) and read back: the same settings."""
    settings_cls, _ = SCRIPTS[script]
    settings = parse(script, ["--model", "m", "--overwrite"] if script == "export.py" else
                     ["--model", "m", "--seed", 9, "--prompt", "p", "--greedy", "--top-k", 5, "--top-p", 0.5])
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(dataclasses.asdict(settings)), encoding="utf-8")
    assert parse(script, ["--config", path]) == settings


# -----------------------------------------------------------------------------
# A bad config file: one line naming the file (and the key), exit 2


BAD_CONFIGS = [
    ("bad.toml", "lr = 1e-4\nlrr = 3\n", ["bad.toml", "unknown key 'lrr'", "did you mean 'lr'"]),
    ("bad.toml", 'epochs = "three"\n', ["bad.toml", "'epochs' must be a whole number", "'three'"]),
    ("bad.toml", "max_steps = true\n", ["bad.toml", "'max_steps' must be a whole number"]),
    ("bad.toml", 'device = "tpu"\n', ["bad.toml", "'device' must be one of auto, cuda, mps, cpu"]),
    ("bad.toml", 'sample_prompts = "hello"\n', ["bad.toml", "'sample_prompts' must be a list"]),
    ("bad.json", '{"lr": null}', ["bad.json", "'lr' cannot be empty"]),
    ("bad.toml", "lr = \n", ["bad.toml", "is not valid TOML"]),
    ("bad.yaml", "lr: [1\n", ["bad.yaml", "is not valid YAML"]),
    ("bad.json", "[1, 2]", ["bad.json", "holds a list, not a table"]),
    ("bad.ini", "lr = 1\n", ["bad.ini", "not a .toml, .yaml, .yml or .json file"]),
    ("bad.toml", "lrr = 1\nepochs = -1.5\n", ["2 problems with --config", "unknown key 'lrr'", "'epochs' must be"]),
]


@pytest.mark.parametrize("name, text, fragments", BAD_CONFIGS, ids=[str(i) for i in range(len(BAD_CONFIGS))])
def test_bad_config_file_is_one_error_line(tmp_path, capsys, name, text, fragments):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = run_main(ft.main, ["--config", path, "--output-dir", tmp_path / "out"], capsys)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_one_error_line_in_every_script(tmp_path, capsys):
    for main in (prepare_data.main, generate.main, export.main, evaluate.main, ft.main):
        result = run_main(main, ["--config", tmp_path / "nope.toml"], capsys)
        assert_one_line_error(result, "--config", "nope.toml does not exist")


def test_a_key_of_another_script_is_refused_naming_it(tmp_path, capsys):
    """prepare_data's meta.json is not generate.py's config: its keys are named, nothing runs."""
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({"format": "x", "settings": {"tokenizer": "gpt2", "seed": 1}}), encoding="utf-8")
    result = run_main(generate.main, ["--config", path, "--prompt", "hi"], capsys)
    assert_one_line_error(result, "meta.json", "unknown key 'tokenizer'")


def test_yaml_without_pyyaml_is_one_line_naming_the_pip_command(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\n", encoding="utf-8")
    code = ("import sys; sys.modules['yaml'] = None; sys.argv = ['generate.py', '--config', sys.argv[1]]; "
            f"sys.path.insert(0, {str(REPO_ROOT)!r}); import generate; generate.main()")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert_one_line_error(result, "run.yaml", "pip install pyyaml")


def test_export_without_a_model_is_one_line(capsys):
    """--model is required, from the command line or the file (argparse's required= cannot see the file)."""
    assert_one_line_error(run_main(export.main, [], capsys), "--model is required")


def test_every_settings_problem_of_the_training_script_has_a_hint(tmp_path):
    cfg = dataclasses.replace(config.TrainConfig(), epochs=0, max_steps=0, batch_size=0, grad_accum=-1, block_size=1,
                              lr=0, warmup_ratio=2, beta1=1, dropout=1.5, extend=True, scheduler="nope",
                              sample_prompts=[" "], num_workers=-1, output_dir=str(tmp_path / "f"))
    (tmp_path / "f").write_text("", encoding="utf-8")
    problems = config.validate_config(cfg)
    assert len(problems) >= 13 and all("HINT:" in p for p in problems), problems


def test_config_flag_is_in_every_help():
    """(tests/test_layout.py loads each script's --help with torch blocked.)"""
    for script, (_, make_parser) in SCRIPTS.items():
        assert "--config FILE" in make_parser().format_help(), script
