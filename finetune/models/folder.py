"""Which saved model a --model folder means (generate.py, export.py): a model folder, a LoRA adapter
folder (its base must be found; the adapter is loaded merged into it), or a training output whose saved
models are inside it."""
from __future__ import annotations

import json
from pathlib import Path

from finetune.core.errors import UserError, first_line
from finetune.formats.checkpoints import CHECKPOINT_NAME, SHARDED_FOLDER

from . import adapters
from .loading import TOKENIZER_FILES, WEIGHT_FILES, hub_offline, hub_reachable, load_weights, looks_like_path

DEFAULT_MODEL = "out"  # what generate.py and evaluate.py read when --model is not given: the training output


def looks_local(name: str) -> bool:
    """True when --model can only be meant as a folder here, never as a Hub name ('org/name')."""
    if name == DEFAULT_MODEL or name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    parts = name.split("/")
    if len(parts) > 2 or Path(parts[0]).expanduser().exists():
        return True
    # the training script's own folder names; no Hub repo is called that
    return parts[-1] == "best" or CHECKPOINT_NAME.fullmatch(parts[-1]) is not None


def resolve_model(name: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder)."""
    path = Path(name).expanduser()
    if path.exists():
        check_model_folder(path)
        return str(path), True
    if looks_local(name):
        hint = ("HINT: train a model first (the training script writes to out/), or pass --model DIR"
                if name == DEFAULT_MODEL else
                "HINT: check the path; the training script saves OUT/best and OUT/checkpoint-N folders")
        raise UserError(f"model folder {name} does not exist. {hint}")
    return name, False


def check_model_folder(path: Path) -> None:
    """Everything from_pretrained needs is there, so a half-written folder fails with a clear message."""
    if not path.is_dir():
        raise UserError(f"--model {path} is a file, not a model folder. HINT: pass the folder holding config.json")
    if is_adapter_folder(path):  # a LoRA adapter (out/adapter, a LoRA checkpoint): its base must be found
        adapters.require_peft()
        adapter_base(path)
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


# -----------------------------------------------------------------------------
# A LoRA adapter folder: its base, and the model it makes (generate.py, export.py)


def is_adapter_folder(path: Path) -> bool:
    return (path / adapters.ADAPTER_FILES[0]).is_file()


def adapter_base(folder: Path) -> str:
    """The base an adapter folder names; a clear error when it is not recorded or cannot be found."""
    config_file = folder / adapters.ADAPTER_FILES[0]
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_file} is not readable JSON ({first_line(exc)}). HINT: save the "
                        f"adapter again") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} holds a JSON {json_kind(config)}, not the object of settings peft writes. "
                        f"HINT: save the adapter again (peft's save_pretrained)")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{config_file}: base_model_name_or_path is a {json_kind(base)} ({first_line(json.dumps(base), 60)}), "
                        f"not the base model's folder or hub name. HINT: set it to the base's folder or hub name")
    if not (folder / adapters.ADAPTER_FILES[1]).is_file():
        raise UserError(f"{folder} has adapter_config.json but no {adapters.ADAPTER_FILES[1]}. HINT: the save was probably "
                        f"interrupted; pass another checkpoint")
    if not base:
        raise UserError(f"{config_file} does not name its base model (base_model_name_or_path). "
                        f"HINT: set it to the base's folder or hub name")
    if adapters.base_folder(base) is None and (looks_like_path(base) or hub_offline() or not hub_reachable()):
        where = "no such folder" if looks_like_path(base) else "not in the local Hugging Face cache, hub not asked"
        raise UserError(f"the base model {base} of the adapter in {folder} cannot be found ({where}). HINT: put "
                        f"the base model back at {base}, or set base_model_name_or_path in "
                        f"{folder / adapters.ADAPTER_FILES[0]} to where it is now")
    check_adapter_base(folder, base)
    return base


def json_kind(value) -> str:
    """The JSON type of a parsed value, in JSON's words."""
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "list"), (dict, "object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def check_adapter_base(folder: Path, base: str) -> None:
    """Refuse an adapter whose recorded base fingerprint is not the base's it would load onto (adapters saved
    by other tools record none: nothing to check)."""
    try:
        recorded = json.loads((folder / adapters.ADAPTER_BASE_FILE).read_text(encoding="utf-8")).get("base_fingerprint")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return
    actual = adapters.base_fingerprint(base)
    if recorded and actual != "unknown" and recorded != actual:
        raise UserError(f"the adapter in {folder} was trained on a base with fingerprint {recorded}, but its base "
                        f"{base} has fingerprint {actual} (other weights or config). HINT: set "
                        f"base_model_name_or_path in {folder / adapters.ADAPTER_FILES[0]} to the base it was trained on, or "
                        f"load the merged model its training run wrote")


def load_adapter_model(folder: Path, dtype):
    """Base + adapter, merged (generation runs at the speed of the plain model)."""
    adapters.require_peft()
    from peft import PeftModel

    base = adapter_base(folder)
    model = load_weights(base, dtype)
    try:
        with adapters.quiet_peft_wrap():
            return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - a damaged adapter, or one made for another base
        raise UserError(f"cannot load the adapter in {folder} onto {base} ({type(exc).__name__}: "
                        f"{first_line(exc)}). HINT: check that it was trained on this base") from None
