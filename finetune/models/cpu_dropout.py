"""Dropout on CPU from a faster random source: the same keep-probability, the same 1 / (1 - p) scaling.

Why: torch's CPU dropout draws its mask with a serial Bernoulli kernel (an MKL path exists only on
Intel CPUs). GPT-2 124M at batch 4 x 256 draws ~57M mask elements per training step (37M of them for
the attention probabilities), and that kernel is a sizeable share of a bf16 step (measured in
docs/performance.md). Here each 64-bit draw of torch's default generator yields two 32-bit uniform integers,
and an element is kept when its integer is at or above a threshold: P(keep) = 1 - p to within 2^-32
(torch's own float uniforms have 24 bits). Same distribution, different random stream: with the same
seed the masks differ from torch's, so `--torch-dropout` switches this off for runs that must draw
exactly the masks transformers.Trainer draws.

With attention dropout > 0, torch's scaled_dot_product_attention on CPU falls back to its "math" path
(fp32 matmuls, softmax, dropout). `attention_with_cpu_dropout` computes the same thing in fp32 with the
mask above; every other call (no dropout, evaluation, padding masks, GPUs, grouped-query attention)
goes to transformers' own SDPA function unchanged.

Only a model passed to `use_fast_cpu_dropout(model)` uses them: its attention function is selected by
name ("sdpa_cpu_dropout", registered beside transformers' "sdpa"), so other models in the same process
keep stock behaviour. The model's saved files are not touched.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.utils.checkpoint


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """Bool tensor of `shape`, each element True with probability 1 - p, from torch's default generator."""
    n = math.prod(shape)
    # P(int32 uniform >= threshold) = (2^31 - threshold) / 2^32 = 1 - p, to 2^-32.
    threshold = round(p * 2**32) - 2**31
    # randint over (almost) the whole int64 range: 64 uniform bits per draw, two int32 per draw.
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=device)
    return bits.view(torch.int32)[:n].view(shape) >= threshold


class _MaskedScale(torch.autograd.Function):
    """y = x * keep / (1 - p); the bool mask (1 byte per element) is all that is kept for backward."""

    @staticmethod
    def forward(ctx, x, p):
        keep = keep_mask(x.shape, p, device=x.device)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout with the fast mask (0 < p < 1)."""
    return _MaskedScale.apply(x, p)


class CPUDropout(torch.nn.Dropout):
    """nn.Dropout whose training-mode mask on CPU comes from keep_mask(); elsewhere it is nn.Dropout."""

    def forward(self, x):
        if not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return dropout(x, self.p)


@functools.cache
def causal_mask(length: int, device_str: str) -> torch.Tensor:
    """True above the diagonal: the future positions a query may not attend to."""
    return torch.ones(length, length, dtype=torch.bool, device=device_str).triu_(1)


def attention_with_cpu_dropout(module, query, key, value, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """transformers' attention-function signature. Causal self-attention with attention dropout on CPU
    is computed here in fp32 (as torch's math path does); everything else goes to the stock SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    ours = (getattr(module, "fast_cpu_dropout", False) and module.training and 0.0 < dropout < 1.0
            and query.device.type == "cpu" and attention_mask is None and is_causal
            and query.shape[-2] == key.shape[-2] and query.shape[1] == key.shape[1]
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)
    if not ours:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
    scores.masked_fill_(  # in place: matmul's backward needs its inputs, not its output
        causal_mask(query.shape[-2], str(query.device)), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Recomputed in the backward pass from the softmax output the softmax keeps anyway, the same mask drawn
    # again from the same generator state: the dropped-out weights (4 bytes per (query, key) pair) and their
    # mask (1 byte) are not held from the forward pass to the backward one, the same operations run on the
    # same values, so the same bits. GPT-2 124M at 8 x 1024: 5.3 GB less at the peak (docs/performance.md).
    output = torch.utils.checkpoint.checkpoint(_dropped_out_values, probs, value.float(), dropout,
                                               use_reentrant=False).to(query.dtype)
    return output.transpose(1, 2).contiguous(), None  # (batch, seq, heads, head_dim), as SDPA returns


def _dropped_out_values(probs, value, p: float):
    return torch.matmul(_MaskedScale.apply(probs, p), value)


ATTENTION_NAME = "sdpa_cpu_dropout"  # registered beside transformers' own "sdpa", never in its place


def use_fast_cpu_dropout(model) -> int:
    """Swap the model's nn.Dropout modules for CPUDropout and, when the model runs transformers' "sdpa"
    attention, select attention_with_cpu_dropout for this model only (registered under its own name;
    other models, loaded before or after, keep stock "sdpa"). The saved config.json does not record the
    attention function, so saved models are unchanged. Returns the number of dropout modules swapped."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, CPUDropout(child.p, child.inplace))
                swapped += 1
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        register_attention_function()
        model.set_attn_implementation(ATTENTION_NAME)
        for module in model.modules():
            if hasattr(module, "is_causal") and any(isinstance(c, CPUDropout) for c in module.children()):
                module.fast_cpu_dropout = True
    return swapped


@functools.cache
def register_attention_function() -> None:
    """The attention function, and its mask: SDPA's. transformers builds no mask at all for an attention name
    it does not know, which for plain causal text changes nothing (SDPA's mask is None there too) but drops
    the block-diagonal mask of packed chat examples (restarted position_ids), letting them see each other."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_with_cpu_dropout)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
