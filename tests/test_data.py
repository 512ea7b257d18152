"""finetune/data/dataset.py: the token files a run fingerprinted are the ones it trains on, even if prepare_data.py
replaces them while the model loads; a file rewritten in place under the run stops it with one line; the
validation blocks are the same whatever the number of processes (end to end in tests/test_distributed.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from finetune.data.dataset import DataError, TextDataset, data_fingerprint
from finetune.train.config import TrainConfig
from helpers import BLOCK, copy_data


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


# -----------------------------------------------------------------------------
# The validation set and the number of processes


@pytest.mark.parametrize("eval_batches, blocks", [(None, 32), (3, 12), (0, 100)], ids=["default", "3", "all"])
def test_the_validation_blocks_do_not_depend_on_the_number_of_processes(eval_batches, blocks):
    from dataclasses import replace

    from finetune.data.dataset import validation_blocks
    from finetune.train.plan import eval_blocks, make_plan

    cfg = replace(TrainConfig(batch_size=4, grad_accum=2, epochs=1, eval_every=4), eval_batches=eval_batches)
    meta = {"splits": {"train": {"tokens": 352 * BLOCK}, "val": {"tokens": 100 * BLOCK}}}
    chosen = {}
    for world_size in (1, 2, 3):
        plan = make_plan(cfg, meta, BLOCK, world_size)
        shares = [validation_blocks(plan.val_blocks, eval_blocks(cfg, plan), rank, world_size)
                  for rank in range(world_size)]
        union = sorted(block for share in shares for block in share)
        assert len(union) == len(set(union)) == blocks  # disjoint shares, the size asked
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        chosen[world_size] = union
    assert chosen[1] == chosen[2] == chosen[3]
