"""The one loader of tokenizers, configs and models for every script, and what is done to a model
before training: dropout override, GELU fusion, the optimizer.

Loading strategy, the same everywhere: a local folder is read as it is; a hub name is looked up in the
local Hugging Face cache first (fast, no network), and only then on the hub, and only when the hub is
reachable and HF_HUB_OFFLINE is not set (otherwise huggingface_hub retries for about a minute).
"""
from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path

from finetune.core.errors import UserError, first_line, refused_pickle
from finetune.core.fsio import atomic_folder
from finetune.runtime.distributed import DistInfo

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


# -----------------------------------------------------------------------------
# Loading from a folder, the cache or the hub


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the Hugging Face hub? (Assume yes behind a proxy.)"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or len(name.split("/")) > 2


def from_folder_or_hub(load, source: str, what: str, flag: str):
    """`load(name, **kwargs)` (a from_pretrained) on a local folder, else on a hub name, cache first.
    Every failure is one UserError whose HINT fits the case."""
    path = Path(source).expanduser()
    noun = "tokenizer" if flag == "--tokenizer" else "model"
    local_hint = f"pass a local {noun} folder with {flag} (any local folder written by save_pretrained)"
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {source} is a file, not a folder. HINT: pass the folder that holds it")
    if path.is_dir():
        if needs_own_code(path):
            raise own_code_refused(path, what, source)
        if what == "model" and not (path / "config.json").is_file():  # say so, not what transformers makes of it
            raise UserError(f"cannot load model {source!r}: {path} has no config.json, so it is not a saved model. "
                            f"HINT: pass the folder that holds config.json and the weights (a save_pretrained "
                            f"folder, or a training run's output, best/ or checkpoint-N/)")
        try:
            return load(str(path), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, ...: all mean "cannot load this"
            if own_code_files(path):  # transformers refused what only the folder's code could load
                raise own_code_refused(path, what, source) from None
            raise UserError(f"cannot load {what} {source!r} ({first_line(exc)}). HINT: "
                            f"{folder_hint(path, what)}") from None
    if looks_like_path(source):
        raise UserError(f"cannot load {what} {source!r}: no such folder. HINT: check the path (relative paths "
                        f"start at {Path.cwd()}), or {local_hint}")
    try:
        return load(source, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - not in the cache (or not a valid repo name)
        error = exc
    where = "there is no folder of that name, and as a Hugging Face Hub name it is not in the local cache"
    fetch = download_hint(source, flag)
    if hub_offline():
        raise UserError(f"cannot load {what} {source!r}: {where} (HF_HUB_OFFLINE is set, so the hub was not "
                        f"asked). HINT: {local_hint}, or unset HF_HUB_OFFLINE once to download it; {fetch}")
    if not hub_reachable():
        raise UserError(f"cannot load {what} {source!r}: {where}, and the hub is not reachable (no network?). "
                        f"HINT: {local_hint}, or download it once on a machine with network: {fetch}")
    try:
        return load(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        error = exc
    raise UserError(f"cannot load {what} {source!r} ({first_line(error)}). HINT: check the name on the hub, "
                    f"or {local_hint}")


def download_hint(source: str, flag: str) -> str:
    """The command that fetches a hub name into a folder (the `hf` CLI ships with huggingface_hub, which
    transformers installs), and how to use that folder: what an offline user needs to get going."""
    folder = "./" + source.rstrip("/").split("/")[-1]
    return f"`hf download {source} --local-dir {folder}`, then pass {flag} {folder}"


# A model folder can ship its own Python code (config.json's / tokenizer_config.json's "auto_map" names
# it) for an architecture transformers does not have. Loading it means running that code, and left to
# itself transformers asks on stdin whether to. This tool never runs it: every load passes
# trust_remote_code=False, and such a folder is refused up front, by name, before transformers is asked.

CODE_NAMING_FILES = ("config.json", "tokenizer_config.json")


def own_code_files(path: Path) -> list[str]:
    """The .py files in `path` that its config.json / tokenizer_config.json name in auto_map."""
    files: list[str] = []
    for name in CODE_NAMING_FILES:
        auto_map = read_json_object(path / name).get("auto_map")
        refs = auto_map.values() if isinstance(auto_map, dict) else auto_map if isinstance(auto_map, list) else []
        for ref in refs:
            for item in ref if isinstance(ref, list) else [ref]:  # a tokenizer's is [slow, fast]
                if isinstance(item, str) and "." in item:  # "module.Class", or "repo--module.Class"
                    module = item.split("--")[-1].rsplit(".", 1)[0] + ".py"
                    if module not in files:
                        files.append(module)
    return files


def needs_own_code(path: Path) -> bool:
    """Does loading `path` take its own code: auto_map names some, and config.json's model_type is not
    an architecture transformers ships (then transformers would load its own class, safely)."""
    if not own_code_files(path):
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = read_json_object(path / "config.json").get("model_type")
    return not (isinstance(model_type, str) and model_type in CONFIG_MAPPING)


def own_code_refused(path: Path, what: str, source: str) -> UserError:
    files = ", ".join(own_code_files(path))
    return UserError(f"cannot load {what} {source!r}: {path} asks to run its own Python code ({files}, named "
                     f"by auto_map in its config), and this tool never runs code from a model folder "
                     f"(trust_remote_code=False). HINT: use a model whose architecture transformers ships "
                     f"(e.g. gpt2, llama, qwen2), or one converted to such an architecture")


def read_json_object(path: Path) -> dict:
    """A JSON file's top-level object; {} when absent or unreadable (the loader then says what is wrong)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def folder_hint(path: Path, what: str) -> str:
    if what == "tokenizer" and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return (f"{path} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); save them "
                f"there with tokenizer.save_pretrained()")
    return "the folder is damaged or incomplete; save it again, or pass another one"


def load_tokenizer(source: str, flag: str = "--model"):
    """AutoTokenizer, with pad = eos when the tokenizer has no pad token (batching needs a pad id; in
    training blocks eos never appears as padding, and generate() pads finished rows with it)."""
    from transformers import AutoTokenizer

    tokenizer = from_folder_or_hub(AutoTokenizer.from_pretrained, source, "tokenizer", flag)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(source: str, flag: str = "--model"):
    from transformers import AutoConfig

    return from_folder_or_hub(AutoConfig.from_pretrained, source, "model", flag)


def load_tokenizer_and_config(source: str, flag: str = "--model"):
    """Tokenizer and model config only (cheap), so settings can be checked before the weights load."""
    config = load_config(source, flag)  # first: a folder that is not a model at all is said so
    return load_tokenizer(source, flag), config


def load_weights(source: str, dtype, **kwargs):
    """AutoModelForCausalLM.from_pretrained, its failures as one UserError. A pickle weights file that
    torch's safe loader refuses is reported as unsafe, never with torch's advice to load it unsafely."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a truncated, mismatched or unsafe weights file is bad input
        if refused_pickle(exc):
            raise UserError(f"the weights of {source} (a pickle file, pytorch_model.bin) are not a safe weights "
                            f"file: loading them would call Python functions they name, possibly code, so they "
                            f"were refused. HINT: use a model saved as model.safetensors "
                            f"(save_pretrained(..., safe_serialization=True)) from a source you trust") from None
        raise UserError(f"cannot load the weights of {source} ({type(exc).__name__}: {first_line(exc)}). "
                        f"HINT: the weights file is damaged or does not match config.json; pass another "
                        f"checkpoint or save the model again") from None


def model_context_length(model_config) -> int | None:
    """Longest sequence the model has positions for (None when its config does not say)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def unwrap_model(model):
    """The plain model under DDP / DataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif not hasattr(model, "generate") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def save_pretrained_files(model, tokenizer, folder: Path) -> None:
    unwrap_model(model).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


class ModelFiles:
    """How a run writes its model: checkpoints (what a resume reads) and releases (best/ and the final model,
    what users load). A full fine-tune saves the whole model in both; LoRA (lora.py) overrides both; FSDP
    (fsdp.py) writes checkpoints as shards, every process its own, and gathers the model for a release."""

    sharded = False  # the model is split across processes: each takes part in every save and forward pass

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def release(self, model, final: Path, what: str, dist_info: DistInfo, into: bool = False) -> None:
        """Publish best/ or the final model (every process calls it; here rank 0 alone writes)."""
        if dist_info.is_main:
            with atomic_folder(final, what, into=into) as tmp:
                self.write_release(model, tmp)

    def write_checkpoint(self, model, folder: Path) -> None:
        save_pretrained_files(model, self.tokenizer, folder)

    def write_release(self, model, folder: Path) -> None:
        save_pretrained_files(model, self.tokenizer, folder)



def count_parameters(model_config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory, no weights read
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Preparing a model for training


def load_model_for_training(source: str, device, tokenizer, *, dropout: float | None = None,
                            gradient_checkpointing: bool = False):
    """fp32 master weights on `device`, with the in-memory speed-ups (none of them changes the saved files).
    The fast CPU dropout masks come later, once converters (LoRA) have added their own dropout modules."""
    import torch

    model = load_weights(source, torch.float32)
    if dropout is not None:
        set_dropout(model, dropout)
    fuse_tanh_gelu(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        # Renamed in recent transformers 5.x releases; the old name warns there.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model.to(device)


def set_dropout(model, p: float) -> None:
    """Every dropout module, and the config's dropout fields (so the saved config says what was trained)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    set_config_dropout(model.config, p)


def set_config_dropout(config, p: float) -> None:
    for key, value in config.to_dict().items():
        if ("pdrop" in key or "dropout" in key) and isinstance(value, float):
            setattr(config, key, p)


def fuse_tanh_gelu(model) -> int:
    """GPT-2's "gelu_new" runs as a chain of ~8 element-wise ops; torch's GELU(approximate="tanh") is the
    same formula in one kernel (equal up to rounding). Swapped in memory only: the saved config keeps
    "gelu_new", so the saved model is unchanged for every other tool."""
    import torch
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def make_optimizer(model, device, *, lr: float, weight_decay: float, betas: tuple[float, float]):
    """AdamW over the trainable parameters, weight decay on matrices only (not biases or LayerNorm gains)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel is one launch per step instead of a chain of per-tensor ops.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)
