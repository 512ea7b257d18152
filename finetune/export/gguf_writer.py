"""A Hugging Face causal LM as one GGUF file: architecture, hyperparameters, tensors, tokenizer.

Tensor names come from the gguf package's own map (gguf.get_tensor_name_map), so they are the names
llama.cpp looks up. What the map does not know is the layout, handled here per architecture:

- GPT-2's Conv1D stores its weight as (in, out); GGUF, like nn.Linear, wants (out, in): transposed.
- Llama's q/k projections: HF rotates the two halves of each head (rotate_half), llama.cpp's "llama"
  architecture rotates adjacent pairs, so the rows of each head are interleaved to match. Qwen2 is
  run by llama.cpp with the halves (NEOX) rotation: its rows stay as they are.
- A tied output layer (lm_head = token embedding) is not written twice: llama.cpp falls back to the
  token embedding when `output.weight` is absent.

The file is written tensor by tensor (header, metadata and tensor table first, then each tensor converted
and written in turn), so memory holds the loaded model plus one converted tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.core.errors import UserError
from finetune.core.fsio import atomic_path

SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "qwen2")
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_OUTTYPE = "f16"
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


@dataclass
class PlannedTensor:
    name: str  # the GGUF name
    shape: tuple[int, ...]  # numpy order (rows first), as written
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], object]  # -> the float32 numpy array, made only when it is written


def outtype_types(outtype: str):
    """(tensor type of the weight matrices, the file type recorded in general.file_type)."""
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0), "q4_0": (q.Q4_0, f.MOSTLY_Q4_0)}[outtype]


# -----------------------------------------------------------------------------
# Architectures: what llama.cpp can run, checked on the config before any weights load


def unsupported(config, what: str) -> UserError:
    return UserError(f"this {config.model_type} model {what}, which the GGUF export does not write. HINT: export "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)} models in their standard configuration")


def rope_theta(config) -> float:
    """transformers 5 keeps rope settings in config.rope_parameters; older configs had rope_theta."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta is not None else 10000.0


def check_architecture(config) -> str:
    """The gguf architecture name for `config` (gguf.MODEL_ARCH_NAMES), or a UserError saying what is not
    supported: every setting that changes the computation must be one llama.cpp's graph for it has."""
    import gguf

    kind = config.model_type
    if kind not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"cannot export a {kind!r} model to GGUF: the architectures supported are "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}. HINT: fine-tune one of those to export it")
    if kind == "gpt2":
        if config.activation_function not in GPT2_TANH_GELUS:
            raise unsupported(config, f"uses activation {config.activation_function!r} (llama.cpp's GPT-2 uses the "
                                      f"tanh GELU)")
        if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
            raise unsupported(config, "scales attention differently from GPT-2")
        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise unsupported(config, f"uses rope scaling ({params.get('rope_type', params.get('type'))})")
    if config.hidden_act != "silu":
        raise unsupported(config, f"uses activation {config.hidden_act!r}")
    if kind == "llama":
        if config.attention_bias or config.mlp_bias:
            raise unsupported(config, "has attention or MLP biases")
        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    if getattr(config, "use_sliding_window", False):
        raise unsupported(config, "uses sliding-window attention")
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer, config) -> None:
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)  # None means 4 x width
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))


# -----------------------------------------------------------------------------
# Tensors: names, layouts, types


def interleave_rotary_halves(weight, n_heads: int):
    """Rows of each head reordered from HF's (first half, second half) to llama.cpp's adjacent pairs:
    row j of the first half and row j of the second become rows 2j and 2j+1."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tied_output(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def skipped(name: str) -> bool:
    """Buffers that are not weights: GPT-2's causal-mask buffers (older saves), rotary frequency tables."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) or "rotary_emb" in name


def hf_to_gguf_layout(name: str, tensor, config):
    """The torch tensor `name` of the HF model in the layout llama.cpp reads (see the module docstring)."""
    if config.model_type == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return tensor.t()
    if config.model_type == "llama" and name.endswith("self_attn.q_proj.weight"):
        return interleave_rotary_halves(tensor, config.num_attention_heads)
    if config.model_type == "llama" and name.endswith("self_attn.k_proj.weight"):
        return interleave_rotary_halves(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """Norms, biases (1-D) and the position embedding stay F32 (what llama.cpp computes them in); the rest
    in `outtype`; for q8_0 and q4_0 a row whose length is not a whole number of 32-value blocks falls back to F16."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or gguf_name.startswith("position_embd."):
        return q.F32
    qtype = outtype_types(outtype)[0]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return q.F16 if shape[-1] % block else qtype


def plan_tensors(model, config, outtype: str) -> list[PlannedTensor]:
    import gguf
    import torch

    arch = {"gpt2": gguf.MODEL_ARCH.GPT2, "llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    name_map = gguf.get_tensor_name_map(arch[config.model_type], config.num_hidden_layers)
    tied = tied_output(model)
    planned = []
    for name, tensor in model.state_dict().items():
        if skipped(name) or (tied and name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"the model's tensor {name} has no GGUF name in llama.cpp's {config.model_type} layout. "
                            f"HINT: export a {config.model_type} model as transformers saves it (no extra modules)")
        shape = tuple(hf_to_gguf_layout(name, torch.empty(tensor.shape, device="meta"), config).shape)

        def make(name=name, tensor=tensor):
            return hf_to_gguf_layout(name, tensor.detach().to(torch.float32), config).contiguous().numpy()

        planned.append(PlannedTensor(gguf_name, shape, tensor_type(gguf_name, shape, outtype), make))
    return planned


def nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size


def encode(array, qtype):
    """float32 numpy -> the bytes (as a numpy array) of `qtype`: F32/F16 by numpy, BF16, Q8_0 and Q4_0 by
    gguf.quants (ports of llama.cpp's reference quantize_row_*_ref)."""
    import gguf

    return gguf.quants.quantize(array, qtype)


# -----------------------------------------------------------------------------
# The file


@dataclass
class ExportSummary:
    path: Path
    architecture: str
    n_tensors: int
    n_bytes: int


def write_gguf(path: Path, model, config, vocab, outtype: str, name: str) -> ExportSummary:
    """Write the GGUF file atomically: under a temporary name, renamed into place only when complete."""
    import gguf
    import numpy as np

    from .vocab import add_to_writer

    arch = check_architecture(config)
    planned = plan_tensors(model, config, outtype)
    with atomic_path(path, f"the GGUF file {path}") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_type("model")
            writer.add_name(name)
            writer.add_file_type(outtype_types(outtype)[1])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_hyperparameters(writer, config)
            add_to_writer(writer, vocab)
            for t in planned:
                writer.add_tensor_info(t.name, t.shape, np.float32, nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in planned:  # one tensor in memory at a time, besides the model
                writer.write_tensor_data(encode(t.make(), t.qtype))
        finally:
            writer.close()
    return ExportSummary(path, arch, len(planned), path.stat().st_size)
