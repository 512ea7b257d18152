"""The flags several scripts take, each defined once: its meaning (the --help text, unless a script words it for
its own case with a docstring under the field), its choices and how argparse reads it.

A script's settings dataclass declares such a flag as `seed: int = shared("seed", 1337)`: the flag then means
the same in every script that takes it; what a script may choose is the default (and the metavar, and whether
the flag repeats). tests/test_cli.py checks that every flag two scripts take is declared this way, with the
same type and choices everywhere.
"""
from __future__ import annotations

import dataclasses

# The values --device and --precision take (runtime/device.py resolves them: auto -> what this machine has)
DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# name -> (meaning, argparse options every script uses)
SHARED_FLAGS: dict[str, tuple[str, dict]] = {
    # model
    "model": ("the model: a local folder (a training output, its best/ or checkpoint-N/, a LoRA adapter folder) "
              "or a Hugging Face Hub name", {}),
    # runtime
    "device": ("auto (CUDA, else Apple MPS, else CPU) | cuda | mps | cpu", {"choices": DEVICES}),
    "precision": ("the precision the model computes in: auto (bf16 where the GPU or CPU supports it natively, fp16 "
                  "on older GPUs, else fp32) | fp32 | bf16 | fp16", {"choices": PRECISIONS}),
    "seed": ("seeds every random choice the script makes: the same seed and settings give the same result", {}),
    "num_workers": ("worker processes or threads that read and tokenize the data in parallel", {}),
    "nproc": ("processes this command starts on this machine, one per device", {}),
    # sizes
    "block_size": ("tokens per training block (sequence)", {"metavar": "N"}),
    "batch_size": ("sequences per forward pass (micro-batch)", {"metavar": "N"}),
    "grad_accum": ("micro-batches accumulated into one optimizer step", {"metavar": "N"}),
    # input
    "data_dir": ("a folder prepare_data.py wrote: train.bin, val.bin and meta.json", {}),
    "input": ("text files, folders or record files (JSONL, JSON, CSV/TSV, Parquet), read as prepare_data.py reads "
              "them; repeatable", {"nargs": "+", "action": "extend", "metavar": "PATH"}),
    "text_field": ("the field (JSON) or column (CSV/TSV/Parquet) that holds each record's text", {"metavar": "NAME"}),
    "encoding": ("text encoding of the input files", {}),
    "prompt": ("a prompt; repeat for several", {"action": "append", "metavar": "TEXT"}),
    "prompt_file": ("a UTF-8 file with one prompt per line", {"metavar": "FILE"}),
    "max_new_tokens": ("most tokens generated per sample", {"metavar": "N"}),
    # output
    "output_dir": ("the folder the outputs go to", {"metavar": "DIR"}),
    "output": ("where the result is written", {}),
    "overwrite": ("replace what an earlier run wrote there", {}),
}

# What a script may set for itself on a shared flag; the rest (choices, type) is the flag's, everywhere.
SCRIPT_OPTIONS = {"metavar", "action", "nargs", "const", "flag"}


def shared(name: str, default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **options):
    """The dataclass field of the shared flag `name`, with this script's default (and metavar / repetition)."""
    meaning, common = SHARED_FLAGS[name]
    unknown = set(options) - SCRIPT_OPTIONS
    assert not unknown, f"--{name}: a script may not change {unknown} of a shared flag"
    metadata = {**common, **options, "shared": name, "meaning": meaning}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)
