"""A loaded model that scores windows (windows.py) in batches, and what every kind of evaluation returns.

Scoring runs as the training script evaluates: fp32 weights, the forward pass under the autocast of the
precision it would pick (runtime.resolve_precision), log-probabilities in fp32, sums in float64.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from finetune.runtime.device import autocast_context

from .parallel import Shard
from .windows import Window

log = logging.getLogger("evaluate")
PROGRESS_SECONDS = 30.0  # a progress line at most this often on a long evaluation
ROWS_PER_CHUNK = 1024    # positions whose fp32 logits are held at once (206 MB for GPT-2; smaller chunks re-read the
                         # output matrix so often that they ran 1.5x slower on a CPU)


@dataclass
class Result:
    """What one evaluation of one model gives: its figures, and optionally per input and per document
    (a document: {"input", "name", "nll", "tokens", "bytes", "words"})."""
    figures: dict
    by_input: dict[str, dict] = field(default_factory=dict)
    documents: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Evaluation(Protocol):
    """One kind of data scored on every model: a name for the report, what kind it is, and the scoring. A
    new kind (a preference accuracy, say) is a class with these three members; the report needs nothing else."""
    name: str
    kind: str

    def run(self, scorer: Scorer) -> Result: ...


class Scorer:
    """One model, its tokenizer and how it runs: windows in, log-probabilities of their targets out."""

    def __init__(self, model, tokenizer, device, precision: str, context: int, batch_size: int, label: str,
                 shard: Shard | None = None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.precision, self.context, self.batch_size, self.label = precision, context, batch_size, label
        self.shard = shard or Shard(device=device)  # which batches this process runs (parallel.py)
        self.ctx = autocast_context(device, precision)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._byte_lengths: np.ndarray | None = None
        self._cutter = None
        self.head = plain_output_layer(model)
        self.tokens_scored = 0
        self.seconds = 0.0

    @property
    def prefix_token_id(self) -> int:
        """What a document's first token is predicted from: BOS, else EOS (lm-eval's prefix_token_id)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids, no special token added (lm-eval's tok_encode for a causal model)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def target_logprobs(self, windows: list[Window]) -> list[np.ndarray]:
        """The log-probability of each target token of each window (float64), the windows run in batches of
        similar length (longest first: the first batch shows at once whether memory suffices). In several
        processes, zeros for the windows of the batches another process runs (their sums add up: parallel.py)."""
        out: list[np.ndarray | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            if self.shard.owns_next_batch():
                scored = self._run_batch([windows[i] for i in chunk])
            else:
                scored = [np.zeros(windows[i].n_targets) for i in chunk]
            for i, logprobs in zip(chunk, scored):
                out[i] = logprobs
        return out  # type: ignore[return-value]

    def _run_batch(self, windows: list[Window]) -> list[np.ndarray]:
        import torch

        started = time.perf_counter()
        width = max(len(w.tokens) for w in windows) - 1
        # right padding needs no attention mask: a causal model's position t never sees what follows it
        inputs = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        for row, w in enumerate(windows):
            inputs[row, :len(w.tokens) - 1] = torch.tensor(w.tokens[:-1])
        results = []
        with torch.no_grad(), self.ctx:
            hidden = self.hidden_states(inputs.to(self.device))
            for row, w in enumerate(windows):
                n_inputs = len(w.tokens) - 1
                targets = torch.tensor(w.tokens[-w.n_targets:], device=hidden.device)
                results.append(self.logprobs(hidden[row, n_inputs - w.n_targets:n_inputs], targets))
                self.tokens_scored += w.n_targets
        self.seconds += time.perf_counter() - started
        return results

    def hidden_states(self, input_ids):
        """What the output layer reads (the base model's last hidden state), or the logits themselves for a
        model whose head does more than one matmul (soft-capping, scaling): see logprobs()."""
        if self.head is None:
            return self.model(input_ids=input_ids, use_cache=False).logits
        return self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state

    def logprobs(self, rows, targets) -> np.ndarray:
        """log p(target) of each row, ROWS_PER_CHUNK rows of fp32 logits at a time: the (batch, length, vocab)
        logits are never held whole (1.6 GB for GPT-2 at 8 x 1024), which on a CPU is most of the time."""
        import torch

        out = []
        for start in range(0, len(rows), ROWS_PER_CHUNK):
            chunk = rows[start:start + ROWS_PER_CHUNK]
            logits = (chunk if self.head is None else self.head(chunk)).float()
            picked = logits.gather(1, targets[start:start + ROWS_PER_CHUNK, None])[:, 0]
            out.append((picked - torch.logsumexp(logits, dim=-1)).double())
        return torch.cat(out).cpu().numpy()

    def cutter(self):
        """Where a long text may be cut into pieces that tokenize into the whole text's tokens (prepare_data.py's
        Cutter: GPT-2's byte-level regex proven, other tokenizers each cut checked)."""
        if self._cutter is None:
            from finetune.prepare.cuts import make_cutter
            from finetune.prepare.engines import HFEngine, tokenizer_spec

            self._cutter = make_cutter(self.tokenizer, tokenizer_spec(self.tokenizer), HFEngine(self.tokenizer))
        return self._cutter

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of each token id (of its piece of text): what bits per byte divides by on token files."""
        if self._byte_lengths is None:
            self._byte_lengths = token_byte_lengths(self.tokenizer)
        return self._byte_lengths

    def greedy_completion(self, prompt_ids: list[int], max_new_tokens: int) -> str:
        """The most likely continuation (greedy), up to the end-of-text token or max_new_tokens."""
        import torch

        from finetune.infer.sampling import decode_sample, generation_kwargs

        kwargs = generation_kwargs(self.model, self.tokenizer, max_new_tokens=max_new_tokens, greedy=True)
        room = self.context - len(prompt_ids)
        if room < 1:
            return ""
        kwargs["max_new_tokens"] = min(max_new_tokens, room)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        with torch.no_grad(), self.ctx:
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        eos = kwargs["eos_token_id"]
        sample = decode_sample(self.tokenizer, prompt_ids, out[0, len(prompt_ids):].tolist(),
                               set(eos if isinstance(eos, list) else [eos]))
        return sample.completion


def plain_output_layer(model):
    """The output layer when the logits are exactly base_model(...) -> output layer (GPT-2, Llama, Qwen2, ...);
    None for models that scale or soft-cap the logits after it (Gemma 2, Cohere, Granite), which are then
    scored from their full logits."""
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in
           ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")):
        return None
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    if head is None or base is None or base is model or type(model).__name__.endswith("Peft"):
        return None
    return head


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes of text each id stands for. Byte-level BPE (GPT-2's family): the characters of its vocabulary
    entry, each one byte; other tokenizers: the UTF-8 length of the id decoded alone. Special tokens: 0 (they
    are markup, not text of the document)."""
    from finetune.prepare.engines import bytes_to_unicode

    byte_chars = set(bytes_to_unicode().values())
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        if i >= len(lengths) or i in special:
            continue
        if all(c in byte_chars for c in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def batched(items: Iterable[Any], size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Progress:
    """A line every PROGRESS_SECONDS on a long evaluation: what is done, at what rate."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.started = self.last = time.perf_counter()

    def advance(self, n: int, scorer: Scorer, detail: str = "") -> None:
        """`detail`: more of where it is (how much of a long document is done)."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = scorer.tokens_scored / scorer.seconds if scorer.seconds else 0
            processes = f" in this process of {scorer.shard.world_size}" if scorer.shard.world_size > 1 else ""
            log.info("%s: %s %d/%d%s, %s tokens scored%s (%.0f tokens/s)", scorer.label, self.what, self.done,
                     self.total, f" ({detail})" if detail else "", f"{scorer.tokens_scored:,}", processes, rate)
