"""What earlier commits wrote still works: a checkpoint written by the commit before a change to the training
code resumes after it and ends as that commit's uninterrupted run did (tests/fixtures/previous-checkpoint, made by
tests/fixtures/make_previous_checkpoint.py from the commit named in its expected.json)."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

import finetune_generative as ft
from helpers import REPO_ROOT, assert_trained_alike, train_records

PREVIOUS = REPO_ROOT / "tests" / "fixtures" / "previous-checkpoint"


def test_a_checkpoint_of_the_previous_commit_resumes_to_the_same_end(tmp_path):
    expected = json.loads((PREVIOUS / "expected.json").read_text())
    shutil.copytree(PREVIOUS / "data", tmp_path / "data")
    shutil.copytree(PREVIOUS / "out", tmp_path / "out")
    # the checkpoint names the data folder it was trained on, which was elsewhere: the same files, given again
    assert ft.main(["--output-dir", str(tmp_path / "out"), "--resume", "--data-dir", str(tmp_path / "data")]) == 0
    records = train_records(tmp_path / "out")
    assert [r["step"] for r in records] == expected["steps"]
    assert [r["lr"] for r in records] == expected["lrs"]
    # bitwise on the CPU that wrote the fixture; within rounding on any other
    assert [r["loss"] for r in records] == pytest.approx(expected["losses"], abs=1e-5)
    assert_trained_alike(load_file(tmp_path / "out" / "model.safetensors"),
                         load_file(PREVIOUS / "expected-final.safetensors"), expected["lrs"])
