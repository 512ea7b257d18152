"""Tokenize text files or records into train.bin / val.bin / meta.json for fine-tuning.

    python prepare_data.py --input book.txt --tokenizer gpt2
    python prepare_data.py --input corpus/ --val-input held_out.txt --output-dir data/corpus
    python prepare_data.py --input chats.jsonl export.csv --text-field body
    python prepare_data.py --sample-book            # writes book.txt (Python's docs) for a first run

Output (nanoGPT-compatible): train.bin and val.bin hold raw little-endian token ids with
no header (uint16 when the vocabulary fits, else uint32); meta.json says how to read them
and where they came from (see dataset.load_meta). An end-of-text token follows each input file.

How it works, in the order the code runs:
- The text is streamed: read in 1 MB blocks, decoded incrementally, cut into pieces
  (~1M characters; 64K for the Hugging Face engine) *only where a cut cannot change the
  tokens* (see "Safe cuts"), tokenized by a pool of threads and written in order. Memory
  does not grow with the input; only a stretch with no whitespace and no change between
  letters, digits and other characters (one letter repeated) is held whole.
- Validation is not the head or the tail of the text: the byte stream of all inputs is
  divided into k equal slots (k = validation bytes / 4 MB, between 1 and 64) and each
  slot gives one contiguous validation range at a
  seeded random place inside it (never touching the start of the first slot or the end of
  the last). Range edges move forward to the next safe cut. meta.json records where each
  range sits, in bytes and in tokens, so train + val can be put back together.
- Record files (.jsonl, .json, .csv/.tsv, .parquet; finetune/prepare/records.py reads them as a
  stream) give one document per record with text in --text-field, an end-of-text token after
  each; the split takes whole records (see "Record inputs").
- Chat records (messages, prompt/completion, instruction/output: detected from the fields, or
  --chat-format) are rendered with the chat template and written as ids plus train.mask.bin /
  val.mask.bin, one loss-mask byte per token: what is trained, where an example starts
  (finetune/formats/chat.py, finetune/prepare/chatstream.py; docs/chat.md).
- Token ids equal `AutoTokenizer.from_pretrained(name)(text, add_special_tokens=False)`
  for each whole file, and for each record. GPT-2-style byte-level BPE tokenizers take a fast path through
  tiktoken (same vocabulary and merges, same regex), checked against the Hugging Face
  tokenizer before the run and on samples during it; any other tokenizer uses the
  Hugging Face `tokenizers` library. A tokenizer that an earlier run found to be exactly
  its tokenizer.json is loaded without transformers (finetune/prepare/recorded.py), which
  saves start-up.
The pipeline lives in finetune/prepare/ (its README.md draws it); this script is its command line.
- Outputs are written under hidden temporary names and renamed at the very end, meta.json
  last, so an interrupted run never leaves a train.bin that looks valid. The run holds a lock
  on --output-dir (a second run into it is refused); a full disk is one error line, exit 4.
"""
from __future__ import annotations

import codecs
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core import cli
from finetune.core.console import human_bytes
from finetune.core.errors import SaveFailed, UserError, exit_on_user_error, raise_if_problems
from finetune.core.flags import shared
from finetune.core.outdir import claimed_output_files, existing_outputs_problems
from finetune.formats.chat import FORMAT_FLAG_VALUES, choose_template, describe
from finetune.prepare.chatstream import ChatRun, chat_renderer
from finetune.prepare.cuts import make_cutter
from finetune.prepare.engines import EngineMismatch, HFEngine, choose_engine, load_tokenizer, tokenizer_class, tokenizer_spec
from finetune.prepare.pipeline import keep_rss_flat, tokenize_to_files
from finetune.prepare.settings import Settings
from finetune.prepare.sources import (
    SAMPLE_BOOK,
    chat_run_format,
    input_problems,
    read_sample,
    write_sample_book,
)
from finetune.prepare.writer import ALL_OUTPUTS, input_notes
from finetune.train.objectives import data_kind

# -----------------------------------------------------------------------------
# Command line


