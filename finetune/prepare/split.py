"""Validation ranges: seeded places inside the byte stream of all inputs (never its head or tail)."""
from __future__ import annotations

import bisect
import random
from pathlib import Path

from .records import record_format

VAL_RANGE_BYTES = 4 << 20     # aim for validation ranges of about this size (at most MAX_VAL_RANGES)
MAX_VAL_RANGES = 64
RECORD_VAL_RANGE_BYTES = 16 << 10  # with records: smaller ranges, so whole records are drawn from all over
MAX_RECORD_VAL_RANGES = 1024
SHORT_FRACTION = 0.2  # records: validation short of the ranges' bytes by more than this is topped up


def val_ranges(total_bytes: int, fraction: float, seed: int, range_bytes: int = VAL_RANGE_BYTES,
               max_ranges: int = MAX_VAL_RANGES) -> list[tuple[int, int]]:
    """Seeded validation ranges [start, end) in the byte stream: one per equal slot.

    Each range holds `fraction` of its slot and sits at a random place between 5% and 95% of
    the room left in the slot, so neither the head nor the tail of the text is validation.
    """
    k = max(1, min(max_ranges, round(total_bytes * fraction / range_bytes)))
    rng = random.Random(seed)
    slot = total_bytes / k
    length = fraction * slot
    ranges = []
    for i in range(k):
        start = i * slot + rng.uniform(0.05, 0.95) * (slot - length)
        ranges.append((int(start), int(start + length)))
    return ranges


def range_sizes(inputs: list[Path]) -> tuple[int, int]:
    """Range size and count for val_ranges: smaller, more ranges when records are among the inputs."""
    if any(record_format(p) for p in inputs):
        return RECORD_VAL_RANGE_BYTES, MAX_RECORD_VAL_RANGES
    return VAL_RANGE_BYTES, MAX_VAL_RANGES




def split_at(offset: int, boundaries, first: str) -> str:
    """The split at a stream offset: it alternates at every boundary at or before it."""
    flips = bisect.bisect_right(boundaries, offset)
    return first if flips % 2 == 0 else ("val" if first == "train" else "train")


class RecordSplit:
    """The split of each record of a record file, in stream order: "val" when it starts inside a
    validation range (split_at), so a record is never cut between the splits.

    Records that are large next to a range make that rule lumpy: a range inside one long training record
    gets nothing, and a small file's few ranges can give far less validation than asked. So when a range
    has passed and the validation so far is short of what the ranges so far asked, by more than half a
    range and more than SHORT_FRACTION of it, the records after it are validation too, each while it
    brings the total closer to what was asked, up to the next range. Where the ranges get about what
    they ask (records small next to them), nothing changes.
    """

    def __init__(self, boundaries, first: str):
        self.boundaries, self.first = list(boundaries), first
        self.starts = self.boundaries[0::2] if first == "train" else []  # ranges [start, end) of val
        self.asked = 0          # bytes the ranges up to the current one ask for
        self.taken = 0          # bytes of validation records so far
        self.range = -1         # the last range that starts at or before the current record
        self.topping = None     # None: that range not passed yet; then True while it is topped up
        self.counts = {"train": 0, "val": 0}

    def label(self, start: int, end: int) -> str:
        """The split of the record at stream bytes [start, end)."""
        split = split_at(start, self.boundaries, self.first)
        r = bisect.bisect_right(self.starts, start) - 1
        while self.range < r:  # one or more ranges begin at or before this record
            self.range += 1
            self.asked += self.boundaries[2 * self.range + 1] - self.starts[self.range]
            self.topping = None
        if r >= 0 and split == "train":
            short = self.asked - self.taken
            if self.topping is None:  # the first record after the range: is the validation short?
                length = self.boundaries[2 * r + 1] - self.starts[r]
                self.topping = short > max(length / 2, self.asked * SHORT_FRACTION)
            if self.topping and end - start < 2 * short:  # the total is closer to what was asked with it
                split = "val"
            else:
                self.topping = False
        if split == "val":
            self.taken += end - start
        self.counts[split] += 1
        return split
