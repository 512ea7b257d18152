"""Plain text: blocks of block_size tokens cut from the token stream; the loss is the mean next-token
cross-entropy over every prediction of the step (finetune/train/loss.py holds the kernel)."""
from __future__ import annotations

from finetune.train import loss as kernels

from .base import Objective


class TextObjective(Objective):
    kind = "text"

    def data_size_problems(self, meta: dict, plan, block_size: int, world_size: int) -> list[str]:
        problems = []
        if plan.train_blocks < world_size or plan.train_blocks == 0:
            problems.append(f"the train split ({meta['splits']['train']['tokens']} tokens) holds no full block of "
                            f"{block_size} tokens per process (HINT: lower --block-size or add text)")
        if plan.val_blocks == 0:
            problems.append(f"the val split ({meta['splits']['val']['tokens']} tokens) holds no full block of "
                            f"{block_size} tokens (HINT: lower --block-size or raise prepare_data.py --val-fraction)")
        return problems

    def dataset(self, data_dir, split: str, block_size: int, meta: dict):
        from finetune.data.dataset import TextDataset

        return TextDataset.from_data_dir(data_dir, split, block_size, meta)

    def micro_batch_shares(self, window, window_samples, block_size, device, dist_info) -> list[float]:
        # each micro-batch's mean, weighted by its share of the step's predictions: a short last micro-batch
        # of an epoch counts per token, not per batch
        window_predictions = window_samples * (block_size - 1)
        return [batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1) / window_predictions
                for batch in window]

    def loss(self, model, batch, device):
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        # use_cache=False: GPT-2's config asks for a cache training never reads
        return kernels.next_token_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)

    def eval_sums(self, model, batch, device):
        n_predictions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        return self.loss(model, batch, device).double() * n_predictions, n_predictions
