"""Strategies: how a run trains the model's weights, one module each, chosen once from the config
(`strategy_for`). A module imports only the ones listed before it:

    base   the Strategy interface, and what every strategy shares (one process, or DDP replicas)
    full   full fine-tuning: every weight trained, the model loaded from --model (or the checkpoint)
    lora   --lora-r: adapters on a frozen base (delegates to finetune/train/lora.py)
    fsdp   --fsdp: full fine-tuning sharded across processes (delegates to finetune/train/fsdp.py)

base.Strategy is the interface the preflight, the set-up and the training step ask: none of them branches on
--lora-r or --fsdp. Adding a strategy adds a module here and a line to `strategy_for`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Strategy

if TYPE_CHECKING:
    from finetune.train.config import TrainConfig


def settings_problems(cfg: TrainConfig) -> list[str]:
    """Every strategy's flags checked, whichever is on: a LoRA flag given with LoRA off, --fsdp with --lora-r."""
    from finetune.train import fsdp, lora

    return lora.settings_problems(cfg) + fsdp.settings_problems(cfg)


def strategy_for(cfg: TrainConfig) -> Strategy:
    """The strategy the settings ask for (checked by settings_problems: LoRA and FSDP are never both on)."""
    if cfg.fsdp:
        from .fsdp import FsdpStrategy

        return FsdpStrategy(cfg)
    if cfg.lora_r:
        from .lora import LoraStrategy

        return LoraStrategy(cfg)
    from .full import FullStrategy

    return FullStrategy(cfg)


__all__ = ["Strategy", "settings_problems", "strategy_for"]
