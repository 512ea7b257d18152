"""Token files: train.bin / val.bin written under hidden temporary names, what was written tallied, and
meta.json (built, written and read back by finetune/formats/tokenfiles.py) written last, when everything is renamed
into place (an interrupted run never leaves a train.bin that looks valid)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError, raise_if_write_failure
from finetune.core.fsio import fsync_dir
from finetune.formats.tokenfiles import MASK_FILES, build_meta, write_meta

from .chatstream import chat_notes, preference_notes
from .engines import tokenizer_class
from .piece import Piece
from .settings import Settings

OUTPUT_FILES = ("train.bin", "val.bin", "meta.json")
ALL_OUTPUTS = (*OUTPUT_FILES, *MASK_FILES.values())  # what marks an earlier run's outputs in --output-dir


class Outputs:
    """train.bin / val.bin / meta.json under hidden temporary names until commit()."""

    def __init__(self, out_dir: Path, dtype: np.dtype, masks: bool = False):
        self.out_dir, self.dtype, self.masks = out_dir, dtype.newbyteorder("<"), masks
        names = ("train.bin", "val.bin", *(MASK_FILES.values() if masks else ()), "meta.json")  # meta.json last
        self.temp = {name: out_dir / f".{name}.tmp-{os.getpid()}" for name in names}
        self.files = {}
        for split in ("train", "val"):
            try:
                self.files[split] = open(self.temp[f"{split}.bin"], "wb")
                if masks:
                    self.files[MASK_FILES[split]] = open(self.temp[MASK_FILES[split]], "wb")
            except OSError as exc:
                self.discard()
                raise UserError(f"cannot write in --output-dir {out_dir} ({exc.strerror}). "
                                "HINT: choose a folder you can write to") from None

    @contextlib.contextmanager
    def writing(self):
        """A failed write (disk full, quota, I/O error) becomes SaveFailed: exit 4, not a traceback."""
        try:
            yield
        except OSError as exc:
            raise_if_write_failure(exc, f"{', '.join(OUTPUT_FILES)} in {self.out_dir}")
            raise

    def write(self, split: str, ids: np.ndarray) -> None:
        with self.writing():
            # file.write, not ndarray.tofile: a full disk then raises ENOSPC ("No space left on device"),
            # where tofile says only "N requested and M written"
            self.files[split].write(np.ascontiguousarray(ids.astype(self.dtype, copy=False)))

    def write_mask(self, split: str, mask: np.ndarray) -> None:
        """The loss-mask bytes of the ids just written to `split` (chat data)."""
        with self.writing():
            self.files[MASK_FILES[split]].write(np.ascontiguousarray(mask, dtype=np.uint8))

    def close(self) -> None:
        with self.writing():
            for f in self.files.values():
                if not f.closed:
                    _sync(f)
                    f.close()

    def narrow_to_uint16(self) -> None:
        with self.writing():
            self._narrow_to_uint16()

    def _narrow_to_uint16(self) -> None:
        """Rewrite uint32 files as uint16 (dataset.load_meta wants dtype == token_dtype(max id))."""
        for split in ("train", "val"):
            src = self.temp[f"{split}.bin"]
            dst = src.with_name(src.name + "16")
            wide = np.memmap(src, dtype="<u4", mode="r") if src.stat().st_size else np.zeros(0, "<u4")
            with open(dst, "wb") as f:
                for i in range(0, len(wide), 1 << 24):
                    f.write(wide[i:i + (1 << 24)].astype("<u2"))
                _sync(f)
            del wide
            os.replace(dst, src)
        self.dtype = np.dtype("<u2")

    def commit(self, meta: dict) -> None:
        """Rename into place. Old meta.json goes first and the new one comes last, so until the end
        the folder never holds a meta.json that describes .bin files it does not match."""
        self.close()
        with self.writing():
            write_meta(self.temp["meta.json"], meta)
            (self.out_dir / "meta.json").unlink(missing_ok=True)
            if not self.masks:  # a plain data set replacing a chat one: its masks would describe other ids
                for name in MASK_FILES.values():
                    (self.out_dir / name).unlink(missing_ok=True)
            for name in self.temp:  # in order: meta.json last
                os.replace(self.temp[name], self.out_dir / name)
            fsync_dir(self.out_dir)  # the renames themselves on disk

    def discard(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                f.close()
        for path in self.temp.values():
            path.unlink(missing_ok=True)
            path.with_name(path.name + "16").unlink(missing_ok=True)


def _sync(f) -> None:
    """Data on disk before the rename that publishes it (a crash must not publish a hole)."""
    f.flush()
    os.fsync(f.fileno())


class Tally:
    """Token and character counts per split and per source, and where the validation ranges landed."""

    def __init__(self, sources: list[dict], track_ranges: bool):
        self.tokens = {"train": 0, "val": 0}
        self.chars = {"train": 0, "val": 0}
        self.max_id = -1
        self.sources, self.track_ranges = sources, track_ranges
        self.ranges: list[dict] = []
        self.previous_split = None

    def add(self, piece: Piece, ids: np.ndarray) -> None:
        if self.track_ranges and piece.split == "val":
            if self.previous_split != "val":
                self.ranges.append({"stream_bytes": [piece.start, piece.start],
                                    "train_tokens_before": self.tokens["train"],
                                    "val_token_start": self.tokens["val"], "tokens": 0})
            self.ranges[-1]["stream_bytes"][1] = piece.start + piece.nbytes
            self.ranges[-1]["tokens"] += len(ids)
        self.previous_split = piece.split
        self.tokens[piece.split] += len(ids)
        self.chars[piece.split] += len(piece.text)
        source = self.sources[piece.source]
        source["chars"] += len(piece.text)
        source["tokens"] += len(ids)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))


def run_meta(settings: Settings, tokenizer, dtype: np.dtype, tally: Tally, sources: list[dict], split: dict,
             chat: dict | None = None) -> dict:
    """This run's meta.json (tokenfiles.build_meta), with the chat facts ({"chat": ...} or {"preference":
    ...}: chatstream.chat_meta) or the records' (records_meta)."""
    return build_meta(tokenizer, name_or_path=settings.tokenizer, tokenizer_class=tokenizer_class(tokenizer),
                      dtype=dtype, max_token_id=tally.max_id, tokens=tally.tokens, chars=tally.chars,
                      sources=sources, split=split, encoding=settings.encoding,
                      **(chat if chat else records_meta(settings.text_field, sources)),
                      **({"settings": settings.recorded} if settings.recorded else {}))


