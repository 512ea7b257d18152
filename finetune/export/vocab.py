"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), for llama.cpp's byte-level BPE ("gpt2" model).

llama.cpp does not run the tokenizer.json pipeline: it has a few pre-tokenizers built in and picks one by
the name in `tokenizer.ggml.pre`. A wrong name tokenizes differently without any error, so the name is only
given when the tokenizer.json's pipeline is exactly one of those llama.cpp implements (GPT-2's, Llama 3's,
Qwen2's); anything else is refused, never guessed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from finetune.core.errors import UserError

# The Split regexes of Llama 3's and Qwen2's tokenizer.json (they differ in \p{N}{1,3} vs \p{N}), and the
# llama.cpp pre-tokenizer that implements each.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE = "GPT-2's byte-level pre-tokenizer, Llama 3's or Qwen2's"


@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "a b", in priority order
    pre: str  # llama.cpp's pre-tokenizer name
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the tokenizer.json pipeline `spec`, or None when it is not one llama.cpp has."""
    model, pre, normalizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("dropout"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    ignore_merges = bool(model.get("ignore_merges"))
    if pre.get("type") == "ByteLevel":  # GPT-2: the byte-level step with its own built-in regex
        if pre.get("use_regex", True) and not pre.get("add_prefix_space") and normalizer is None and not ignore_merges:
            return "gpt-2"
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space")):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    if regex == LLAMA3_REGEX and normalizer is None and ignore_merges:
        return "llama-bpe"
    if regex == QWEN2_REGEX and (normalizer is None or normalizer.get("type") == "NFC") and not ignore_merges:
        return "qwen2"  # (Qwen2 ships an NFC normalizer; llama.cpp's qwen2 tokenizer is made for that file)
    return None


def tokenizer_spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json pipeline, so it cannot "
                        f"be described to llama.cpp. HINT: export a model with a byte-level BPE tokenizer "
                        f"(tokenizer.json: {SUPPORTED_PRE})")
    return json.loads(backend.to_str())


def merge_strings(merges: list) -> list[str]:
    """tokenizer.json keeps merges as "a b" (older) or ["a", "b"] (tokenizers >= 0.20); GGUF wants "a b"."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def read_vocab(tokenizer, n_vocab: int) -> Vocab:
    """The GGUF vocabulary of `tokenizer` for a model with `n_vocab` embedding rows (more rows than tokens:
    the rest are unused padding, as a model's vocabulary is often rounded up)."""
    import gguf

    spec = tokenizer_spec(tokenizer)
    pre = pre_tokenizer_name(spec)
    if pre is None:
        kind = (spec.get("model") or {}).get("type", "unknown")
        raise UserError(f"the tokenizer's pipeline (a {kind} model, pre-tokenizer "
                        f"{(spec.get('pre_tokenizer') or {}).get('type')}) is not one llama.cpp implements, so its "
                        f"pre-tokenizer cannot be named with certainty, and a guess would tokenize differently. "
                        f"HINT: export models with {SUPPORTED_PRE} tokenizer (tokenizer.json)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embedding "
                        f"rows. HINT: resize the model's embeddings to the tokenizer (resize_token_embeddings) and "
                        f"save it again")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    return Vocab(tokens=tokens, token_types=[int(t) for t in types],
                 merges=merge_strings(spec["model"].get("merges", [])), pre=pre,
                 special_ids={k: v for k, v in special.items() if isinstance(v, int)},
                 add_bos=len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id,
                 add_eos=len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id,
                 chat_template=chat_template(tokenizer))


def chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def add_to_writer(writer, vocab: Vocab) -> None:
    """The `tokenizer.*` keys llama.cpp reads."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
