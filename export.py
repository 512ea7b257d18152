"""Export a fine-tuned model to GGUF, the file llama.cpp, Ollama and LM Studio run.

    python export.py --model out --to gguf                    # -> out/model-f16.gguf + out/Modelfile
    python export.py --model out/best --to gguf --outtype q8_0 --output gguf/book-q8_0.gguf
    python export.py --model out/adapter --to gguf            # LoRA: the adapter merged into its base
    ollama create book -f out/Modelfile

The work is in finetune/export/ (see its docstring); this is the command line.
"""
from __future__ import annotations

import sys
from pathlib import Path

from finetune.console import setup_logging
from finetune.errors import ArgumentParser, UserError, exit_on_user_error
from finetune.export import require_gguf
from finetune.export.gguf_writer import DEFAULT_OUTTYPE, OUTTYPES, check_architecture, write_gguf
from finetune.export.modelfile import modelfile, written_by_export
from finetune.export.vocab import read_vocab
from finetune.fsio import atomic_file
from finetune.modelfolder import adapter_base, check_model_folder, is_adapter_folder, load_adapter_model
from finetune.models import load_config, load_tokenizer, load_weights


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(description="Export a saved model (or a LoRA adapter, merged into its base) to GGUF.")
    parser.add_argument("--model", required=True,
                        help="a saved model folder: the training output, best/ or checkpoint-N/, or a LoRA adapter "
                             "folder (OUT/adapter, a LoRA checkpoint), merged into its base on the way")
    parser.add_argument("--to", default="gguf", choices=["gguf"], help="the format (default: gguf)")
    parser.add_argument("--outtype", default=DEFAULT_OUTTYPE, choices=OUTTYPES,
                        help="type of the weight matrices (norms and biases stay f32); default: f16")
    parser.add_argument("--output", default=None,
                        help="the .gguf file to write (default: MODEL/model-OUTTYPE.gguf); the Modelfile goes "
                             "next to it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file (and a Modelfile not written by export.py)")
    return parser.parse_args(argv)


def output_paths(args, folder: Path) -> tuple[Path, Path]:
    """(the .gguf file, the Modelfile next to it), refused before anything loads when they cannot be written."""
    out = Path(args.output).expanduser() if args.output else folder / f"model-{args.outtype}.gguf"
    if out.is_dir():
        raise UserError(f"--output {out} is a folder. HINT: pass a file name such as {out / 'model.gguf'}")
    if out.suffix != ".gguf":
        raise UserError(f"--output {out} does not end in .gguf. HINT: name it like {out.with_suffix('.gguf').name}")
    if not out.parent.is_dir():
        raise UserError(f"the folder of --output {out} does not exist. HINT: create {out.parent} first")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists. HINT: pass --overwrite to replace it, or --output another file")
    model_file = out.parent / "Modelfile"
    if model_file.exists() and not written_by_export(model_file) and not args.overwrite:
        raise UserError(f"{model_file} exists and was not written by export.py. HINT: pass --overwrite to replace "
                        f"it, or --output a file in another folder")
    return out, model_file


def load_model(folder: Path, adapter: bool):
    """fp32 weights (the export converts from there); an adapter merged into a fresh copy of its base."""
    import torch

    return load_adapter_model(folder, torch.float32) if adapter else load_weights(str(folder), torch.float32)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_gguf()
    log = setup_logging("export")
    folder = Path(args.model).expanduser()
    if not folder.exists():
        raise UserError(f"--model {folder} does not exist. HINT: pass a local model folder (export.py does not "
                        f"download; the training script saves OUT, OUT/best and OUT/checkpoint-N)")
    check_model_folder(folder)
    adapter = is_adapter_folder(folder)
    out, model_file = output_paths(args, folder)
    config = load_config(adapter_base(folder) if adapter else str(folder))
    check_architecture(config)
    tokenizer = load_tokenizer(str(folder))
    vocab = read_vocab(tokenizer, config.vocab_size)
    plan = modelfile(out, str(folder), tokenizer, vocab.chat_template)
    model = load_model(folder, adapter)
    summary = write_gguf(out, model, model.config, vocab, args.outtype, name=folder.resolve().name)
    with atomic_file(model_file, f"the Modelfile {model_file}") as f:
        f.write(plan.text)
    if plan.warning:
        log.warning(plan.warning)
    merged = f", adapter merged into {adapter_base(folder)}" if adapter else ""
    log.info(f"wrote {out} ({summary.architecture}, {args.outtype}, {summary.n_tensors} tensors, "
          f"{summary.n_bytes / 2**20:.1f} MiB{merged}) and {model_file}; run it with "
          f"`llama-cli -m {out}` or `ollama create NAME -f {model_file}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
