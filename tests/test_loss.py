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
