"""The interface of an objective: what it needs from the data, how its batches are built, its loss for a
micro-batch and how a step weighs them, its validation loss and what it logs. One instance per run."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from finetune.runtime.distributed import DistInfo


class Objective:
    kind = "base"
    chat_samples = False  # training samples are replies to the prompts, rendered with the chat template

    # ---- the data (preflight: before the weights load)
    def prepare_tokenizer(self, tokenizer, meta: dict) -> None:
        """Give the tokenizer what the data was made with (a chat template), so every saved model has it."""

    def packed_blocks(self, data_dir, meta: dict, block_size: int) -> tuple[int, int] | None:
        """(train, val) blocks when they are not the tokens cut into blocks (packed data); None otherwise.
        May raise DataError (files that do not match meta.json)."""
        return None

    def data_size_problems(self, meta: dict, plan, block_size: int, world_size: int) -> list[str]:
        """Too little data for a block per process, or no validation block."""
        raise NotImplementedError

    def dataset(self, data_dir, split: str, block_size: int, meta: dict):
        """The split as a map-style dataset of blocks (one item: one block)."""
        raise NotImplementedError

    def run_settings(self, cfg, resuming: bool):
        """The settings this objective trains with, where the user left a choice to it (DPO: no dropout). A
        resumed run keeps the settings it recorded."""
        return cfg

    def resume_problems(self, state: dict) -> list[str]:
        """A checkpoint trained with another objective cannot continue on this data (a checkpoint without the
        field predates preference data: text or chat)."""
        trained = state.get("objective")
        if trained == self.kind or (trained is None and self.kind != "preference"):
            return []
        return [f"--data-dir holds {self.kind} data, but the checkpoint was trained on {trained or 'text or chat'} "
                "data; a run cannot change what it trains on midway. HINT: resume with the data it was trained "
                "on, or start a new run from the trained model (--model OUTPUT_DIR, another --output-dir)"]

    # ---- the run (set-up, before step 0)
    def start(self, run, resume) -> None:
        """Anything computed once before step 0 (DPO: the reference log-probabilities)."""

    # ---- a training step
    def micro_batch_shares(self, window: list, window_samples: int, block_size: int, device,
                           dist_info: DistInfo) -> list[float]:
        """Per micro-batch of `window`, the factor its loss() is multiplied by so that the step's loss (and
        gradient) is the objective's mean over the whole step, across processes (DDP averages gradients)."""
        raise NotImplementedError

    def loss(self, model, batch: dict, device) -> torch.Tensor:
        """The micro-batch's loss, as micro_batch_shares weighs it."""
        raise NotImplementedError

    # ---- validation
    def begin_eval(self) -> None:
        """An evaluation starts: forget the statistics of the last one."""

    def eval_sums(self, model, batch: dict, device) -> tuple[torch.Tensor, float]:
        """(loss summed over the batch's units, as float64; the units: predictions, trained tokens, pairs)."""
        raise NotImplementedError

    # ---- what is logged besides the loss
    def train_metrics(self, device, dist_info: DistInfo) -> dict:
        """Extra fields of a train record: the objective's own statistics since the last one."""
        return {}

    def eval_metrics(self, val_loss: float, device, dist_info: DistInfo) -> dict:
        """Fields of an eval record besides the loss: a cross-entropy's perplexity, or the objective's own
        statistics over the evaluation."""
        return {"val_perplexity": math.exp(min(val_loss, 50.0))}

    def describe_eval(self, record: dict) -> str:
        """What the log line of an evaluation says after the loss."""
        return f"perplexity {record['val_perplexity']:.2f}"


def packed_data_size_problems(plan, block_size: int, world_size: int, block_holds: str, add: str,
                              val_holds_none: str) -> list[str]:
    """Objective.data_size_problems for packed data (chat examples, preference pairs): fewer blocks with
    something to learn than processes, or none in the val split. `block_holds`: what such a block holds; `add`:
    what the user can add; `val_holds_none`: what the val split then lacks."""
    problems = []
    if plan.train_blocks < world_size:
        problems.append(f"the train split packs into {plan.train_blocks} block(s) of {block_size} tokens with "
                        f"{block_holds}, fewer than the {world_size} process(es) (HINT: add {add}, or raise "
                        "--block-size if they are longer than a block)")
    if plan.val_blocks == 0:
        problems.append(f"the val split holds {val_holds_none} (HINT: raise prepare_data.py --val-fraction, or "
                        "--block-size)")
    return problems
