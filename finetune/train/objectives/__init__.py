"""Objectives: what a run trains the model to do, one module each, chosen by the data (meta.json). A module
imports only the ones listed before it:

    base         the Objective interface
    text         next-token loss on plain text cut into blocks (meta.json without "chat"/"preference")
    chat         loss on the trained tokens of whole examples packed into blocks (meta.json "chat")
    preference   DPO on pairs of completions to one prompt (meta.json "preference")

base.Objective is the interface the loop, the preflight, the set-up and the evaluation ask: none of them
branches on the kind of data. Adding an objective adds a module here and a line to `objective_for`.
"""
from __future__ import annotations

from .base import Objective

KINDS = ("text", "chat", "preference")


def data_kind(meta: dict) -> str:
    """What meta.json says the token files hold: "preference", "chat" or "text"."""
    if isinstance(meta.get("preference"), dict):
        return "preference"
    if isinstance(meta.get("chat"), dict):
        return "chat"
    return "text"


def objective_for(meta: dict, cfg=None) -> Objective:
    """The objective the data asks for, with its settings from the run's config (`cfg`, may be None)."""
    kind = data_kind(meta)
    if kind == "preference":
        from .preference import PreferenceObjective

        return PreferenceObjective(beta=getattr(cfg, "dpo_beta", 0.1))
    if kind == "chat":
        from .chat import ChatObjective

        return ChatObjective()
    from .text import TextObjective

    return TextObjective()


__all__ = ["KINDS", "Objective", "data_kind", "objective_for"]
