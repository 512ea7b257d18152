"""Chat records -> examples: each record read whole (records.read_objects), one format per run
(chat.FormatChooser), rendered to ids + loss mask (chat.ChatRenderer), labelled train or val by the byte
offset where it starts in the stream, so validation takes whole examples (as it takes whole text records).
One record, its rendering and its ids are in memory at a time."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError
from finetune.formats.chat import ChatRenderer, ChatTemplate, FormatChooser, choose_template, describe, example_of, parse_cell

from .engines import CHECK_EVERY, EngineMismatch
from .piece import Piece
from .records import read_objects, record_format
from .settings import Settings
from .split import split_at


@dataclass
class ChatExample:
    piece: Piece      # where it came from; its text is the rendering (the tally counts its characters)
    ids: np.ndarray
    mask: np.ndarray


@dataclass
class ChatRun:
    """What a chat run is decided on before any record is read: the format and the template."""
    format: str
    template: ChatTemplate


class CheckedEncoder:
    """The engine's ids for a batch of texts; with the tiktoken fast path, every CHECK_EVERY-th
    conversation is also encoded by Hugging Face and must agree (else EngineMismatch: the run starts over
    with --engine hf), as text pieces are checked."""

    def __init__(self, engine):
        self.engine, self.reference = engine, getattr(engine, "reference", None)
        self.calls, self.source = 0, 0

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        ids = [self.engine.encode(text) for text in texts]
        if self.reference is not None and self.calls % CHECK_EVERY == 0:
            if not np.array_equal(ids[-1], self.reference.encode(texts[-1])):
                raise EngineMismatch("tiktoken and Hugging Face disagreed on a rendered conversation", self.source)
        self.calls += 1
        return ids


def chat_renderer(tokenizer, settings: Settings, engine, template: ChatTemplate | None = None) -> ChatRenderer:
    """The renderer of a run, its template checked on a test conversation (a bad template fails here)."""
    template = template or choose_template(tokenizer, settings.chat_template)
    renderer = ChatRenderer(tokenizer, template, CheckedEncoder(engine), settings.train_on_everything)
    renderer.check_template()
    return renderer


def chat_examples(files: list[Path], file_facts: list[dict], settings: Settings, renderer: ChatRenderer,
                  chooser: FormatChooser, boundaries=(), first: str = "train",
                  first_index: int = 0) -> Iterator[ChatExample]:
    """The examples of `files` in order, one byte stream; the split alternates at `boundaries`."""
    base = 0
    for i, path in enumerate(files):
        yield from file_examples(path, file_facts[i], settings, renderer, chooser, base, boundaries, first,
                                 first_index + i)
        base += file_facts[i]["bytes"]


def file_examples(path: Path, facts: dict, settings: Settings, renderer: ChatRenderer, chooser: FormatChooser,
                  base: int, boundaries, first: str, source: int) -> Iterator[ChatExample]:
    """One record file's examples. A record's bytes run up to the next record's start (the first record's
    from the file's start), as with text records."""
    fmt, counts = record_format(path), {"train": 0, "val": 0}
    skipped_before = dict(renderer.counts.skipped)
    renderer.encode_many.source = source
    held = None  # one record of look-ahead: where the next one starts ends this one
    for offset, where, obj in read_objects(path, fmt, settings.encoding, facts):
        if held is not None:
            example = one_example(*held, base + offset, settings, renderer, chooser, boundaries, first, source)
            if example is not None:
                counts[example.piece.split] += 1
                yield example
        held = (base if held is None else base + offset, where, obj, fmt)
    if held is not None:
        example = one_example(*held, base + facts["bytes"], settings, renderer, chooser, boundaries, first, source)
        if example is not None:
            counts[example.piece.split] += 1
            yield example
    skipped = {why: n - skipped_before[why] for why, n in renderer.counts.skipped.items()}
    facts.update(format=fmt, records=counts, skipped=skipped)


def one_example(start: int, where: str, obj: dict, fmt: str, end: int, settings: Settings,
                renderer: ChatRenderer, chooser: FormatChooser, boundaries, first: str,
                source: int) -> ChatExample | None:
    """The record at stream bytes [start, end) rendered, or None when it is skipped (counted)."""
    if fmt in ("csv", "tsv") and "messages" in obj:  # CSV has no lists: the messages cell is JSON text
        obj = {**obj, "messages": parse_cell(obj["messages"], where, "messages")}
    kind = chooser.choose(obj, where)
    if kind is None:  # a plain record after chat records is refused by the chooser; this is the first
        raise UserError(f"{where}: the record is not a chat record, but this run reads chat records. HINT: "
                        "fix the record, or prepare plain text records in a separate run")
    example = example_of(obj, kind, where, as_messages=settings.chat_format == "messages")
    rendered = renderer.render(example, where)
    if rendered is None:
        return None
    split = split_at(start, boundaries, first)
    return ChatExample(Piece(rendered.text, split, source, start, end - start, True, 0), rendered.ids, rendered.mask)


