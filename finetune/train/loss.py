"""Next-token cross-entropy without the whole batch's fp32 logits, and the validation loss."""
from __future__ import annotations

import functools

from finetune.runtime.distributed import DistInfo, all_reduce_sum


def next_token_loss(logits, input_ids, rows_per_chunk: int = 64):
    """Mean cross-entropy of logits[:, t] against input_ids[:, t + 1], over all B x (T - 1) predictions.

    The same value as transformers' ForCausalLMLoss (fp32 log-softmax of the same logits). In training
    it avoids that function's fp32 copy of the (batch, seq, vocab) logits and its fp32 log-probabilities
    kept for the backward pass (2 x 206 MB for GPT-2 at 4 x 256): see chunked_loss_function().
    """
    import torch

    if not logits.requires_grad:  # evaluation: the same chunks, nothing kept for a backward pass
        batch, seq, _ = logits.shape
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for b in range(batch):
            for start in range(0, seq - 1, rows_per_chunk * 4):
                end = min(start + rows_per_chunk * 4, seq - 1)
                total += torch.nn.functional.cross_entropy(
                    logits[b, start:end].float(), input_ids[b, start + 1:end + 1], reduction="sum").double()
        return (total / (batch * (seq - 1))).float()
    return chunked_loss_function().apply(logits, input_ids, rows_per_chunk)


@functools.cache
def chunked_loss_function():
    """The autograd Function, built on first use (torch is imported lazily so --help and errors are fast)."""
    import torch

    class ChunkedNextTokenLoss(torch.autograd.Function):
        """Forward computes, chunk by chunk in fp32, the loss *and* its gradient (softmax - one_hot) / n,
        stored in the logits' own dtype (what autograd would cast it to); backward only scales it.

        Each fp32 chunk is computed in the gradient's own memory (log-softmax written there, then turned into
        the gradient in place), and backward scales the stored gradient in place: the same operations on the
        same values as with a temporary per chunk and a fresh product, so the same bits, without one
        (tokens x vocab) copy per step and one more (tokens x vocab) tensor at the backward pass."""

        @staticmethod
        def forward(ctx, logits, input_ids, rows_per_chunk):
            batch, seq, _ = logits.shape
            n = batch * (seq - 1)  # every position but the last predicts the next token; no padding here
            targets = input_ids[:, 1:]
            grad = torch.empty_like(logits)
            grad[:, -1].zero_()
            in_place = grad.dtype == torch.float32  # bf16/fp16 logits: the fp32 chunk is cast into grad at the end
            total = torch.zeros((), dtype=torch.float64, device=logits.device)
            for b in range(batch):
                for start in range(0, seq - 1, rows_per_chunk):
                    end = min(start + rows_per_chunk, seq - 1)
                    target = targets[b, start:end, None]
                    chunk = logits[b, start:end].float()
                    log_probs = torch.log_softmax(chunk, dim=-1, out=grad[b, start:end] if in_place else None)
                    total -= log_probs.gather(1, target).sum(dtype=torch.float64)
                    probs = log_probs.exp_()
                    probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                    probs.div_(n)
                    if not in_place:
                        grad[b, start:end] = probs
            ctx.save_for_backward(grad)
            return (total / n).float()

        @staticmethod
        def backward(ctx, grad_output):
            # In place: this gradient is used once (a second backward through the same graph fails loudly on
            # the saved tensor's version instead of reusing a scaled one).
            (grad,) = ctx.saved_tensors
            return grad.mul_(grad_output.to(grad.dtype)), None, None

    return ChunkedNextTokenLoss


IGNORE_INDEX = -100  # a label no loss is computed for (transformers' convention)


