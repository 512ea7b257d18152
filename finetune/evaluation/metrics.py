"""The figures of an evaluation, from totals summed over documents (so that they add across batches,
processes and inputs), with lm-evaluation-harness's definitions:

    loss             nats per predicted token (the training script's val loss)
    perplexity       exp(loss)
    bits_per_byte    -sum(log-likelihood) / ln 2 / UTF-8 bytes    (lm-eval: bits_per_byte)
    byte_perplexity  exp(-sum(log-likelihood) / UTF-8 bytes)      (lm-eval: byte_perplexity)
    word_perplexity  exp(-sum(log-likelihood) / words)            (lm-eval: word_perplexity; words are
                     len(re.split(r"\\s+", text)), lm-eval's count_words)

Per-byte and per-word figures compare models whose tokenizers differ; per-token ones do not.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

WORD_SPLIT = re.compile(r"\s+")
MAX_EXP = 700.0  # exp() of more overflows a float: such a perplexity is shown as inf


def count_words(text: str) -> int:
    """lm-eval's word count (count_words): the pieces between runs of whitespace, empty ends included."""
    return len(WORD_SPLIT.split(text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def safe_exp(x: float) -> float:
    return math.exp(x) if x < MAX_EXP else math.inf


@dataclass
class Totals:
    """Sums that the figures are ratios of. `bytes` and `words` are 0 where they are not known."""
    nll: float = 0.0       # negative log-likelihood, nats, summed over every predicted token
    tokens: int = 0        # predicted tokens
    bytes: int = 0         # UTF-8 bytes of what was predicted
    words: int = 0         # whitespace words of what was predicted
    documents: int = 0

    def __iadd__(self, other: Totals) -> Totals:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def figures(self) -> dict:
        out = {"loss": self.nll / self.tokens if self.tokens else math.nan}
        out["perplexity"] = safe_exp(out["loss"]) if self.tokens else math.nan
        if self.bytes:
            out["bits_per_byte"] = self.nll / self.bytes / math.log(2)
            out["byte_perplexity"] = safe_exp(self.nll / self.bytes)
        if self.words:
            out["word_perplexity"] = safe_exp(self.nll / self.words)
        out.update(tokens=self.tokens, bytes=self.bytes, words=self.words, documents=self.documents)
        return out


# What each figure is, and which way is better: the report's column headers and the model card's metric types.
FIGURES = {
    "loss": ("mean loss (nats/token)", "lower"),
    "perplexity": ("perplexity (per token)", "lower"),
    "bits_per_byte": ("bits per byte", "lower"),
    "byte_perplexity": ("byte perplexity", "lower"),
    "word_perplexity": ("word perplexity", "lower"),
    "acc": ("accuracy", "higher"),
    "acc_norm": ("accuracy, length-normalized", "higher"),
    "exact_match": ("exact match", "higher"),
    "dpo_loss": ("DPO loss", "lower"),
    "preference_accuracy": ("preference accuracy", "higher"),
    "reward_accuracy": ("reward accuracy (vs the first model)", "higher"),
    "margin": ("mean margin (log p chosen - rejected)", "higher"),
    "reward_margin": ("reward margin (beta x log-ratio, vs the reference)", "higher"),
    "logps_chosen": ("mean log p(chosen)", "higher"),
    "logps_rejected": ("mean log p(rejected)", "lower"),
}
COUNTS = ("tokens", "bytes", "words", "documents", "questions", "pairs")


def headline(figures: dict) -> tuple[str, float] | None:
    """The one figure a row is compared by: bits per byte when known (tokenizer-independent), else the loss,
    else a task's accuracy, else a preference accuracy."""
    for name in ("bits_per_byte", "loss", "acc", "exact_match", "preference_accuracy"):
        if name in figures and figures[name] is not None and not (isinstance(figures[name], float)
                                                                   and math.isnan(figures[name])):
            return name, figures[name]
    return None
