"""export.py's room: a saved model (or a LoRA adapter merged into its base) written as one GGUF file for
llama.cpp, Ollama and LM Studio, with a Modelfile for Ollama. Imports the rest of the package, never a
script; inside, a module imports only the ones listed before it:

    vocab         the tokenizer as GGUF metadata: tokens, merges, token types, special ids, pre-tokenizer
    gguf_writer   architectures, hyperparameters, tensor names and layouts, the file itself (tensor by tensor)
    modelfile     Ollama's Modelfile: FROM, and a TEMPLATE + stop words derived from the chat template

The `gguf` package (llama.cpp's Python library for the format) is optional for the rest of the tool:
everything here imports it lazily, and export.py says `pip install gguf` when it is missing.
"""
from __future__ import annotations

from finetune.core.errors import UserError

GGUF_MISSING = "export to GGUF needs the gguf package, which is not installed. HINT: pip install gguf"


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(GGUF_MISSING) from None