def chat_meta(renderer: ChatRenderer, run: ChatRun, examples: dict, trained: dict) -> dict:
    """meta.json's "chat" object (docs/chat.md, "Token files"), or for pairs its "preference" object
    (docs/preference.md), as {key: object}."""
    if run.format == "preference":
        return {"preference": preference_meta(renderer, examples)}
    meta = {"format": run.format, "template": renderer.template.text, "template_source": renderer.template.source,
            "train_only_replies": not renderer.train_on_everything, "examples": dict(examples),
            "skipped": dict(renderer.counts.skipped), "trained_tokens": dict(trained)}
    if run.format == "prompt_completion":
        meta["prompt_tokens_merged"] = renderer.counts.prompt_merged
    return {"chat": meta}


def preference_meta(renderer: ChatRenderer, pairs: dict) -> dict:
    conversational = bool(renderer.first_pair and renderer.first_pair[0])
    return {"format": "conversational" if conversational else "standard",
            "template": renderer.template.text if conversational else None,
            "template_source": renderer.template.source if conversational else None,
            "pairs": dict(pairs), "prompt_tokens_merged": renderer.counts.prompt_merged,
            "mask_bits": {"completion": 1, "pair_start": 2, "rejected": 4}}


def preference_notes(preference: dict) -> list[str]:
    how = f"rendered with {describe(ChatTemplate(preference['template'], preference['template_source']))}" \
        if preference["template"] else "prompt + completion + end token, as TRL joins them"
    notes = [f"preference pairs ({preference['format']}, {how}): {preference['pairs']['train']:,} train and "
             f"{preference['pairs']['val']:,} val pairs, whole pairs; each stored as prompt, chosen, rejected"]
    if preference.get("prompt_tokens_merged"):
        notes.append(f"in {preference['prompt_tokens_merged']:,} pair(s) the prompt's last token merges with the "
                     "completions'; they start at that token, as in TRL")
    return notes


def check_examples(examples: dict, renderer: ChatRenderer, separate_val: bool, val_fraction: float) -> None:
    """Each split must hold an example; with none at all, say why."""
    skipped = renderer.counts.skipped
    if not examples["train"] and not examples["val"]:
        if skipped["no_assistant_turn"]:
            raise UserError(f"no conversation has an assistant turn ({skipped['no_assistant_turn']:,} skipped): "
                            "there is nothing to train on. HINT: each conversation needs at least one message "
                            "with the role assistant, whose reply is what the model learns")
        raise UserError(f"no example has anything to train ({skipped['nothing_to_train']:,} skipped). HINT: "
                        "check that the records hold replies or completions")
    for split in ("train", "val"):
        if not examples[split]:
            if separate_val:
                fix = "add records to " + ("--input" if split == "train" else "--val-input")
            else:
                fix = f"{'raise' if split == 'val' else 'lower'} --val-fraction (now {val_fraction}), or give --val-input"
            raise UserError(f"the {split} split holds no example ({examples['train' if split == 'val' else 'val']:,} "
                            f"in the other). HINT: {fix}, or add more records")


def chat_notes(chat: dict) -> list[str]:
    """What the summary says about chat records: examples, what is trained, what was skipped."""
    source = "joined as TRL does" if chat["format"] == "prompt_completion" else \
        describe(ChatTemplate(chat["template"], chat["template_source"]))
    replies = "completions" if chat["format"] == "prompt_completion" else "replies"
    trained = "every token trained (--train-on-everything)" if not chat["train_only_replies"] else \
        f"trained: the {replies} and their end tokens"
    examples, skipped = chat["examples"], chat["skipped"]
    notes = [f"chat records ({chat['format']}, {source}): {examples['train']:,} train and {examples['val']:,} val "
             f"examples, whole records; {trained}: {chat['trained_tokens']['train']:,} train and "
             f"{chat['trained_tokens']['val']:,} val target tokens"]
    if any(skipped.values()):
        notes.append(f"skipped {skipped['no_assistant_turn']:,} conversation(s) without an assistant turn and "
                     f"{skipped['nothing_to_train']:,} example(s) with nothing to train")
    if chat.get("prompt_tokens_merged"):
        notes.append(f"in {chat['prompt_tokens_merged']:,} prompt/completion record(s) the prompt's last token merges "
                     "with the completion's first; training starts at that token, as in TRL (a prompt ending "
                     "in a space or newline avoids it)")
    return notes
