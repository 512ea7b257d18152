"""Full fine-tuning: every weight trained, loaded from --model (or the checkpoint a resume continues), the whole
model in every checkpoint; one process, or a DDP replica in each."""
from __future__ import annotations

from .base import Strategy


class FullStrategy(Strategy):
    name = "full"
