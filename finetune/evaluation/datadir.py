"""The val split of a --data-dir scored as the training script scores it: the same blocks (TextDataset, or
whole chat examples packed by packing.py, scored on their trained tokens only), the same evaluation function
(loss.evaluate), so that the loss of a run's model equals the run's own last val loss. Bits per byte come from
the bytes of the predicted tokens (cheap: no model needed for them)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError
from finetune.train.config import TrainConfig
from finetune.train.rundir import CONFIG_FILE

from .metrics import Totals
from .scoring import Progress, Result, Scorer, batched

DEFAULT_BLOCK = 1024  # the training script's block size for a model with a longer context


def run_config(model_folder: Path | None) -> tuple[Path, TrainConfig] | None:
    """(the run's folder, its settings) when `model_folder` is a training output or a folder inside one
    (best/, checkpoint-N/, adapter/); None otherwise."""
    if model_folder is None:
        return None
    for folder in (model_folder, model_folder.parent):
        path = folder / CONFIG_FILE
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            known = {f.name for f in dataclasses.fields(TrainConfig)}
            return folder, TrainConfig(**{k: v for k, v in saved.items() if k in known})
    return None


def same_folder(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def reported(loader, scorer: Scorer, total: int):
    """The batches of `loader`, counted into the scorer's tokens and seconds, with a progress line on a long
    evaluation (Progress)."""
    import time

    from finetune.train.loss import IGNORE_INDEX

    progress = Progress("val batches", total)
    for batch in loader:
        started = time.perf_counter()
        yield batch  # evaluate() runs the model on it before asking for the next
        scorer.seconds += time.perf_counter() - started
        scorer.tokens_scored += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        progress.advance(1, scorer)


class ValSplitEvaluation:
    kind = "val split"

    def __init__(self, data_dir: str, meta: dict, batch_size: int, run: tuple[Path, TrainConfig] | None):
        self.data_dir, self.meta, self.batch_size = data_dir, meta, batch_size
        self.name = f"{data_dir} (val)"
        # a run trained on this very folder: its block size and its evaluation's blocks
        self.run_cfg = run[1] if run and same_folder(run[1].data_dir, data_dir) else None

    def blocks(self, context: int) -> tuple[int, int | None, int]:
        """(block size, validation blocks chosen (None: all), batch size), as the training run had them."""
        from finetune.train.objectives import objective_for
        from finetune.train.plan import eval_blocks, make_plan

        cfg = self.run_cfg
        if cfg is None:
            return min(context, DEFAULT_BLOCK), None, self.batch_size
        block_size = cfg.block_size or min(context, DEFAULT_BLOCK)
        blocks = objective_for(self.meta, cfg).packed_blocks(self.data_dir, self.meta, block_size)
        plan = make_plan(cfg, self.meta, block_size, 1, blocks)
        return block_size, eval_blocks(cfg, plan), cfg.batch_size

    def for_model(self, run: tuple[Path, TrainConfig] | None) -> ValSplitEvaluation:
        """The same split in the blocks of the run a model comes from (its own, if it was trained on it)."""
        return ValSplitEvaluation(self.data_dir, self.meta, self.batch_size, run)

    def most_shares(self, context: int) -> int:
        """The batches there are (each process runs whole batches)."""
        from finetune.data.dataset import validation_blocks
        from finetune.train.objectives import objective_for

        block_size, chosen, batch_size = self.blocks(context)
        if block_size > context:
            return 0
        dataset = objective_for(self.meta, self.run_cfg).dataset(self.data_dir, "val", block_size, self.meta)
        return math.ceil(len(validation_blocks(len(dataset), len(dataset) if chosen is None else chosen)) / batch_size)

    def run(self, scorer: Scorer) -> Result:
        from torch.utils.data import DataLoader, Subset

        from finetune.data.dataset import validation_blocks
        from finetune.train.loss import IGNORE_INDEX, evaluate
        from finetune.train.objectives import objective_for

        block_size, chosen, batch_size = self.blocks(scorer.context)
        if block_size > scorer.context:
            raise UserError(f"the run scored blocks of {block_size} tokens but {scorer.label} has a context of "
                            f"{scorer.context}. HINT: evaluate it on --input text instead")
        objective = objective_for(self.meta, self.run_cfg)
        dataset = objective.dataset(self.data_dir, "val", block_size, self.meta)
        if len(dataset) == 0:
            raise UserError(f"the val split of {self.data_dir} holds less than one block of {block_size} tokens. "
                            f"HINT: prepare the data with a larger --val-fraction, or evaluate on --input text")
        indices = validation_blocks(len(dataset), len(dataset) if chosen is None else chosen)
        blocks = Subset(dataset, indices)
        loader = DataLoader(blocks, batch_size=batch_size, shuffle=False)
        # this process's batches of those one process runs; evaluate() adds the sums of all processes
        mine = [batch for batch in batched(range(len(indices)), batch_size) if scorer.shard.owns_next_batch()]
        loss = evaluate(scorer.model, reported(DataLoader(blocks, batch_sampler=mine), scorer, len(mine)),
                        scorer.ctx, scorer.device, scorer.shard.dist_info, objective)
        lengths = scorer.byte_lengths()
        totals = Totals(documents=len(indices))
        for batch in loader:  # the predicted tokens, their bytes: no model needed
            targets = batch["labels"][:, 1:]
            kept = targets[targets != IGNORE_INDEX].numpy()
            totals.tokens += int(kept.size)
            totals.bytes += int(lengths[np.minimum(kept, len(lengths) - 1)].sum())
        totals.nll = loss * totals.tokens if math.isfinite(loss) else math.nan
        figures = totals.figures()
        figures["loss"] = loss  # exactly the training script's number, not nll / tokens recomputed
        figures.update(blocks=len(indices), block_size=block_size)
        note = (f"the {len(indices)} blocks of {block_size} tokens the training run scored at each evaluation"
                if self.run_cfg else f"all {len(indices)} val blocks of {block_size} tokens")
        return Result(figures, notes=[note])
