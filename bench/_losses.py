"""Prototype: a causal-LM cross-entropy that never materialises the whole batch's fp32 logits.

transformers' ForCausalLMLoss does `logits.float()` on the full (batch, seq, vocab) tensor (under bf16
autocast that is a 4 x 256 x 50257 x 4 B = 206 MB copy), keeps the fp32 log-softmax for the backward
pass (another 206 MB), and in the backward pass allocates and zero-fills fp32 gradients of the same
size before casting them back to the logits' dtype.

`causal_lm_loss(logits, labels)` returns the same value — the mean over non-ignored next-token
predictions of the fp32 log-softmax of the same logits — but works in chunks of `chunk` rows: each
chunk is upcast, log-softmaxed, and turned into its gradient (softmax - one_hot) / n right away, which is
stored in the logits' own dtype (bf16 under autocast: exactly what autograd would cast it to). The
backward pass is then one multiplication by the incoming scalar gradient.

Labels follow the Hugging Face convention: labels[:, t + 1] is the target of logits[:, t]; -100 is
ignored. The function is self-contained (torch only) so it can be pasted into finetune_generative.py.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedCausalLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, chunk):
        batch, seq, vocab = logits.shape
        targets = labels[:, 1:]
        n_valid = (targets != IGNORE_INDEX).sum()
        n = max(int(n_valid), 1)
        grad = torch.empty_like(logits)
        grad[:, -1].zero_()  # the last position predicts nothing
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for b in range(batch):
            for start in range(0, seq - 1, chunk):
                end = min(start + chunk, seq - 1)
                tgt = targets[b, start:end]
                valid = tgt != IGNORE_INDEX
                safe = tgt.clamp_min(0)[:, None]
                logp = torch.log_softmax(logits[b, start:end].float(), dim=-1)
                picked = logp.gather(1, safe).squeeze(1)
                total -= torch.where(valid, picked, 0.0).sum(dtype=torch.float64)
                probs = logp.exp_()  # d(loss)/d(logits) = (softmax - one_hot) / n, in place
                probs.scatter_add_(1, safe, torch.full_like(picked[:, None], -1.0))
                probs.mul_(valid[:, None] / n)
                grad[b, start:end].copy_(probs)
        ctx.save_for_backward(grad)
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Mean next-token cross-entropy, computed chunk by chunk in fp32 (see the module docstring)."""
    if not logits.requires_grad:
        # no graph (evaluation): the plain function is as cheap and needs no saved gradient
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return torch.nn.functional.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    return _ChunkedCausalLMLoss.apply(logits, labels, chunk)
