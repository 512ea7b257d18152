"""LoRA with peft: low-rank adapters trained on a frozen base model (`--lora-r N`).

One converter (`to_lora`, called once by the training script after the base loads) and one way of
writing the model (`LoraModelFiles`); the training loop does not know LoRA is on.

- Checkpoints hold the adapter (adapter_config.json, adapter_model.safetensors) and the tokenizer, never
  a copy of the frozen base; the training state records the base by name or absolute path and by a
  fingerprint of its config and weights, so a resume against another base is refused.
- Releases (best/ and the final model) hold the base with the adapter merged into it (loads without peft)
  and, in adapter/, the adapter alone, whose base_model_name_or_path is a hub name or an absolute path.
- With bf16/fp16 autocast, the frozen linear weights of the blocks are held in that dtype: autocast casts
  them to it for every matmul anyway, so the arithmetic is the same and their memory is halved (README,
  "Bigger models with LoRA"). Embeddings, LayerNorms and the adapters stay fp32. A release merges the
  adapter into the base reloaded in fp32, never into the rounded copy; a base stored in bf16/fp16 is
  written in fp32 then, since rounding it back would lose part of the adapter's delta (logged once).
- peft puts a plain nn.Dropout on each adapter's input; the training script gives the converted model the
  fast CPU masks of cpu_dropout.py afterwards, so these get them as the base model's dropouts do.

peft is optional: `pip install peft`. Everything here imports it lazily.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.core.errors import first_line
from finetune.models.adapters import (
    ADAPTER_BASE_FILE,
    ADAPTER_FILES,
    PEFT_MISSING,
    RELEASE_ADAPTER_DIR,
    base_fingerprint,
    base_folder,
    base_reference,
    peft_installed,
    quiet_peft_wrap,
)
from finetune.models.loading import ModelFiles, load_weights, set_dropout, unwrap_model

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("finetune")
DEFAULT_DROPOUT = 0.05


def alpha(cfg: TrainConfig) -> float:
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r


def dropout(cfg: TrainConfig) -> float:
    return cfg.lora_dropout if cfg.lora_dropout is not None else DEFAULT_DROPOUT


# -----------------------------------------------------------------------------
# Checks before anything loads


def settings_problems(cfg: TrainConfig) -> list[str]:
    """The LoRA flags' own problems (part of validate_config: nothing is loaded yet)."""
    problems = []
    if cfg.lora_r < 0:
        problems.append(f"--lora-r must be >= 0 (0 = LoRA off), got {cfg.lora_r}. HINT: e.g. --lora-r 8")
    if cfg.lora_r == 0:
        given = [flag for flag, value in (("--lora-alpha", cfg.lora_alpha), ("--lora-dropout", cfg.lora_dropout),
                                          ("--lora-target-modules", cfg.lora_target_modules or None))
                 if value is not None]
        if given and not cfg.resume:  # a resume takes --lora-r from the checkpoint
            problems.append(f"{', '.join(given)} given, but LoRA is off (--lora-r 0). HINT: add --lora-r 8 "
                            f"(or another rank) to train LoRA, or drop {', '.join(given)}")
        return problems
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        problems.append(f"--lora-alpha must be > 0, got {cfg.lora_alpha}. HINT: e.g. --lora-alpha 16, or leave it out "
                        "(2 x --lora-r)")
    if cfg.lora_dropout is not None and not 0 <= cfg.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}. HINT: e.g. --lora-dropout 0.05, "
                        "or leave it out")
    if not peft_installed():
        problems.append(PEFT_MISSING.split(". HINT")[0] + " (HINT: pip install peft)")
    return problems


def block_linear_layers(model) -> dict[str, list[str]]:
    """The linear layers inside the repeated transformer blocks (a module path with a layer index), by
    their short name: {"c_attn": ["transformer.h.0.attn.c_attn", ...], ...}. The token embedding and
    lm_head are outside the blocks, so never in here (adapting a tied weight breaks merging, peft #2777)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and any(p.isdigit() for p in name.split(".")):
            layers.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return layers


def given_target_names(cfg: TrainConfig) -> list[str]:
    """--lora-target-modules split at commas, empty names kept (check_on_meta_model refuses them)."""
    return [name.strip() for item in cfg.lora_target_modules for name in item.split(",")]


def target_names(cfg: TrainConfig, layers: dict[str, list[str]]) -> list[str]:
    """--lora-target-modules (commas allowed), or every linear layer of the blocks."""
    return given_target_names(cfg) or sorted(layers)


def all_conv1d(model, layers: dict[str, list[str]], targets: list[str]) -> bool:
    """Whether every adapted layer is GPT-2's Conv1D (weight stored in x out): peft then needs
    fan_in_fan_out=True. It would switch it on itself, with a warning each run; said here, it is silent."""
    from transformers.pytorch_utils import Conv1D

    return all(isinstance(model.get_submodule(name), Conv1D) for target in targets for name in layers[target])


def in_features(module) -> int:
    """Input width of a Linear, or of GPT-2's Conv1D (weight stored as in x out)."""
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]


