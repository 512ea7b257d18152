"""cpu_dropout.py: the faster CPU dropout keeps torch's semantics (keep-probability, scaling, gradients),
attention with dropout equals the fp32 reference with the same mask, and every other path is untouched."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from finetune.models import cpu_dropout
from finetune.models.cpu_dropout import CPUDropout, attention_with_cpu_dropout, keep_mask, use_fast_cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_has_the_keep_probability_at_every_position(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last int64 draw is half used
    keep = keep_mask((n,), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    # Both 32-bit halves of each 64-bit draw must be uniform, so check even and odd positions apart.
    for part in (keep[0::2], keep[1::2]):
        sigma = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.float().mean().item() - (1 - p)) < 6 * sigma
    # Neighbours are independent: P(both kept) = (1 - p)^2.
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) * 2


def test_dropout_scales_kept_values_and_gradients():
    torch.manual_seed(1)
    x = torch.randn(64, 300, requires_grad=True)
    y = CPUDropout(0.25).train()(x)
    kept = y != 0
    assert 0.70 < kept.float().mean().item() < 0.80
    torch.testing.assert_close(y[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream * kept / 0.75, rtol=1e-6, atol=0)


def test_dropout_in_eval_mode_or_p0_is_identity():
    x = torch.randn(8, 16)
    assert torch.equal(CPUDropout(0.3).eval()(x), x)
    assert torch.equal(CPUDropout(0.0).train()(x), x)


def reference_attention(q, k, v, keep, p):
    """Causal softmax attention in float64 with the given keep mask."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1) * keep / (1 - p)
    return (probs @ v).transpose(1, 2)


class MarkedAttention(torch.nn.Module):
    is_causal = True
    fast_cpu_dropout = True


def test_attention_with_dropout_equals_reference_with_the_same_mask():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    module = MarkedAttention().train()
    torch.manual_seed(3)
    out, weights = attention_with_cpu_dropout(module, q, k, v, None, dropout=0.2, scaling=8 ** -0.5)
    torch.manual_seed(3)
    keep = keep_mask((2, 3, 10, 10), 0.2)
    assert weights is None and out.shape == (2, 10, 3, 8)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference_attention(qd, kd, vd, keep, 0.2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream.double())
    for ours, ref in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_attention_with_dropout_keeps_one_query_by_key_tensor_for_the_backward_pass():
    """Between the passes the graph holds the softmax output (fp32, one per (query, key) pair) and nothing
    else of that size: the dropped-out weights and their mask are recomputed, from the same generator state,
    in the backward pass (the test above checks that the gradients are those of the same mask)."""
    q, k, v = (torch.randn(2, 3, 64, 8, requires_grad=True) for _ in range(3))
    saved = {}  # storage -> bytes: the softmax output is saved by the softmax and by the recomputed part alike

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, _ = attention_with_cpu_dropout(MarkedAttention().train(), q, k, v, None, dropout=0.2)
    pairs = 2 * 3 * 64 * 64
    assert [size for size in saved.values() if size >= pairs] == [4 * pairs]  # and q, k, v, the causal mask
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v))


@pytest.mark.parametrize("case", ["eval", "no_dropout", "unmarked", "padding_mask"])
def test_other_attention_calls_go_to_stock_sdpa_unchanged(case):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    module = MarkedAttention().train()
    dropout, mask = 0.2, None
    if case == "eval":
        module.eval()
        dropout = 0.0  # what transformers passes in eval mode
    elif case == "no_dropout":
        dropout = 0.0
    elif case == "unmarked":
        module.fast_cpu_dropout = False
    else:
        mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    torch.manual_seed(5)
    ours, _ = attention_with_cpu_dropout(module, q, k, v, mask, dropout=dropout, scaling=8 ** -0.5)
    torch.manual_seed(5)
    stock, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=8 ** -0.5)
    assert torch.equal(ours, stock)


def load_tiny(model_dir, dropout: float):
    return AutoModelForCausalLM.from_pretrained(model_dir, resid_pdrop=dropout, embd_pdrop=dropout,
                                                attn_pdrop=dropout, dtype=torch.float32)


def test_swapped_model_keeps_eval_outputs_and_leaves_other_models_alone(tiny_model_dir, tmp_path):
    stock = load_tiny(tiny_model_dir, 0.1)
    fast = copy.deepcopy(stock)
    x = torch.randint(0, stock.config.vocab_size, (4, 24))
    torch.manual_seed(6)
    stock_train_before = stock.train()(input_ids=x).logits

    assert use_fast_cpu_dropout(fast) == 1 + 2 * 3  # embedding + (attn, resid, mlp) per layer
    assert all(getattr(a, "fast_cpu_dropout", False) for a in (blk.attn for blk in fast.transformer.h))
    # Evaluation is bit-identical; so is training with every dropout at 0.
    assert torch.equal(fast.eval()(input_ids=x).logits, stock.eval()(input_ids=x).logits)
    # Our attention is selected for the swapped model only: "sdpa" stays transformers' own, so a model that
    # was not swapped, or is loaded later, keeps torch's own masks.
    from transformers import AttentionInterface

    assert fast.config._attn_implementation == cpu_dropout.ATTENTION_NAME
    assert stock.config._attn_implementation == "sdpa"
    assert AttentionInterface()["sdpa"] is sdpa_attention_forward
    torch.manual_seed(6)
    assert torch.equal(stock.train()(input_ids=x).logits, stock_train_before)
    later = load_tiny(tiny_model_dir, 0.1)
    assert later.config._attn_implementation == "sdpa"
    torch.manual_seed(6)
    assert torch.equal(later.train()(input_ids=x).logits, stock_train_before)
    # The saved config and weights are the stock ones.
    fast.save_pretrained(tmp_path / "fast")
    stock.save_pretrained(tmp_path / "stock")
    assert (tmp_path / "fast" / "config.json").read_text() == (tmp_path / "stock" / "config.json").read_text()


def test_same_training_loss_distribution_as_torch_dropout(tiny_model_dir):
    """Mean training-mode loss over many dropout draws agrees with torch's dropout within noise."""
    stock = load_tiny(tiny_model_dir, 0.3).train()
    fast = copy.deepcopy(stock)
    use_fast_cpu_dropout(fast)
    torch.manual_seed(7)
    x = torch.randint(0, stock.config.vocab_size, (2, 32))
    losses = {"stock": [], "fast": []}
    with torch.no_grad():
        for seed in range(150):
            for name, model in (("stock", stock), ("fast", fast)):
                torch.manual_seed(seed)
                losses[name].append(model(input_ids=x, labels=x).loss.item())
    s, f = torch.tensor(losses["stock"]), torch.tensor(losses["fast"])
    assert not torch.equal(s, f)  # different random streams
    standard_error = math.sqrt(s.var() / len(s) + f.var() / len(f))
    assert abs(s.mean() - f.mean()) < 4 * standard_error
    assert 0.5 < f.std() / s.std() < 2.0


def test_causal_mask_is_upper_triangle():
    mask = cpu_dropout.causal_mask(4, "cpu")
    assert mask.tolist() == [[False, True, True, True], [False, False, True, True],
                             [False, False, False, True], [False, False, False, False]]
