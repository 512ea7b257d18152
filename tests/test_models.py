"""finetune/models/loading.py, the one loader of models and tokenizers, as every script meets it: a pickle that would run
code is refused in our words, a folder without config.json or a hub name while offline gets a hint that fits, and
a model folder that ships its own Python code (auto_map in config.json) is refused by every script: one error
line, exit 2, the code never imported, and stdin never read (transformers, left to itself, asks there whether to
run it, and a piped "y" would say yes)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import finetune_generative as ft
import generate
from helpers import (
    REPO_ROOT,
    RunsCodeWhenUnpickled,
    assert_clean_error,
    assert_refused_unsafely_loadable,
    base_args,
    run_main,
    weights,
)

# -----------------------------------------------------------------------------
# Unsafe weights, a folder that is not a model, a hub name while offline


def test_malicious_pickle_weights_are_refused_by_training_and_generate(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                        capsys):
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, evil)
    state = weights(evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**state, "payload": RunsCodeWhenUnpickled(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):  # what torch itself says (and advises)
        torch.load(evil / "pytorch_model.bin", weights_only=True)

    result = run_main(ft.main, base_args(evil, tiny_data_dir, tmp_path / "out"), capsys)
    assert_refused_unsafely_loadable(result, marker, "not a safe weights file", "HINT: use a model saved as "
                                     "model.safetensors")
    result = run_main(generate.main, ["--device", "cpu", "--precision", "fp32", "--model", evil, "--prompt", "x",
                                      "--max-new-tokens", 2], capsys)
    assert_refused_unsafely_loadable(result, marker, "not a safe weights file", "safetensors")


def test_model_folder_without_config_json(tmp_path, tiny_tokenizer_dir, tiny_data_dir, capsys):
    result = run_main(ft.main, base_args(tiny_tokenizer_dir, tiny_data_dir, tmp_path / "out"), capsys)
    assert_clean_error(result, "has no config.json, so it is not a saved model",
                       "HINT: pass the folder that holds config.json and the weights")
    assert "offline" not in result.stderr.lower() and "HF_HUB_OFFLINE" not in result.stderr
    assert "model_type" not in result.stderr  # transformers' reading of a config.json that is not there


def test_hub_name_with_hf_hub_offline_already_set(tmp_path, tiny_data_dir, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    result = run_main(ft.main, base_args("no-such-org/no-such-model", tiny_data_dir, tmp_path / "out"), capsys)
    assert_clean_error(result, "HF_HUB_OFFLINE is set, so the hub was not asked",
                       "HINT: pass a local model folder with --model", "or unset HF_HUB_OFFLINE once to download it",
                       "`hf download no-such-org/no-such-model --local-dir ./no-such-model`, "
                       "then pass --model ./no-such-model")
    assert "set HF_HUB_OFFLINE=1" not in result.stderr


def test_hub_name_with_no_network_names_the_download_command(tmp_path, tiny_data_dir, capsys, monkeypatch):
    """Offline, the HINT names the command that fetches the model on a machine with network."""
    import finetune.models.loading as models
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)  # no network, without waiting for it
    result = run_main(ft.main, base_args("gpt2-no-such-size", tiny_data_dir, tmp_path / "out"), capsys)
    assert_clean_error(result, "the hub is not reachable (no network?)",
                       "or download it once on a machine with network: "
                       "`hf download gpt2-no-such-size --local-dir ./gpt2-no-such-size`, "
                       "then pass --model ./gpt2-no-such-size")


# -----------------------------------------------------------------------------
# A model folder with its own code


# Imported by transformers only if it runs the folder's code: then it leaves a marker next to itself.
OWN_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the folder's code was executed")
"""


@pytest.fixture
def own_code_folder(tmp_path, tiny_model_dir):
    """The tiny model's tokenizer and weights, but a config naming an architecture only its own .py has."""
    folder = tmp_path / "own_code_model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="homemade_gpt", architectures=["HomemadeForCausalLM"],
                  auto_map={"AutoConfig": "homemade.HomemadeConfig",
                            "AutoModelForCausalLM": "homemade.HomemadeForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "homemade.py").write_text(OWN_CODE, encoding="utf-8")
    return folder


def run_answering_yes(tmp_path, script: str, *args) -> subprocess.CompletedProcess:
    """The script as a user runs it, with "y" waiting on stdin should anything ask whether to run code."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], input="y\n", env=env,
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["finetune_generative.py", "generate.py", "prepare_data.py"])
def test_folder_with_its_own_code_is_refused_without_running_it(script, own_code_folder, tiny_data_dir,
                                                                corpus_file, tmp_path):
    out = tmp_path / "out"
    args = {
        "finetune_generative.py": ["--model", own_code_folder, "--data-dir", tiny_data_dir, "--output-dir", out,
                                   "--device", "cpu", "--precision", "fp32", "--block-size", 32],
        "generate.py": ["--model", own_code_folder, "--device", "cpu", "--prompt", "The sea"],
        "prepare_data.py": ["--input", corpus_file, "--tokenizer", own_code_folder, "--output-dir", out],
    }[script]
    result = run_answering_yes(tmp_path, script, *args)
    assert_clean_error(result, "asks to run its own python code (homemade.py", "never runs code",
                       "trust_remote_code=False", "HINT: use a model whose architecture transformers ships")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr  # transformers' question was never asked
    assert not (own_code_folder / "CODE_RAN").exists()
    assert not any((tmp_path / "hf").glob("modules/transformers_modules/**/homemade.py"))  # not even copied
    assert not out.exists()
