"""The same tokenizer without importing transformers (prepare_data.py's start-up).

`import transformers` + AutoTokenizer.from_pretrained take seconds, longer than tokenizing a book. The
first time a tokenizer is loaded the full way, remember_tokenizer() checks that its tokenizer.json,
read by the `tokenizers` library alone, *is* that tokenizer (same pipeline, same vocabulary, same ids
on a probe text) and records the few facts transformers adds (class, length, eos, added tokens). Later
loads of the same files, with the same library versions, take load_recorded_tokenizer().
Names resolve as models.from_folder_or_hub does: a local folder as it is, a hub name through the local
cache only, so a tokenizer never recorded, or changed since, simply takes the full loader (and its messages).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune.core.fsio import rewrite_text
from finetune.formats.tokenfiles import tokenizer_fingerprint
from finetune.models.loading import looks_like_path

RECORD_VERSION = 1
RECORD_SUFFIXES = (".json", ".txt", ".model")  # what a tokenizer folder's tokenizer is built from


def local_tokenizer_folder(source: str) -> Path | None:
    """The folder the tokenizer loads from with no network: the folder itself, or the hub name's snapshot
    in the Hugging Face cache; None when there is none."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or looks_like_path(source):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "tokenizer.json")
    except Exception:  # noqa: BLE001 - not a valid repo name, unreadable cache: the full loader will say
        return None
    return Path(found).parent if isinstance(found, str) else None


def tokenizer_record_path(folder: Path) -> Path:
    """Where the facts about the tokenizer in `folder` are kept: keyed by the bytes of every file it
    could be built from and by the library versions, so any change means a new check."""
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps([RECORD_VERSION, version("transformers"), version("tokenizers")]).encode())
    for path in sorted(folder.iterdir()):
        if path.name.endswith(RECORD_SUFFIXES) and path.is_file():
            if path.stat().st_size > 64 << 20:
                raise OSError(f"{path} is too large to hash at every start")  # no record: the full loader
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "finetune" / "tokenizers" / f"{digest.hexdigest()[:32]}.json"


class RecordedTokenizer:
    """What prepare_data asks of an AutoTokenizer, answered by its `tokenizers` backend and the recorded
    facts. Only ever built for a tokenizer that remember_tokenizer() found identical to its backend."""

    def __init__(self, backend, name_or_path: str, facts: dict):
        self.backend_tokenizer, self.name_or_path = backend, name_or_path
        self.class_name, self.eos_token_id = facts["class"], facts["eos_token_id"]
        self.size, self.added_vocab = facts["len"], facts["added_vocab"]
        self.fingerprint = facts["fingerprint"]  # tokenizer_fingerprint() of the AutoTokenizer
        self.vocab = None

    def __len__(self) -> int:
        return self.size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def get_vocab(self) -> dict[str, int]:
        if self.vocab is None:  # built once: a large vocabulary takes a while (docs/performance.md)
            self.vocab = self.backend_tokenizer.get_vocab(with_added_tokens=True)
        return dict(self.vocab)

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self.added_vocab)


def load_recorded_tokenizer(source: str) -> RecordedTokenizer | None:
    """The tokenizer without transformers when it was recorded before (see above), else None."""
    folder = local_tokenizer_folder(source)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    try:
        facts = json.loads(tokenizer_record_path(folder).read_text(encoding="utf-8"))
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return RecordedTokenizer(backend, source, facts)
    except Exception:  # noqa: BLE001 - no record yet (or unreadable): the full loader is the fallback
        return None


def remember_tokenizer(source: str, tokenizer, probe: str) -> bool:
    """Record `tokenizer` (an AutoTokenizer) for load_recorded_tokenizer() if its tokenizer.json read by
    `tokenizers` alone is the same tokenizer: the same pipeline, vocabulary and ids on `probe`."""
    folder = local_tokenizer_folder(source)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if folder is None or backend is None or not (folder / "tokenizer.json").is_file():
        return False
    from tokenizers import Tokenizer

    alone = Tokenizer.from_file(str(folder / "tokenizer.json"))
    same = (json.loads(alone.to_str()) == json.loads(backend.to_str())
            and alone.get_vocab(with_added_tokens=True) == tokenizer.get_vocab()
            and alone.encode(probe, add_special_tokens=False).ids
            == list(tokenizer(probe, add_special_tokens=False)["input_ids"]))
    if not same:
        return False
    facts = {"class": type(tokenizer).__name__, "len": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
             "added_vocab": tokenizer.get_added_vocab(), "fingerprint": tokenizer_fingerprint(tokenizer)}
    try:
        record = tokenizer_record_path(folder)
        record.parent.mkdir(parents=True, exist_ok=True)
        rewrite_text(record, json.dumps(facts, ensure_ascii=False))
    except OSError:
        return False  # an unwritable cache only costs the next run its start-up
    return True


