"""What the pipeline needs to know from the command line, as one frozen object (prepare_data.py builds it)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    tokenizer: str          # --tokenizer as given (meta.json records it)
    encoding: str = "utf-8"
    text_field: str = "text"
    val_fraction: float = 0.1
    seed: int = 1337
    separate_val: bool = False  # --val-input was given: no validation ranges inside --input
    block_size: int = 1024      # each split must hold one block
    batch_size: int = 8         # for the summary only
    grad_accum: int = 1         # for the summary only
    num_workers: int = 1
    chat_format: str = "auto"        # --chat-format: auto, messages, prompt_completion, instruction, text
    chat_template: str | None = None  # --chat-template FILE
    train_on_everything: bool = False  # chat data: every token a target, not only the replies
    recorded: dict = field(default_factory=dict)  # meta.json's "settings": the flags that decide the outputs
