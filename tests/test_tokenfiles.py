"""finetune/formats/tokenfiles.py, as the training script meets it: a --data-dir that is a file, and token ids beyond the
model's vocabulary behind a meta.json that under-states them, each refused with one line before anything loads."""
from __future__ import annotations

import json
import shutil

import numpy as np
from transformers import AutoConfig

import finetune_generative as ft
from helpers import assert_clean_error, base_args, error_lines, run_main


def test_data_dir_that_is_a_file(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir / "meta.json", tmp_path / "out"), capsys)
    assert_clean_error(result, f"{tiny_data_dir}/meta.json is a file, not a folder",
                       f"HINT: pass the folder prepare_data.py wrote (train.bin, val.bin and meta.json): {tiny_data_dir}")
    assert "--output-dir" not in result.stderr.split("HINT:")[1]  # never: prepare_data --output-dir <that file>
    assert not (tmp_path / "out").exists()



def test_token_ids_beyond_the_vocabulary_are_refused_whatever_meta_json_says(tmp_path, tiny_model_dir,
                                                                            tiny_data_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    assert meta["max_token_id"] < vocab and meta["dtype"] == "uint16"
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[123] = vocab + 7  # meta.json, the sizes and the dtype still agree: only the ids tell
    tokens.flush()
    del tokens
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, data, out, "--dry-run"), capsys)
    assert_clean_error(result)
    assert error_lines(result.stderr) == [
        f"error: {data / 'train.bin'} holds token id {vocab + 7} but the model's vocabulary has only {vocab} entries, "
        f"though meta.json says the largest id is {meta['max_token_id']} (the files no longer match what "
        f"prepare_data.py wrote). HINT: prepare the data again with this model's tokenizer: python prepare_data.py "
        f"--tokenizer MODEL --output-dir {data}"]
    assert result.stdout == "" and not out.exists()
