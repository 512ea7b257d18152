"""The run: pieces -> ids (a pool of tokenizer threads) -> token files, then the checks on what came out
and meta.json. prepare_data.py calls tokenize_to_files once (twice when the fast path falls back)."""
from __future__ import annotations

import ctypes
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np

from finetune.core.console import bytes_progress, human_bytes
from finetune.core.errors import UserError
from finetune.formats.chat import FormatChooser
from finetune.formats.tokenfiles import token_dtype

from .chatstream import ChatRun, chat_examples, chat_meta, chat_renderer, check_examples
from .cuts import Cutter
from .piece import Piece
from .records import record_format
from .settings import Settings
from .split import range_sizes, val_ranges
from .stream import PieceStream
from .writer import Outputs, Tally, run_meta, split_policy


def encode_pieces(pieces, engine, workers: int) -> Iterator[tuple[Piece, np.ndarray]]:
    """Tokenize pieces on a thread pool, yielding results in order; reads stay a few pieces ahead."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
    queue: deque = deque()
    try:
        for piece in pieces:
            queue.append((piece, pool.submit(engine.encode_piece, piece)))
            if len(queue) > 2 * workers:
                piece, future = queue.popleft()
                yield piece, future.result()
        while queue:
            piece, future = queue.popleft()
            yield piece, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)



def tokenize_to_files(settings: Settings, inputs: list[Path], val_inputs: list[Path], tokenizer, engine,
                      cutter: Cutter, out_dir: Path, chat: ChatRun | None = None) -> dict:
    """Tokenize everything into temporary files in out_dir, then commit; return meta. `chat`: the records
    are chat records (ids + loss masks, whole examples)."""
    if chat is not None:
        return chat_to_files(settings, inputs, val_inputs, tokenizer, engine, out_dir, chat)
    sources = [{"path": str(p), "role": "input", "format": record_format(p) or "text", "chars": 0, "tokens": 0}
               for p in inputs]
    sources += [{"path": str(p), "role": "val-input", "format": record_format(p) or "text", "chars": 0, "tokens": 0}
                for p in val_inputs]
    file_facts = [{} for _ in sources]  # bytes and sha256, filled in as the files are read
    ranges = [] if val_inputs else val_ranges(sum(p.stat().st_size for p in inputs), settings.val_fraction,
                                              settings.seed, *range_sizes(inputs))
    boundaries, size = [b for r in ranges for b in r], engine.piece_chars
    text = settings.encoding, settings.text_field
    train = PieceStream(inputs, file_facts[:len(inputs)], *text, cutter, boundaries, "train", size, 0)
    val = PieceStream(val_inputs, file_facts[len(inputs):], *text, cutter, (), "val", size, len(inputs))
    pieces = (piece for stream in (train, val) for piece in stream)
    total_bytes = sum(p.stat().st_size for p in [*inputs, *val_inputs])
    tally = Tally(sources, track_ranges=not val_inputs)
    # Decided before writing: wide enough for every id the tokenizer has.
    dtype = token_dtype(max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1) - 1)

    outputs = Outputs(out_dir, dtype)
    try:
        write_tokens(pieces, engine, settings.num_workers, tokenizer.eos_token_id, outputs, tally, total_bytes)
        for source, facts in zip(sources, file_facts):
            source.update(facts)
        check_some_text(sources, settings.text_field)
        records = [s.get("records") for s in sources[:len(inputs)]]  # None for a text file
        check_split_sizes(tally, settings, ranges, train.moved,
                          None if None in records else sum(sum(r.values()) for r in records))
        if ranges and None not in records:
            warn_if_val_share_off(tally, settings.val_fraction, sum(r["val"] for r in records))
        if dtype.itemsize == 4 and tally.max_id < 2**16:
            outputs.narrow_to_uint16()
        meta = run_meta(settings, tokenizer, outputs.dtype, tally, sources, split_policy(settings, ranges, tally))
        outputs.commit(meta)
        return meta
    except BaseException:  # error, Ctrl-C or SIGTERM: leave nothing behind
        outputs.discard()
        raise


def chat_to_files(settings: Settings, inputs: list[Path], val_inputs: list[Path], tokenizer, engine,
                  out_dir: Path, chat: ChatRun) -> dict:
    """tokenize_to_files for chat records: every record rendered with the template into ids and a loss mask
    (train.mask.bin / val.mask.bin beside the ids), the split by whole records."""
    sources = [{"path": str(p), "role": "input", "format": record_format(p), "chars": 0, "tokens": 0} for p in inputs]
    sources += [{"path": str(p), "role": "val-input", "format": record_format(p), "chars": 0, "tokens": 0}
                for p in val_inputs]
    file_facts = [{} for _ in sources]
    ranges = [] if val_inputs else val_ranges(sum(p.stat().st_size for p in inputs), settings.val_fraction,
                                              settings.seed, *range_sizes(inputs))
    renderer = chat_renderer(tokenizer, settings, engine, chat.template)
    chooser = FormatChooser(settings.chat_format)
    boundaries = [b for r in ranges for b in r]
    examples = (example for stream in (
        chat_examples(inputs, file_facts[:len(inputs)], settings, renderer, chooser, boundaries, "train", 0),
        chat_examples(val_inputs, file_facts[len(inputs):], settings, renderer, chooser, (), "val", len(inputs)))
        for example in stream)
    tally = Tally(sources, track_ranges=not val_inputs)
    dtype = token_dtype(max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1) - 1)
    outputs = Outputs(out_dir, dtype, masks=True)
    try:
        counts, trained = write_examples(examples, outputs, tally, sum(p.stat().st_size for p in [*inputs, *val_inputs]))
        for source, facts in zip(sources, file_facts):
            source.update(facts)
        check_examples(counts, renderer, bool(val_inputs), settings.val_fraction)
        if dtype.itemsize == 4 and tally.max_id < 2**16:
            outputs.narrow_to_uint16()
        meta = run_meta(settings, tokenizer, outputs.dtype, tally, sources, split_policy(settings, ranges, tally),
                        chat=chat_meta(renderer, chat, counts, trained))
        outputs.commit(meta)
        return meta
    except BaseException:  # error, Ctrl-C or SIGTERM: leave nothing behind
        outputs.discard()
        raise


def write_examples(examples, outputs: Outputs, tally: Tally, total_bytes: int) -> tuple[dict, dict]:
    """Each example's ids and mask into its split's files; (examples, trained tokens) per split."""
    counts, trained, done = {"train": 0, "val": 0}, {"train": 0, "val": 0}, 0
    with bytes_progress(total_bytes, "rendering and tokenizing") as bar, closing(examples):
        for example in examples:
            split = example.piece.split
            outputs.write(split, example.ids)
            outputs.write_mask(split, example.mask)
            tally.add(example.piece, example.ids)
            counts[split] += 1
            trained[split] += int(np.count_nonzero(example.mask & 1))
            end = example.piece.start + example.piece.nbytes
            bar.update(max(0, end - done))
            done = max(done, end)
    outputs.close()
    return counts, trained


def write_tokens(pieces, engine, workers: int, eos: int, outputs: Outputs, tally: Tally, total_bytes: int) -> None:
    with bytes_progress(total_bytes, "tokenizing") as bar, \
            closing(encode_pieces(pieces, engine, workers)) as results:  # closing: stops the threads on error
        for piece, ids in results:
            if piece.doc_end:
                ids = np.append(ids, np.uint32(eos))
            outputs.write(piece.split, ids)
            tally.add(piece, ids)
            bar.update(piece.nbytes)
    outputs.close()



def check_some_text(sources: list[dict], text_field: str) -> None:
    """Record files whose records were all skipped can leave nothing to train on: say why."""
    for role, flag in (("input", "--input"), ("val-input", "--val-input")):
        mine = [s for s in sources if s["role"] == role]
        if mine and not any(s["tokens"] for s in mine) and all(s.get("format", "text") != "text" for s in mine):
            skipped = sum(sum(s["skipped"].values()) for s in mine)
            raise UserError(f"{flag} holds no text: all {skipped:,} records have an empty or null "
                            f"{text_field!r} field, or none. HINT: check --text-field (now "
                            f"{text_field!r})")


def check_split_sizes(tally: Tally, settings: Settings, ranges=(), moved: int = 0, records: int | None = None) -> None:
    """Each split must hold at least one training block. `records`: how many records --input held, when it is
    record files only (None otherwise)."""
    for split in ("train", "val"):
        n = tally.tokens[split]
        if n >= settings.block_size:
            continue
        if ranges and moved >= min(b - a for a, b in ranges) / 2:
            raise UserError(
                f"the {split} split holds {n} tokens, less than one block of --block-size {settings.block_size}, "
                f"because the text cannot be cut where the validation ranges go without changing its tokens "
                f"(a range edge moved {human_bytes(moved)}: a stretch with no whitespace and no change between "
                "letters, digits and other characters, such as one letter repeated). HINT: give the validation "
                "text as a separate file with --val-input")
        if settings.separate_val:
            fix = "add text to " + ("--input" if split == "train" else "--val-input")
        elif split == "val" and records == 1:
            raise UserError(  # a record goes whole to one split, so no --val-fraction can help
                f"the val split holds {n} tokens: --input holds one record, and a record goes whole to training "
                "or to validation, never both. HINT: give validation text with --val-input, or split the data "
                "into many records (e.g. one object per document, as JSON lines)")
        elif split == "val":
            fix = f"raise --val-fraction (now {settings.val_fraction})"
        else:
            fix = f"lower --val-fraction (now {settings.val_fraction})"
        raise UserError(f"the {split} split holds {n} tokens, less than one block of --block-size "
                        f"{settings.block_size}. HINT: {fix}, lower --block-size, or add more text")


VAL_SHARE_TOLERANCE = 0.25  # records: validation within a quarter of --val-fraction (7.5-12.5 % for 10 %)


def warn_if_val_share_off(tally: Tally, fraction: float, val_records: int) -> None:
    """Whole records cannot hit --val-fraction exactly; say so when few or long ones leave it far off."""
    share = tally.tokens["val"] / max(1, tally.tokens["train"] + tally.tokens["val"])
    if abs(share - fraction) > VAL_SHARE_TOLERANCE * fraction:
        print(f"warning: validation holds {share:.1%} of the tokens ({val_records:,} record(s)), where "
              f"--val-fraction asks for {fraction:.1%}: records go whole to one split, and these are few or long "
              "next to that share. HINT: give validation records with --val-input, or add more records",
              file=sys.stderr)


def keep_rss_flat() -> None:
    """Stop glibc from keeping freed 1 MB text and token buffers in its heap.

    glibc raises its mmap threshold each time a large mmapped block is freed; after that the
    pieces' buffers come from the heap, and RSS creeps up with the input (docs/performance.md). A
    fixed threshold keeps large blocks in mmap, returned to the OS on free.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 << 10)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