def lora_config(cfg: TrainConfig, targets: list[str], fan_in_fan_out: bool):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=alpha(cfg), lora_dropout=dropout(cfg), target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")


def check_on_meta_model(cfg: TrainConfig, model_config) -> tuple[list[str], dict]:
    """Wrap a weightless (meta-device) copy of the model: (problems, parameter counts). Finds wrong target
    names and models peft cannot wrap before any weights load, and counts what LoRA will train."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    layers = block_linear_layers(model)
    kind = model_config.model_type
    if not layers:
        return [f"peft cannot wrap this {kind} model: it has no linear layers in numbered blocks to adapt "
                f"(HINT: train it without --lora-r)"], {}
    if "" in given_target_names(cfg):  # `--lora-target-modules ''` would otherwise mean every layer
        return [f"--lora-target-modules: an empty layer name; the linear layers in the blocks of this {kind} model "
                f"are {', '.join(sorted(layers))} (HINT: name some of those, or drop the flag to adapt all of "
                f"them)"], {}
    targets = target_names(cfg, layers)
    unknown = [name for name in targets if name not in layers]
    if unknown:
        return [f"--lora-target-modules {' '.join(unknown)}: no such linear layer in the blocks of this {kind} "
                f"model; the ones there are {', '.join(sorted(layers))} (HINT: pick from those, or drop the flag "
                f"to adapt all of them)"], {}
    modules = {name: model.get_submodule(name) for names in layers.values() for name in names}
    frozen_linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in modules.values())
    adapter_inputs = sum(in_features(modules[name]) for target in targets for name in layers[target])
    from peft import get_peft_model

    try:
        with quiet_peft_wrap():
            wrapped = get_peft_model(model, lora_config(cfg, targets, all_conv1d(model, layers, targets)))
    except Exception as exc:  # noqa: BLE001 - peft's ValueError/TypeError/...: all mean "cannot wrap this"
        return [f"peft cannot wrap this {kind} model ({type(exc).__name__}: {first_line(exc)}) "
                f"(HINT: train it without --lora-r, or pick other --lora-target-modules)"], {}
    counts = {"trainable": sum(p.numel() for p in wrapped.parameters() if p.requires_grad),
              "total": sum(p.numel() for p in wrapped.parameters()), "frozen_linear": frozen_linear,
              "adapter_inputs": adapter_inputs, "targets": targets, "r": cfg.lora_r}
    return [], counts


LARGE_ADAPTER_FRACTION = 0.5  # adapters bigger than half the base: hardly "low-rank" any more


def size_warning(counts: dict) -> str | None:
    """One line when the adapters train more than LARGE_ADAPTER_FRACTION of the base's parameters (a
    --lora-r near the layers' widths): a full fine-tune would then be about as cheap and not limited."""
    base = counts["total"] - counts["trainable"]
    if counts["trainable"] <= LARGE_ADAPTER_FRACTION * base:
        return None
    return (f"warning: the LoRA adapters train {counts['trainable']:,} parameters, {counts['trainable'] / base:.0%} "
            f"of the base model's {base:,} (--lora-r {counts['r']}); LoRA saves little at that size. HINT: a rank "
            f"like --lora-r 8 or 16, or a full fine-tune without --lora-r")


def resume_problems(state: dict, base_fp: str, model: str) -> list[str]:
    saved = state.get("base_fingerprint")
    if saved is None:
        return ["the checkpoint is not a LoRA run's (it holds a full model, no adapter) (HINT: resume without "
                "--lora-* flags, or start a new LoRA run)"]
    if saved != base_fp:
        return [f"the base model {model} differs from the one the checkpoint's adapter was trained on (fingerprint "
                f"{base_fp} vs {saved}; its weights or config changed) (HINT: restore the original base at "
                f"{model}, or start a new run)"]
    return []