def records_meta(text_field: str, sources: list[dict]) -> dict:
    """With record inputs: the field, documents per split and the records skipped (an end-of-text token
    follows each document, i.e. each record with text)."""
    mine = [s for s in sources if s["format"] != "text"]
    if not mine:
        return {}
    skipped = {why: sum(s["skipped"][why] for s in mine) for why in ("empty", "null", "missing")}
    return {"records": {"text_field": text_field,
                        "formats": sorted({s["format"] for s in mine}),
                        "train": sum(s["records"]["train"] for s in mine),
                        "val": sum(s["records"]["val"] for s in mine),
                        "skipped": sum(skipped.values()),
                        "skipped_by_reason": skipped,
                        "eos_after_each_record": True}}


def split_policy(settings: Settings, ranges, tally: Tally) -> dict:
    if not ranges:
        return {"policy": "val-input", "seed": settings.seed}
    return {
        "policy": "val-ranges",
        "val_fraction": settings.val_fraction,
        "seed": settings.seed,
        "stream": "the 'input' sources concatenated in order; stream_bytes index it",
        "requested_ranges": [list(r) for r in ranges],
        "val_ranges": tally.ranges,
    }


def input_notes(meta: dict) -> list[str]:
    """What the summary says about records (documents per split, skipped) and byte-order marks."""
    notes = chat_notes(meta["chat"]) if "chat" in meta else \
        preference_notes(meta["preference"]) if "preference" in meta else []
    records = meta.get("records")
    if records:
        why = ", ".join(f"{n:,} {reason}" for reason, n in records["skipped_by_reason"].items() if n)
        notes.append(f"records ({', '.join(records['formats'])}, field {records['text_field']!r}): "
                     f"{records['train']:,} train and {records['val']:,} val documents, whole records; "
                     f"{records['skipped']:,} skipped" + (f" ({why})" if why else ""))
    bom = [s["path"] for s in meta["sources"] if s.get("bom_stripped")]
    if bom:
        notes.append(f"stripped a UTF-8 byte-order mark from the start of {len(bom)} file(s): "
                     + ", ".join(bom[:3]) + (" ..." if len(bom) > 3 else ""))
    return notes