@dataclass
class InputOutput:
    """input and output"""

    input: list[str] = shared("input", default_factory=lambda: [SAMPLE_BOOK])
    """text files (.txt/.md/.markdown/.rst/.text), record files (.jsonl/.json/.csv/.tsv/.parquet: one document per
    record) or folders of them, mixed freely; a folder gives those files, recursively, sorted by path, hidden files
    and folders skipped; repeatable (default: book.txt)"""
    text_field: str = shared("text_field", "text")
    """the field (JSON) or column (CSV/TSV/Parquet) that holds each record's text (default: %(default)s)"""
    output_dir: str = shared("output_dir", "data")
    """where train.bin, val.bin and meta.json go (default: %(default)s)"""
    encoding: str = shared("encoding", "utf-8")
    """text encoding of the input files (default: %(default)s)"""
    overwrite: bool = shared("overwrite", False)
    """replace existing outputs in --output-dir"""
    sample_book: str | None = field(default=None, metadata={"nargs": "?", "const": SAMPLE_BOOK, "metavar": "PATH"})
    """write a sample text to PATH (default: book.txt) and stop: the Python documentation bundled with CPython
    (pydoc_data, ~470 kB), for a first run without a book of your own"""


@dataclass
class Tokenizer:
    """tokenizer"""

    tokenizer: str = field(default="gpt2", metadata={"metavar": "NAME_OR_PATH"})
    """Hugging Face model name or local folder holding the tokenizer (default: %(default)s)"""
    engine: str = field(default="auto", metadata={"choices": ("auto", "tiktoken", "hf")})
    """auto: the tiktoken fast path for GPT-2-style byte-level BPE when it checks out, else Hugging Face
    tokenizers; the token ids are the same either way (default: %(default)s)"""


@dataclass
class ChatRecords:
    """chat and instruction records (docs/chat.md)"""

    chat_format: str = field(default="auto", metadata={"choices": FORMAT_FLAG_VALUES})
    """auto: detected from the fields (messages; prompt + completion; instruction + output; prompt + chosen +
    rejected: preference pairs for DPO, docs/preference.md; else plain text from --text-field); messages: every
    chat record as a conversation (prompt/completion and instruction records become turns); prompt_completion,
    instruction, preference: insist on that format; text: every record as plain text (default: %(default)s)"""
    chat_template: str | None = field(default=None, metadata={"metavar": "FILE"})
    """Jinja chat template to render conversations with, instead of the tokenizer's own (or, for a tokenizer
    without one, the default template of docs/chat.md)"""
    train_on_everything: bool = False
    """chat data: train on every token (template, system and user turns too), not only the replies and their end
    tokens"""


@dataclass
class ValidationSplit:
    """validation split"""

    val_fraction: float | None = field(default=None, metadata={"metavar": "F"})
    """share of the text held out for validation, taken from inside the text, never its head or tail (default:
    0.1)"""
    val_input: list[str] | None = field(default=None, metadata={"nargs": "+", "metavar": "PATH"})
    """separate validation text (files or folders) instead of a split of --input"""


@dataclass
class TrainingSizes:
    """training settings, for the size check and the summary only"""

    block_size: int = shared("block_size", 1024)
    """tokens per training block; each split must hold one (default: %(default)s)"""
    batch_size: int = shared("batch_size", 8)
    """blocks per micro-batch (default: %(default)s)"""
    grad_accum: int = shared("grad_accum", 1)
    """micro-batches per optimizer step (default: %(default)s)"""


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8))


@dataclass
class Runtime:
    """runtime"""

    seed: int = shared("seed", 1337, metavar="N")
    """chooses where the validation ranges sit (default: %(default)s)"""
    num_workers: int = shared("num_workers", default_factory=default_workers, metavar="N")
    """tokenizer threads (default: the CPUs available, at most 8; here %(default)s)"""


GROUPS = (InputOutput, Tokenizer, ChatRecords, ValidationSplit, TrainingSizes, Runtime)


@dataclass
class PrepareSettings(Runtime, TrainingSizes, ValidationSplit, ChatRecords, Tokenizer, InputOutput):
    """Every flag of prepare_data.py, as one flat object (the groups above hold the fields and their help)."""


def build_arg_parser(suppress_defaults: bool = False):
    return cli.build_arg_parser(
        GROUPS, "Tokenize text or records into train.bin / val.bin / meta.json for fine-tuning (raw little-endian "
                "token ids, nanoGPT-compatible; an end-of-text token after each file and each record).",
        suppress_defaults, epilog="example: python prepare_data.py --input books/ --tokenizer gpt2 --output-dir data")


