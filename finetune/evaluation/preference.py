"""The val split of a --data-dir of preference pairs (meta.json "preference"), scored on each model: which of a
pair's two completions the model finds the more likely. Pairs are not a text, so there is no perplexity or bits
per byte here; the figures are

    preference_accuracy   share of pairs with log pi(chosen) > log pi(rejected), a tie counting half
    margin                mean of log pi(chosen) - log pi(rejected)
    logps_chosen,         mean summed log-probabilities of the completions (the training run's logps_*)
    logps_rejected
    reward_accuracy       (a model after the first) DPO's reward accuracy with the FIRST model as the reference:
                          the share of pairs with (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)) > 0
    pairs                 pairs compared (those skipped by the packing, with nothing left to compare, are not)

The log-probabilities are DPO's own (finetune/train/objectives/preference.py: logps_table, the packed blocks of
finetune/data/pairs.py), so they are the numbers a training run on these pairs computes. Every model is scored on
the same blocks (one block size for all), so that the pairs, and how long ones were cut, are the same.
"""
from __future__ import annotations

import numpy as np

from finetune.core.errors import UserError
from finetune.runtime.distributed import DistInfo

from .scoring import Result, Scorer, batched

DEFAULT_BLOCK = 1024  # as for text: the training script's block size for a model with a longer context


def preference_figures(table: np.ndarray, reference: np.ndarray | None = None) -> dict:
    """The figures of a (pairs, 2) table of (log pi(chosen), log pi(rejected)), NaN rows left out; with
    `reference` (the first model's table), DPO's reward accuracy against it."""
    kept = ~np.isnan(table).any(axis=1)
    chosen, rejected = table[kept, 0], table[kept, 1]
    margin = chosen - rejected
    figures = {"preference_accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))) if len(margin) else None,
               "margin": float(margin.mean()) if len(margin) else None,
               "logps_chosen": float(chosen.mean()) if len(margin) else None,
               "logps_rejected": float(rejected.mean()) if len(margin) else None,
               "pairs": int(kept.sum())}
    if reference is not None:
        ratios = (table - reference)[kept]
        figures["reward_accuracy"] = float(np.mean(ratios[:, 0] - ratios[:, 1] > 0)) if len(ratios) else None
    return figures


class BlocksOf:
    """Some of the blocks of a PackedPairDataset, in order, as a dataset of their own (the pairs' table is
    still the whole split's: a pair in another process's blocks stays 0 in this one's)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices, self.packing = dataset, indices, dataset.packing

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


class PreferenceEvaluation:
    kind = "preference pairs"

    def __init__(self, data_dir: str, meta: dict, batch_size: int):
        self.data_dir, self.meta, self.batch_size = data_dir, meta, batch_size
        self.name = f"{data_dir} (val pairs)"
        self.block_size: int | None = None  # settled once for all models (settle_block_size)
        self.first: tuple[str, np.ndarray] | None = None  # the first model's label and table: the reference

    def settle_block_size(self, contexts: list[int], run_block_size: int | None) -> None:
        """One block size for every model: that of a training run on this folder when one of the models comes
        from such a run (its pairs cut as it cut them), else the smallest context, at most 1024."""
        self.block_size = run_block_size or min([*contexts, DEFAULT_BLOCK])

    def dataset(self):
        from finetune.data.pairs import PackedPairDataset

        dataset = PackedPairDataset.from_data_dir(self.data_dir, "val", self.block_size, self.meta)
        examples = dataset.packing.examples
        if len(dataset) == 0:
            hint = ("evaluate models with a longer context: each pair's completions are cut to fit the block, and "
                    "these were cut to the same tokens" if examples else
                    "prepare the pairs with a larger --val-fraction (or --val-input)")
            raise UserError(f"the val split of {self.data_dir} holds no pair left to compare in blocks of "
                            f"{self.block_size} tokens ({examples} pair(s) in the split). HINT: {hint}")
        return dataset

    def most_shares(self, context: int) -> int:
        """The batches of pair blocks there are (each process runs whole batches)."""
        if self.block_size is None:
            self.settle_block_size([context], None)
        return -(-len(self.dataset()) // self.batch_size)

    def run(self, scorer: Scorer) -> Result:
        from finetune.train.objectives.preference import logps_table

        if self.block_size is None:
            self.settle_block_size([scorer.context], None)
        dataset = self.dataset()
        # this process's batches of those one process runs (the same blocks in each), the tables added up
        mine = [i for batch in batched(range(len(dataset)), self.batch_size) if scorer.shard.owns_next_batch()
                for i in batch]
        table = logps_table(scorer.model, BlocksOf(dataset, mine), self.batch_size, scorer.ctx, scorer.device,
                            DistInfo())
        table = scorer.shard.sum(table)  # a skipped pair is NaN in every process's table, and stays NaN
        if self.first is None:
            self.first = (scorer.label, table)
            figures = preference_figures(table)
        else:
            figures = preference_figures(table, self.first[1])
        packing = dataset.packing
        figures.update(block_size=self.block_size, truncated=packing.truncated, skipped=packing.skipped)
        notes = [f"all {packing.examples:,} val pairs in blocks of {self.block_size} tokens: {packing.truncated:,} "
                 f"cut to fit (prompt from the left), {packing.skipped:,} with nothing left to compare (left out); "
                 "preference accuracy: log p(chosen) > log p(rejected), a tie counting half"]
        if self.first[0] != scorer.label:
            notes.append(f"reward accuracy: DPO's, with {self.first[0]} (the first model) as the reference")
        documents = [{"input": self.data_dir, "name": f"pair {number}", "logp_chosen": float(c),
                      "logp_rejected": float(r), "margin": float(c - r)}
                     for number, (c, r) in enumerate(table.tolist()) if not np.isnan(c)]
        return Result(figures, documents=documents, notes=notes)
