"""Perplexity and bits per byte of documents (--input): each document scored whole, in lm-eval's rolling
windows (or the perplexity guide's strided ones with --stride), summed per document, then per input file and
over all of them (metrics.Totals).

Constant memory: the documents come one at a time (documents.Documents), a text file's tokens in pieces, and
its windows as a stream (windows.stream_*); windows are gathered into rounds of at most ROUND_WINDOWS, each
round scored in batches (longest first) and forgotten, and a document keeps only its sums (log-likelihood,
tokens, bytes, words). In several processes each runs its share of the batches (parallel.py) and the
documents' log-likelihoods are summed across them at the end.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from finetune.formats.chat import TRAIN, ChatRenderer, choose_template

from .documents import Document, Documents, TextCounts
from .metrics import Totals, count_words
from .scoring import Progress, Result, Scorer
from .windows import Window, stream_rolling_windows, stream_strided_windows

ROUND_WINDOWS = 512  # windows batched together (sorted by length): their tokens are held, not the documents'


class DocumentScore:
    """One document being scored: its windows (a stream), and its Totals once every window is scored."""

    def __init__(self, document: Document, windows: Iterator[Window]):
        self.document, self.windows = document, windows
        self.nll = 0.0

    def add(self, logprobs: np.ndarray) -> None:
        self.nll -= float(logprobs.sum())

    def totals(self) -> Totals:
        raise NotImplementedError


class PlainScore(DocumentScore):
    """Plain text: its tokens counted, and its bytes and words, as its pieces stream by."""

    def __init__(self, document: Document, scorer: Scorer, stride: int | None):
        self.counts, self.tokens = TextCounts(), 0
        super().__init__(document, windows_of(self.token_pieces(scorer), scorer, stride, scorer.prefix_token_id))

    def token_pieces(self, scorer: Scorer) -> Iterator[list[int]]:
        for text in self.document.text_pieces(scorer.cutter()):
            self.counts.add(text)
            ids = scorer.encode(text)
            self.tokens += len(ids)
            yield ids

    def totals(self) -> Totals:
        return Totals(self.nll, self.tokens, self.counts.bytes, self.counts.words, 1)


class ChatScore(DocumentScore):
    """A chat record: rendered whole (a conversation is small), only its trained tokens (the replies) count."""

    def __init__(self, document: Document, scorer: Scorer, renderer: ChatRenderer, stride: int | None):
        self.parts: list[np.ndarray] = []
        rendered = renderer.render(document.chat, document.name)
        if rendered is None:  # no assistant turn: nothing to score
            self.trained = np.zeros(0, dtype=bool)
            self.n_bytes, self.n_words = 0, 0
            super().__init__(document, iter(()))
            return
        ids = rendered.ids.astype(np.int64).tolist()
        self.trained = (rendered.mask[1:] & TRAIN).astype(bool)  # the first token is predicted from nothing of its own
        targets = np.asarray(ids[1:])[self.trained]
        self.n_bytes = int(scorer.byte_lengths()[targets].sum())
        self.n_words = count_words(scorer.tokenizer.decode(targets.tolist()))
        super().__init__(document, windows_of([ids[1:]], scorer, stride, ids[0]))

    def add(self, logprobs: np.ndarray) -> None:
        self.parts.append(logprobs)

    def totals(self) -> Totals:
        if not self.trained.any():
            return Totals()
        logprobs = np.concatenate(self.parts) if self.parts else np.zeros(0)
        return Totals(-float(logprobs[self.trained].sum()), int(self.trained.sum()), self.n_bytes, self.n_words, 1)


def windows_of(pieces, scorer: Scorer, stride: int | None, prefix: int) -> Iterator[Window]:
    if stride:
        return stream_strided_windows(pieces, scorer.context, stride, prefix)
    return stream_rolling_windows(pieces, scorer.context, prefix)


class TextEvaluation:
    kind = "text"

    def __init__(self, name: str, documents: Documents | list[Document], stride: int | None = None):
        self.name, self.documents, self.stride = name, documents, stride

    def most_shares(self, context: int) -> int:
        """The most processes that can get a batch of this: at most one window per `context` tokens of a
        document, and a token stands for at least one byte (a chat record's template adds tokens: no bound)."""
        documents = self.documents
        if not isinstance(documents, Documents) or documents.has_chat:
            return 1 << 62
        return len(documents) + (documents.text_bytes + len(documents)) // context + 1

    def read_share(self, done_bytes: int, current: DocumentScore | None) -> str:
        """How much of the text is read (a progress line's detail, for a long document)."""
        total = getattr(self.documents, "text_bytes", 0)
        if not total or getattr(self.documents, "has_chat", True):
            return ""
        if isinstance(current, PlainScore):
            done_bytes += current.counts.bytes
        return f"{min(done_bytes / total, 1):.0%} of the text read"

    def scores(self, scorer: Scorer) -> Iterator[tuple[DocumentScore, Window | None]]:
        """(document, window) for each window of each document in order, then (document, None) at its end."""
        renderer = None
        for document in self.documents:
            if document.chat is not None:
                renderer = renderer or chat_renderer_of(scorer)
                score: DocumentScore = ChatScore(document, scorer, renderer, self.stride)
            else:
                score = PlainScore(document, scorer, self.stride)
            for window in score.windows:
                yield score, window
            yield score, None

    def run(self, scorer: Scorer) -> Result:
        records, nll, read = [], [], 0
        progress = Progress("documents", len(self.documents))
        items = self.scores(scorer)
        round_size = max(ROUND_WINDOWS, scorer.batch_size)
        while True:
            batch, ended = [], []
            for score, window in items:
                if window is None:
                    ended.append(score)
                else:
                    batch.append((score, window))
                    if len(batch) == round_size:
                        break
            if not batch and not ended:
                break
            for (score, _), logprobs in zip(batch, scorer.target_logprobs([w for _, w in batch])):
                score.add(logprobs)
            for score in ended:
                totals = score.totals()
                read += totals.bytes
                doc = score.document
                records.append({"input": doc.input, "name": doc.name, "nll": totals.nll, "tokens": totals.tokens,
                                "bytes": totals.bytes, "words": totals.words, "documents": totals.documents})
                nll.append(totals.nll)
            progress.advance(len(ended), scorer, self.read_share(read, batch[-1][0] if batch else None))
        for record, total in zip(records, scorer.shard.sum(np.asarray(nll))):  # each process's share, added up
            record["nll"] = float(total)
        by_input: dict[str, Totals] = {}
        for record in records:
            totals = Totals(record["nll"], record["tokens"], record["bytes"], record["words"], record.pop("documents"))
            by_input.setdefault(record["input"], Totals())
            by_input[record["input"]] += totals
        overall = Totals()
        for totals in by_input.values():
            overall += totals
        return Result(overall.figures(), {k: v.figures() for k, v in by_input.items()}, records)


def chat_renderer_of(scorer: Scorer) -> ChatRenderer:
    """The model's own chat template (saved with it by the training script), rendering as prepare_data.py does."""
    tokenizer = scorer.tokenizer
    return ChatRenderer(tokenizer, choose_template(tokenizer, None),
                        lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
