"""LoRA adapters on disk, wherever one is trained or loaded: their files, the base they name and its
fingerprint (checked wherever an adapter loads), and whether peft is installed. peft is imported lazily."""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

from finetune.core.errors import UserError

from .loading import WEIGHT_FILES

PEFT_MISSING = "LoRA needs the peft package, which is not installed. HINT: pip install peft"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Beside each adapter we save: the fingerprint of the base it was trained on, checked wherever it loads (an
# adapter pointed at another base of the same shapes would load silently and generate nonsense).
ADAPTER_BASE_FILE = "adapter_base.json"
RELEASE_ADAPTER_DIR = "adapter"  # beside best/ and the final model: the adapter alone


@contextlib.contextmanager
def quiet_peft_wrap():
    """peft asks a model for `is_gradient_checkpointing`, which transformers 5.x renamed: a FutureWarning on
    every wrap that says nothing to a user. Silenced around our own wraps only, not for the whole process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_installed() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def require_peft() -> None:
    if not peft_installed():
        raise UserError(PEFT_MISSING)


def base_reference(model: str) -> str:
    """How the adapter names its base: the absolute path of a local folder, else the hub name as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def base_folder(model: str) -> Path | None:
    """The folder the base loads from: the local folder, or the hub name's snapshot in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from transformers.utils import cached_file

        found = cached_file(model, "config.json", local_files_only=True)
        return Path(found).parent if found else None
    except Exception:  # noqa: BLE001 - not in the cache
        return None


def base_fingerprint(model: str, sample_chunks: int = 32, chunk: int = 1 << 16) -> str:
    """sha256 of the base's config.json and of each weight file's size, header and `sample_chunks` evenly
    spaced 64 KiB pieces: a few MiB read, however big the model; tells another base (other weights, other
    config, a fine-tuned copy) from the one trained on, not a single changed byte."""
    folder = base_folder(model)
    digest = hashlib.sha256()
    if folder is None:
        return "unknown"
    digest.update((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    files = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    for index in [f for f in files if f.name.endswith(".index.json")]:
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        files += [folder / shard for shard in shards if (folder / shard).is_file()]
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for i in range(sample_chunks + 1):
                f.seek(min(size, 0 if i == 0 else max(0, size * i // sample_chunks - chunk)))
                digest.update(f.read(chunk if i else 1 << 20))  # the first MiB: the safetensors header
    return digest.hexdigest()[:16]
