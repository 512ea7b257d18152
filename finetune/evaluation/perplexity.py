"""Perplexity and bits per byte of documents (--input): each document scored whole, in lm-eval's rolling
windows (or the perplexity guide's strided ones with --stride), summed per document, then per input file and
over all of them (metrics.Totals)."""
from __future__ import annotations

from finetune.formats.chat import TRAIN, ChatRenderer, choose_template

from .documents import Document
from .metrics import Totals, count_bytes, count_words
from .scoring import Progress, Result, Scorer, batched
from .windows import Window, rolling_windows, strided_windows

DOCUMENTS_PER_ROUND = 64  # documents whose windows are batched together (memory: their tokens, not the file's)


class TextEvaluation:
    kind = "text"

    def __init__(self, name: str, documents: list[Document], stride: int | None = None):
        self.name, self.documents, self.stride = name, documents, stride

    def windows(self, scorer: Scorer, tokens: list[int], prefix: int) -> list[Window]:
        if self.stride:
            return strided_windows(tokens, scorer.context, self.stride, prefix)
        return rolling_windows(tokens, scorer.context, prefix)

    def run(self, scorer: Scorer) -> Result:
        renderer = None
        if any(d.chat is not None for d in self.documents):
            renderer = chat_renderer_of(scorer)
        by_input: dict[str, Totals] = {}
        records = []
        progress = Progress("documents", len(self.documents))
        for chunk in batched(self.documents, DOCUMENTS_PER_ROUND):
            prepared = [self.prepare(scorer, d, renderer) for d in chunk]
            windows = [w for p in prepared for w in p["windows"]]
            logprobs = iter(scorer.target_logprobs(windows))
            for doc, p in zip(chunk, prepared):
                scored = [next(logprobs) for _ in p["windows"]]
                totals = p["score"](scored)
                by_input.setdefault(doc.input, Totals())
                by_input[doc.input] += totals
                records.append({"input": doc.input, "name": doc.name, "nll": totals.nll, "tokens": totals.tokens,
                                "bytes": totals.bytes, "words": totals.words})
            progress.advance(len(chunk), scorer)
        overall = Totals()
        for totals in by_input.values():
            overall += totals
        return Result(overall.figures(), {k: v.figures() for k, v in by_input.items()}, records)

    def prepare(self, scorer: Scorer, doc: Document, renderer) -> dict:
        """The windows of one document, and how their log-probabilities make its Totals."""
        import numpy as np

        if doc.chat is None:
            tokens = scorer.encode(doc.text)
            n_bytes, n_words = count_bytes(doc.text), count_words(doc.text)

            def score(scored):
                return Totals(-float(sum(s.sum() for s in scored)), len(tokens), n_bytes, n_words, 1)
            return {"windows": self.windows(scorer, tokens, scorer.prefix_token_id) if tokens else [],
                    "score": score}
        rendered = renderer.render(doc.chat, doc.name)
        if rendered is None:  # no assistant turn: nothing to score
            return {"windows": [], "score": lambda scored: Totals()}
        ids = rendered.ids.astype(np.int64).tolist()
        trained = (rendered.mask[1:] & TRAIN).astype(bool)  # the first token is predicted from nothing of its own
        targets = np.asarray(ids[1:])[trained]
        text = scorer.tokenizer.decode(targets.tolist())

        def score_chat(scored):
            logprobs = np.concatenate(scored) if scored else np.zeros(0)
            return Totals(-float(logprobs[trained].sum()), int(trained.sum()),
                          int(scorer.byte_lengths()[targets].sum()), count_words(text), 1)
        return {"windows": self.windows(scorer, ids[1:], ids[0]), "score": score_chat}


def chat_renderer_of(scorer: Scorer) -> ChatRenderer:
    """The model's own chat template (saved with it by the training script), rendering as prepare_data.py does."""
    tokenizer = scorer.tokenizer
    return ChatRenderer(tokenizer, choose_template(tokenizer, None),
                        lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
