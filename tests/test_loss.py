"""next_token_loss: the chunked loss (training and evaluation paths) equals the plain shifted
cross-entropy, and its gradient equals autograd's."""
from __future__ import annotations

import pytest
import torch

from finetune.train.loss import next_token_loss


def reference_loss(logits, input_ids):
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).double(),
                                             input_ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("shape", [(2, 7, 11), (3, 300, 50), (1, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradient_equal_the_plain_cross_entropy(shape, dtype):
    torch.manual_seed(0)
    batch, seq, vocab = shape
    logits = (3 * torch.randn(shape)).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, seq))
    expected = reference_loss(logits, input_ids)
    with torch.no_grad():
        evaluated = next_token_loss(logits, input_ids, rows_per_chunk=4)
    trained_logits = logits.clone().requires_grad_()
    trained = next_token_loss(trained_logits, input_ids, rows_per_chunk=4)
    assert evaluated.dtype == trained.dtype == torch.float32
    torch.testing.assert_close(evaluated.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trained.double(), expected, rtol=1e-6, atol=1e-6)

    reference_logits = logits.double().requires_grad_()
    reference_loss(reference_logits, input_ids).mul(2.5).backward()
    trained.mul(2.5).backward()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(trained_logits.grad.double(), reference_logits.grad, rtol=tolerance,
                               atol=tolerance / (batch * seq))
    assert trained_logits.grad.dtype == dtype


def loss_and_gradient_out_of_place(logits, labels, rows_per_chunk, grad_output, sum_over_targets):
    """The kernels' arithmetic as it was before they worked in place (issue 31): a fresh fp32 log-softmax per
    chunk, copied into the gradient, and a new tensor for the backward product. The same operations in the same
    order, so the in-place kernels must give the same bits (fp32 runs bitwise unchanged)."""
    batch, seq, _ = logits.shape
    targets = labels[:, 1:]
    trained = targets != -100
    grad = torch.zeros_like(logits)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        for start in range(0, seq - 1, rows_per_chunk):
            end = min(start + rows_per_chunk, seq - 1)
            keep = trained[b, start:end, None]
            target = torch.where(keep, targets[b, start:end, None], 0)
            log_probs = torch.log_softmax(logits[b, start:end].float(), dim=-1)
            picked = log_probs.gather(1, target)
            total -= (picked * keep).sum(dtype=torch.float64) if sum_over_targets else picked.sum(dtype=torch.float64)
            probs = log_probs.exp_()
            probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
            grad[b, start:end] = probs.mul_(keep) if sum_over_targets else probs.div_(batch * (seq - 1))
    loss = total.float() if sum_over_targets else (total / (batch * (seq - 1))).float()
    return loss, grad * torch.tensor(grad_output).to(grad.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sum_over_targets", [False, True])
def test_the_in_place_kernels_give_the_same_bits_as_before(dtype, sum_over_targets):
    from finetune.train.loss import target_loss_sum

    torch.manual_seed(1)
    batch, seq, vocab, rows = 3, 37, 101, 8
    logits = (4 * torch.randn(batch, seq, vocab)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq))
    if sum_over_targets:  # chat data: untrained positions, and a row with no target at all
        labels[0, :20] = -100
        labels[2] = -100
    expected_loss, expected_grad = loss_and_gradient_out_of_place(logits, labels, rows, 0.37, sum_over_targets)
    trained_logits = logits.clone().requires_grad_()
    kernel = target_loss_sum if sum_over_targets else next_token_loss
    loss = kernel(trained_logits, labels, rows_per_chunk=rows)
    loss.mul(0.37).backward()  # a micro-batch's share: the backward scales by something other than 1
    assert torch.equal(loss, expected_loss)
    assert torch.equal(trained_logits.grad, expected_grad)
    assert trained_logits.grad.dtype == dtype
