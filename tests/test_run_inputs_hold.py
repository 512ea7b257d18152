"""Issue 23 (defects3): what a run holds on to while it runs, and what it says when a fault hits.

- the token files a run fingerprinted are the ones it trains on, even if prepare_data.py replaces them
  while the model loads; a file rewritten in place under the run stops it with one line (item 14).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from finetune.data import DataError, TextDataset, data_fingerprint, load_meta

BLOCK = 32


def copy_data(tiny_data_dir: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(tiny_data_dir, dst)
    return dst, load_meta(dst)


def replace_like_prepare_data(path: Path, content: bytes) -> None:
    """prepare_data.py --overwrite writes a new file aside and renames it into place (a new inode)."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def test_the_run_trains_on_the_files_it_fingerprinted_when_they_are_replaced(tmp_path, tiny_data_dir, caplog):
    data, meta = copy_data(tiny_data_dir, tmp_path / "data")
    original = np.fromfile(data / "train.bin", dtype=meta["dtype"])
    data_fingerprint(meta, data)  # what the run does before the weights load
    # ... then prepare_data.py --overwrite, while the model loads: same size, other tokens.
    replace_like_prepare_data(data / "train.bin", (original[::-1]).tobytes())
    dataset = TextDataset.from_data_dir(data, "train", BLOCK, meta)
    blocks = len(original) // BLOCK
    assert len(dataset) == blocks
    assert np.array_equal(dataset[3]["input_ids"].numpy(), original[3 * BLOCK: 4 * BLOCK])
    # A DataLoader worker process (forked) reads the same held file, not the path.
    loader = DataLoader(dataset, batch_size=blocks, num_workers=1)
    (batch,) = list(loader)
    assert np.array_equal(batch["input_ids"].numpy().ravel(), original[: blocks * BLOCK])
    assert any("train.bin was replaced since this run fingerprinted it" in r.message for r in caplog.records)


def test_a_token_file_rewritten_in_place_under_the_run_stops_it(tmp_path, tiny_data_dir):
    data, meta = copy_data(tiny_data_dir, tmp_path / "data")
    data_fingerprint(meta, data)
    with open(data / "val.bin", "r+b") as f:  # same inode, other bytes
        f.write(bytes(64))
    os.utime(data / "val.bin", ns=(1, 1))  # a modification time that differs even on coarse clocks
    with pytest.raises(DataError, match=r"val.bin was rewritten since this run fingerprinted it.*HINT: let "
                                        r"prepare_data.py finish"):
        TextDataset.from_data_dir(data, "val", BLOCK, meta)
    assert json.loads((data / "meta.json").read_text()) == meta  # nothing on disk touched
