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
