"""Which saved model a --model folder means (generate.py, export.py): a model folder, a LoRA adapter
folder (its base must be found), or a training output whose saved models are inside it."""
from __future__ import annotations

from pathlib import Path

from . import lora
from .checkpoints import CHECKPOINT_NAME, SHARDED_FOLDER
from .errors import UserError
from .models import TOKENIZER_FILES, WEIGHT_FILES


def check_model_folder(path: Path) -> None:
    """Everything from_pretrained needs is there, so a half-written folder fails with a clear message."""
    if not path.is_dir():
        raise UserError(f"--model {path} is a file, not a model folder. HINT: pass the folder holding config.json")
    if lora.is_adapter_folder(path):  # a LoRA adapter (out/adapter, a LoRA checkpoint): its base must be found
        lora.require_peft()
        lora.adapter_base(path)
        return
    if not (path / "config.json").is_file():
        inside = saved_models_inside(path)
        hint = (f"HINT: pass a saved model inside it, e.g. --model {inside[0]}" if inside else
                "HINT: pass the training script's output folder, or a checkpoint-*/ or best/ folder in it")
        raise UserError(f"{path} has no config.json, so it is not a saved model. {hint}")
    if (path / SHARDED_FOLDER).is_dir() and not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"{path} is a checkpoint of an --fsdp run: its weights are shards (in {SHARDED_FOLDER}/) "
                        f"for resuming, not a model to load. HINT: pass the run's output folder or its best/, "
                        f"which hold the full model")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise UserError(
            f"{path} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}). "
            "HINT: the save was probably interrupted; pass another checkpoint or save the model again"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"{path} has a model but no tokenizer (tokenizer.json, or vocab.json + merges.txt). "
            "HINT: save it there with tokenizer.save_pretrained(), or copy its files from the base model"
        )


def saved_models_inside(path: Path) -> list[Path]:
    """best/ first, then checkpoints newest first: the folders a user most likely meant."""
    found = [d for d in path.iterdir() if d.is_dir() and (d / "config.json").is_file()]

    def rank(d: Path):
        step = CHECKPOINT_NAME.fullmatch(d.name)
        return (d.name != "best", -int(step.group(1)) if step else 0, d.name)

    return sorted(found, key=rank)