# -----------------------------------------------------------------------------
# The converter and the model files


def to_lora(model, cfg: TrainConfig, tokenizer, source: str, precision: str):
    """The loaded base wrapped with the adapters (their weights read from `source` when it is a LoRA
    checkpoint), the frozen linear weights in the autocast dtype; and how to write it."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    layers = block_linear_layers(model)
    targets = target_names(cfg, layers)
    config = lora_config(cfg, targets, all_conv1d(model, layers, targets))
    with quiet_peft_wrap():
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_reference(cfg.model)
    if (Path(source) / ADAPTER_FILES[1]).is_file():
        device = next(peft_model.parameters()).device
        set_peft_model_state_dict(peft_model, load_peft_weights(source, device=str(device)))
    if precision in ("bf16", "fp16"):
        hold_frozen_linears_in(peft_model, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
        own_memory(peft_model)  # (in fp32 the copy would only add a peak: the map then holds what is used)
    if cfg.gradient_checkpointing:  # the frozen embedding's output needs a grad for checkpointed blocks
        peft_model.enable_input_require_grads()
    return peft_model, LoraModelFiles(tokenizer, config, cfg.model, cfg.dropout)


def hold_frozen_linears_in(model, dtype) -> None:
    """Frozen block linear weights (and biases) in `dtype`: autocast casts them so for each matmul anyway."""
    for names in block_linear_layers(model).values():
        for module in map(model.get_submodule, names):
            if not module.weight.requires_grad:
                module.to(dtype)


def own_memory(model) -> None:
    """Copy every tensor still backed by the weights file's memory map: while one tensor points into the
    map, every page of the file read so far (all of the fp32 base, after the cast above) stays resident."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


def save_adapter(peft_model, folder: Path, base_fp: str) -> None:
    # save_embedding_layers=False: "auto" asks the hub whether the base's vocabulary changed.
    peft_model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model-card template, empty of content
    base = peft_model.peft_config["default"].base_model_name_or_path
    (folder / ADAPTER_BASE_FILE).write_text(json.dumps({"base_model_name_or_path": base, "base_fingerprint": base_fp},
                                                       indent=2) + "\n", encoding="utf-8")


class LoraModelFiles(ModelFiles):
    """Checkpoints: adapter + tokenizer. Releases: the merged model + tokenizer, and the adapter in adapter/."""

    def __init__(self, tokenizer, config, base: str, dropout_override: float | None):
        super().__init__(tokenizer)
        self.config, self.base, self.dropout_override = config, base, dropout_override
        self.base_fingerprint = base_fingerprint(base)  # as the training state records it, at the start
        self.widening_said = False

    def write_checkpoint(self, model, folder: Path) -> None:
        save_adapter(unwrap_model(model), folder, self.base_fingerprint)
        self.tokenizer.save_pretrained(folder)

    def write_release(self, model, folder: Path) -> None:
        peft_model = unwrap_model(model)
        widened = write_merged_files(self.base, peft_model, folder, self.dropout_override, self.tokenizer)
        if widened is None:
            merged = merge_into_base(self.base, peft_model, self.config, self.dropout_override)
            merged.generation_config.pad_token_id = self.tokenizer.pad_token_id
            merged.save_pretrained(folder, safe_serialization=True)
        elif widened and not self.widening_said:  # once a run, at its first release
            log.info("the base %s stores its weights in %s: the merged models (best/, the final model) are written in "
                     "float32, the base's weights plus the adapter's delta unrounded (%.1f MB instead of %.1f); "
                     "adapter/ beside them holds the adapter alone", self.base, widened,
                     (folder / "model.safetensors").stat().st_size / 1e6, base_weights_bytes(self.base) / 1e6)
            self.widening_said = True
        self.tokenizer.save_pretrained(folder)
        (folder / RELEASE_ADAPTER_DIR).mkdir()
        self.write_checkpoint(peft_model, folder / RELEASE_ADAPTER_DIR)


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                      "I32": "int32", "U8": "uint8", "BOOL": "bool"}
# A base stored in 16 bits is merged and written in fp32: an adapter's delta is often below half a bf16 step
# of the weight it is added to, so a merged model rounded back to bf16 would lose part of what was trained.
WIDENED = {"BF16": "F32", "F16": "F32"}
ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def safetensors_header(f) -> tuple[int, dict]:
    header_size = int.from_bytes(f.read(8), "little")
    return header_size, json.loads(f.read(header_size))