def parse_args(argv=None) -> PrepareSettings:
    return cli.parse_config(PrepareSettings, build_arg_parser, argv)[0]


def settings_from(args: PrepareSettings) -> Settings:
    """The pipeline's settings from the flags; every problem with the flags in one error."""
    problems = []
    if args.val_input and args.val_fraction is not None:
        problems.append("--val-fraction and --val-input exclude each other. HINT: give --val-input for a "
                        "separate validation text, or --val-fraction to split --input")
    val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    if not 0.0 < val_fraction < 1.0:
        problems.append(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}. "
                        "HINT: e.g. --val-fraction 0.1 holds out 10% of the text")
    for flag, value, low in (("--block-size", args.block_size, 2), ("--batch-size", args.batch_size, 1),
                             ("--grad-accum", args.grad_accum, 1), ("--num-workers", args.num_workers, 1)):
        if value < low:
            problems.append(f"{flag} must be at least {low}, got {value}. HINT: pass {flag} {low} or more")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        problems.append(f"unknown --encoding {args.encoding!r}. HINT: e.g. utf-8, utf-8-sig, latin-1, cp1252")
    if not args.text_field:
        problems.append("--text-field is empty. HINT: name the field or column that holds the text, e.g. text")
    raise_if_problems(problems, "the flags")
    return Settings(tokenizer=args.tokenizer, encoding=args.encoding, text_field=args.text_field,
                    val_fraction=val_fraction, seed=args.seed, separate_val=bool(args.val_input),
                    block_size=args.block_size, batch_size=args.batch_size, grad_accum=args.grad_accum,
                    num_workers=args.num_workers, chat_format=args.chat_format, chat_template=args.chat_template,
                    train_on_everything=args.train_on_everything, recorded=recorded_settings(args))


# Flags that change no byte of the outputs (where they go, how fast they are made): meta.json leaves them out of
# its "settings", so the same input gives the same meta.json from any folder, with any threads or engine.
NOT_RECORDED = ("output_dir", "overwrite", "num_workers", "engine", "sample_book")


def recorded_settings(args: PrepareSettings) -> dict:
    """meta.json's "settings": the flags that decide the outputs, as --config reads them back."""
    return {name: value for name, value in dataclasses.asdict(args).items() if name not in NOT_RECORDED}


# -----------------------------------------------------------------------------
# Summary


def print_summary(meta: dict, settings: Settings, out_dir: Path, seconds: float, tokenize_seconds: float) -> None:
    from finetune.train.plan import steps_per_epoch

    tokens = {s: meta["splits"][s]["tokens"] for s in ("train", "val")}
    chars = {s: meta["splits"][s]["chars"] for s in ("train", "val")}
    mb = sum(s["bytes"] for s in meta["sources"]) / 1e6
    ranges = meta["split"].get("val_ranges")
    where = f"{len(ranges)} range(s) inside the text" if ranges else "--val-input"
    # The rate is over the tokenizing alone: on a small input start-up (imports, tokenizer) dominates the
    # total, and an end-to-end MB/s would be misleading there.
    packed = data_kind(meta) != "text"  # chat examples or preference pairs: ids + masks, packed whole
    written = "train.bin, val.bin, train.mask.bin, val.mask.bin, meta.json" if packed else \
        "train.bin, val.bin, meta.json"
    print(f"wrote {out_dir}/{written} ({meta['dtype']}): {human_bytes(mb * 1e6)} of input "
          f"tokenized in {tokenize_seconds:.1f} s ({mb / max(tokenize_seconds, 1e-9):.1f} MB/s); "
          f"{seconds:.1f} s in all, start-up included")
    for note in input_notes(meta):
        print(f"  {note}")
    for split in ("train", "val"):
        per = chars[split] / max(tokens[split], 1)
        extra = f", from {where}" if split == "val" else ""
        print(f"  {split:5s} {tokens[split]:>14,} tokens {chars[split]:>14,} chars  {per:.2f} chars/token{extra}")
    s = settings
    if packed:  # whole examples packed into blocks: the count depends on the packing
        print(f"  block size {s.block_size}: {-(-tokens['train'] // s.block_size):,} or more blocks per epoch "
              f"(examples are packed whole, the rest of a block is padding); validation: "
              f"{-(-tokens['val'] // s.block_size):,} or more")
        return
    blocks = tokens["train"] // s.block_size
    steps = steps_per_epoch(blocks, s.batch_size, s.grad_accum)
    print(f"  one epoch at block size {s.block_size}, batch size {s.batch_size}, grad accum {s.grad_accum}: "
          f"{blocks:,} blocks = {steps:,} optimizer steps; validation: {tokens['val'] // s.block_size:,} blocks")