def count_targets(labels) -> int:
    """Next-token predictions that are trained in a batch of labels: every labels[:, t + 1] != -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def target_loss_sum(logits, labels, rows_per_chunk: int = 64):
    """Sum (not mean) of the cross-entropies of logits[:, t] against labels[:, t + 1], over the labels that
    are not -100: chat data, where the caller divides by the trained tokens of the whole optimizer step.
    With no target at all it is 0 with a zero gradient (never NaN). Chunked like next_token_loss."""
    import torch

    if not logits.requires_grad:
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for b in range(logits.shape[0]):
            for start in range(0, logits.shape[1] - 1, rows_per_chunk * 4):
                end = min(start + rows_per_chunk * 4, logits.shape[1] - 1)
                total += torch.nn.functional.cross_entropy(
                    logits[b, start:end].float(), labels[b, start + 1:end + 1], reduction="sum",
                    ignore_index=IGNORE_INDEX).double()
        return total.float()
    return chunked_target_loss_function().apply(logits, labels, rows_per_chunk)


@functools.cache
def chunked_target_loss_function():
    import torch

    class ChunkedTargetLossSum(torch.autograd.Function):
        """As ChunkedNextTokenLoss (in place too), for a sum over the targets: rows whose label is -100 get no
        loss and a zero gradient; chunks without any target are not computed at all."""

        @staticmethod
        def forward(ctx, logits, labels, rows_per_chunk):
            batch, seq, _ = logits.shape
            targets = labels[:, 1:]
            trained = targets != IGNORE_INDEX
            any_trained = trained.any(dim=1).tolist()  # one host sync, to skip untrained rows
            grad = torch.zeros_like(logits)
            in_place = grad.dtype == torch.float32  # as in ChunkedNextTokenLoss
            total = torch.zeros((), dtype=torch.float64, device=logits.device)
            for b in range(batch):
                if not any_trained[b]:
                    continue
                for start in range(0, seq - 1, rows_per_chunk):
                    end = min(start + rows_per_chunk, seq - 1)
                    keep = trained[b, start:end, None]
                    target = torch.where(keep, targets[b, start:end, None], 0)
                    log_probs = torch.log_softmax(logits[b, start:end].float(), dim=-1,
                                                  out=grad[b, start:end] if in_place else None)
                    total -= (log_probs.gather(1, target) * keep).sum(dtype=torch.float64)
                    probs = log_probs.exp_()
                    probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                    probs.mul_(keep)
                    if not in_place:
                        grad[b, start:end] = probs
            ctx.save_for_backward(grad)
            return total.float()

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return grad.mul_(grad_output.to(grad.dtype)), None, None

    return ChunkedTargetLossSum


def trained_tokens_of_step(window: list, device, dist_info: DistInfo) -> float:
    """The trained tokens of a whole optimizer step, all micro-batches of all processes (at least 1): what
    each micro-batch's loss sum is divided by, as transformers.Trainer's num_items_in_batch."""
    import torch

    count = torch.tensor(float(sum(count_targets(batch["labels"]) for batch in window)), dtype=torch.float64,
                         device=device)
    all_reduce_sum(count, dist_info)
    return max(count.item(), 1.0)


def evaluate(model, val_loader, ctx, device, dist_info: DistInfo, objective, should_stop=None,
             filler=None) -> float | None:
    """The objective's mean loss over the validation blocks (text: over their predictions; chat: over their
    trained tokens; preference: over their pairs), summed exactly across processes.

    `should_stop()` (a stop request: Ctrl-C, SIGTERM) is asked between batches, on every process together (one
    small all-reduce per batch), so a stop takes effect within one batch: the evaluation then returns None.
    `filler` (sharded models, whose forward passes gather from every process): the batch a process whose
    share is done forwards while others still have batches; its loss is not counted.
    """
    import torch

    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, the units it is over
    objective.begin_eval()
    try:
        with torch.no_grad():
            batches = iter(val_loader)
            while True:
                batch = next(batches, None)
                if should_stop is not None or filler is not None:  # every process votes, done or not
                    stop_vote = float(should_stop()) if should_stop is not None else 0.0
                    votes = torch.tensor([stop_vote, float(batch is not None)], device=device)
                    all_reduce_sum(votes, dist_info)
                    stop_votes, batches_left = votes.tolist()
                    if stop_votes > 0:
                        return None
                    if batches_left == 0:
                        break
                elif batch is None:
                    break
                if batch is None:
                    if filler is not None:  # keep in step with the processes that still have batches
                        with ctx:
                            model(input_ids=filler["input_ids"].to(device), use_cache=False)
                    continue
                with ctx:
                    loss_sum, units = objective.eval_sums(model, batch, device)
                totals[0] += loss_sum
                totals[1] += units
    finally:
        model.train(was_training)
    all_reduce_sum(totals, dist_info)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")