def base_weights_bytes(base: str) -> int:
    source = base_folder(base)
    return (source / "model.safetensors").stat().st_size if source is not None else 0


def write_merged_files(base: str, peft_model, folder: Path, dropout_override: float | None, tokenizer) -> str | None:
    """The base's model.safetensors with each adapter's delta (peft's get_delta_weight, which
    merge_and_unload adds) added to its weight, streamed one tensor at a time with plain reads and writes:
    the same tensors and shapes, and no second copy of the model in memory (a memory map would keep every
    page read resident; peft's merge, the fallback, reloads the whole base). The dtypes are the base's, but
    a bf16/fp16 base is written in fp32 (WIDENED): its weights exactly, plus the deltas in fp32. Returns the
    dtype widened from ("bfloat16"), "" when none was, or None, with nothing written, for a base this does
    not handle (not one local model.safetensors, or tensor names that do not match the adapted layers)."""
    import math

    import torch
    from transformers import AutoConfig, GenerationConfig

    from finetune.models.loading import set_config_dropout

    source = base_folder(base)
    if source is None or not (source / "model.safetensors").is_file():
        return None
    prefix = "base_model.model."
    layers = {name[len(prefix):] + ".weight": module for name, module in peft_model.named_modules()
              if hasattr(module, "get_delta_weight") and name.startswith(prefix)}
    with open(source / "model.safetensors", "rb") as f:
        _, header = safetensors_header(f)
    # The hub's gpt2 file names its tensors without the "transformer." prefix: match on the name's end.
    owner = {key: next((n for n in layers if n == key or n.endswith("." + key)), None) for key in header}
    if {n for n in owner.values() if n} != set(layers):
        return None
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    written, offset = {}, 0  # the header written: the same names in the same order, offsets for the new dtypes
    for key in tensors:
        dtype = WIDENED.get(header[key]["dtype"], header[key]["dtype"])
        size = math.prod(header[key]["shape"]) * ITEM_BYTES[dtype]
        written[key] = {"dtype": dtype, "shape": header[key]["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    widened = sorted({SAFETENSORS_DTYPES[header[k]["dtype"]] for k in tensors if header[k]["dtype"] in WIDENED})
    out_header = {"__metadata__": {**header.get("__metadata__", {}), "format": "pt"},
                  **{k: written[k] for k in header if k != "__metadata__"}}
    header_bytes = json.dumps(out_header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(source / "model.safetensors", "rb") as f, open(folder / "model.safetensors", "wb") as out:
        header_size, _ = safetensors_header(f)
        out.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        for key in tensors:
            info, start_end = header[key], header[key]["data_offsets"]
            f.seek(8 + header_size + start_end[0])
            data = f.read(start_end[1] - start_end[0])
            if owner[key] is not None or info["dtype"] in WIDENED:
                dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
                to = getattr(torch, SAFETENSORS_DTYPES[written[key]["dtype"]])
                weight = torch.frombuffer(bytearray(data), dtype=dtype).reshape(info["shape"]).to(to)  # exact
                if owner[key] is not None:
                    with torch.no_grad():
                        weight += layers[owner[key]].get_delta_weight("default").to("cpu", to)
                data = weight.contiguous().view(torch.uint8).numpy().tobytes()
            start, end = written[key]["data_offsets"]
            assert len(data) == end - start
            out.write(data)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    if dropout_override is not None:
        set_config_dropout(config, dropout_override)  # as a full fine-tune saves it: what was trained
    if widened:  # from_pretrained's dtype="auto" would read the fp32 weights back into the base's dtype
        config.dtype = torch.float32
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json in the base
        generation = GenerationConfig.from_model_config(config)
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)
    return ", ".join(widened)


def merge_into_base(base: str, peft_model, config, dropout_override: float | None):
    """The adapter of `peft_model` merged into a fresh fp32 copy of the base (on the CPU): exact, whatever
    dtype training held the frozen weights in. The global RNG is left as it was (peft draws the new
    adapters' initial values), so writing best/ mid-run does not change the training."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(peft_model).items()}
    with torch.random.fork_rng(devices=[]), quiet_peft_wrap():
        fresh = get_peft_model(load_weights(base, torch.float32), config)
    set_peft_model_state_dict(fresh, adapter)
    merged = fresh.merge_and_unload()
    if dropout_override is not None:
        set_dropout(merged, dropout_override)  # as a full fine-tune saves it: the config says what was trained
    return merged