# -----------------------------------------------------------------------------
# Main


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.sample_book:
        return write_sample_book(Path(args.sample_book))
    settings = settings_from(args)
    started = time.time()
    keep_rss_flat()
    out_dir = Path(args.output_dir)
    # cheap checks first: bad input fails before the tokenizer loads, every problem at once
    inputs, val_inputs, problems = input_problems(args.input, args.val_input, settings.encoding, settings.text_field,
                                                  settings.chat_format)
    problems += existing_outputs_problems(out_dir, ALL_OUTPUTS, args.overwrite)
    raise_if_problems([p for p in problems if p], "the input")
    chat_format = chat_run_format(inputs, val_inputs, settings.encoding, settings.chat_format)
    if chat_format is None and (settings.chat_template or settings.train_on_everything):
        flag = "--chat-template" if settings.chat_template else "--train-on-everything"
        raise UserError(f"{flag} is for chat records, but the input is plain text (no record has 'messages', "
                        "'prompt' + 'completion' or 'instruction' + 'output'). HINT: leave out the flag, or pass "
                        "--chat-format to say how to read the records")
    if chat_format == "preference" and settings.train_on_everything:
        raise UserError("--train-on-everything is for chat records; preference pairs score their completions "
                        "only. HINT: leave out the flag")
    template = choose_template(None, settings.chat_template) if settings.chat_template else None  # file errors now

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we run our own threads
    tokenizer = load_tokenizer(args.tokenizer, full=chat_format is not None)  # chat: the template, special tokens
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {args.tokenizer!r} has no end-of-text (eos) token to put between documents. "
                        "HINT: use the tokenizer of a causal language model")
    spec = tokenizer_spec(tokenizer)
    engine, why = choose_engine(tokenizer, spec, args.engine, read_sample(inputs, settings.encoding))
    cutter = make_cutter(tokenizer, spec, engine)
    print(f"tokenizer {args.tokenizer} ({tokenizer_class(tokenizer)}, {len(tokenizer):,} entries); "
          f"engine: {why}; {args.num_workers} worker thread(s)", file=sys.stderr)
    chat = None
    if chat_format is not None:
        renderer = chat_renderer(tokenizer, settings, HFEngine(tokenizer), template)  # a bad template fails here
        chat = ChatRun(chat_format, renderer.template)
        how = "prompt + completion + end token, no template text" if chat_format == "prompt_completion" else \
            f"rendered with {describe(renderer.template)}"
        if chat_format == "preference":
            how = f"TRL's tokens: standard pairs joined as prompt + completion + end token, conversational ones {how}"
        print(f"{'preference pairs' if chat_format == 'preference' else 'chat records'} ({chat_format}): {how}",
              file=sys.stderr)

    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    tokenize_started = time.time()
    try:
        with claimed_output_files(out_dir, "prepare_data.py", ALL_OUTPUTS, args.overwrite):
            try:
                meta = tokenize_to_files(settings, inputs, val_inputs, tokenizer, engine, cutter, out_dir, chat)
            except EngineMismatch as exc:
                print(f"note: {exc} in {[*inputs, *val_inputs][exc.source]}; starting over with --engine hf",
                      file=sys.stderr)
                meta = tokenize_to_files(settings, inputs, val_inputs, tokenizer, HFEngine(tokenizer), cutter, out_dir,
                                         chat)
        tokenize_seconds = time.time() - tokenize_started
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written or replaced. HINT: run the same command again",
              file=sys.stderr)
        raise SystemExit(130) from None
    except SaveFailed as exc:
        raise SaveFailed(f"{exc}; nothing in {out_dir} was replaced. HINT: free disk space, or choose "
                         "another --output-dir") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print_summary(meta, settings, out_dir, time.time() - started, tokenize_seconds)
    return meta


if __name__ == "__main__":
    main()
