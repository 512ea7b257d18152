"""Chat and instruction data: whole examples packed into blocks (finetune/data/packing.py); the loss is the sum
of the cross-entropies over the trained tokens, divided by the trained tokens of the whole step (all
micro-batches, all processes), as transformers.Trainer's num_items_in_batch."""
from __future__ import annotations

from finetune.train import loss as kernels

from .base import Objective, packed_data_size_problems


class ChatObjective(Objective):
    kind = "chat"
    chat_samples = True

    def prepare_tokenizer(self, tokenizer, meta: dict) -> None:
        # the template trained with goes into every tokenizer saved (checkpoints, best/, the final model)
        tokenizer.chat_template = meta["chat"]["template"]

    def packed_blocks(self, data_dir, meta: dict, block_size: int):
        from finetune.data.packing import packed_blocks

        return packed_blocks(data_dir, meta, block_size)

    def data_size_problems(self, meta: dict, plan, block_size: int, world_size: int) -> list[str]:
        return packed_data_size_problems(plan, block_size, world_size, "something to train", "examples with replies",
                                         f"no example with a trained token in its first {block_size} tokens")

    def dataset(self, data_dir, split: str, block_size: int, meta: dict):
        from finetune.data.packing import PackedChatDataset

        return PackedChatDataset.from_data_dir(data_dir, split, block_size, meta)

    def micro_batch_shares(self, window, window_samples, block_size, device, dist_info) -> list[float]:
        # a micro-batch with no trained token adds 0; x processes: DDP averages the gradients
        step_targets = kernels.trained_tokens_of_step(window, device, dist_info)
        return [dist_info.world_size / step_targets] * len(window)

    def loss(self, model, batch, device):
        """The sum over the trained tokens, with positions that restart at each packed example and no
        attention mask, so transformers builds the block-diagonal one."""
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return kernels.target_loss_sum(logits, labels)

    def eval_sums(self, model, batch, device):
        return self.loss(model, batch, device).double(), kernels.count_targets(batch["labels"])
