"""Export a fine-tuned model to GGUF, the file llama.cpp, Ollama and LM Studio run.

    python export.py --model out --to gguf                    # -> out/export/model-f16.gguf + model-f16.Modelfile
    python export.py --model out/best --to gguf --outtype q8_0  # -> out/export/best-q8_0.gguf + best-q8_0.Modelfile
    python export.py --model out/adapter --to gguf            # LoRA: the adapter merged into its base
    python export.py --model out --output gguf/book-q8_0.gguf --outtype q8_0
    ollama create book -f out/export/model-f16.Modelfile

The work is in finetune/export/ (see its docstring); this is the command line.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core import cli
from finetune.core.console import setup_logging
from finetune.core.errors import EXIT_SIGNAL, UserError, exit_on_user_error
from finetune.core.flags import shared
from finetune.core.fsio import TMP_PREFIX, Terminated, atomic_file, remove_stale_temporaries, sigterm_raises
from finetune.export import require_gguf
from finetune.export.gguf_writer import DEFAULT_OUTTYPE, OUTTYPES, check_architecture, write_gguf
from finetune.export.modelfile import modelfile, written_by_export
from finetune.export.vocab import read_vocab
from finetune.formats.checkpoints import checkpoint_step
from finetune.models.adapters import RELEASE_ADAPTER_DIR
from finetune.models.folder import adapter_base, check_model_folder, is_adapter_folder, load_adapter_model
from finetune.models.loading import load_config, load_tokenizer, load_weights, model_context_length
from finetune.train.rundir import written_by_us


@dataclass
class ExportSettings:
    """export"""

    model: str | None = shared("model", None)
    """a saved model folder: the training output, best/ or checkpoint-N/, or a LoRA adapter folder (OUT/adapter,
    a LoRA checkpoint), merged into its base on the way (required)"""
    to: str = field(default="gguf", metadata={"choices": ("gguf",)})
    """the format (default: gguf)"""
    outtype: str = field(default=DEFAULT_OUTTYPE, metadata={"choices": OUTTYPES})
    """type of the weight matrices (norms and biases stay f32)"""
    output: str | None = shared("output", None)
    """the .gguf file to write (default: RUN/export/NAME-OUTTYPE.gguf for a training run's model, NAME being
    model, best, adapter or checkpoint-N; MODEL/model-OUTTYPE.gguf for any other folder); its Modelfile goes
    next to it, as FILE.Modelfile"""
    overwrite: bool = shared("overwrite", False)
    """replace an existing output file (and a Modelfile not written by export.py)"""


def build_arg_parser(suppress_defaults: bool = False):
    return cli.build_arg_parser([ExportSettings], "Export a saved model (or a LoRA adapter, merged into its base) "
                                "to GGUF.", suppress_defaults)


def parse_args(argv: list[str] | None) -> ExportSettings:
    args = cli.parse_config(ExportSettings, build_arg_parser, argv)[0]
    if not args.model:
        raise UserError("--model is required: the saved model folder to export. HINT: e.g. --model out (the "
                        "training output), --model out/best or --model out/adapter")
    return args


EXPORT_FOLDER = "export"  # RUN/export/: where the exports of a training run's models go by default


def default_output(folder: Path, outtype: str) -> Path:
    """Where an export goes without --output. A model of a training run (the run's folder, its best/,
    adapter/ or a checkpoint-N/, or best/adapter/) goes to RUN/export/NAME-OUTTYPE.gguf: the trainer replaces
    best/ and adapter/ whole and prunes old checkpoints, so an export inside them would be lost (and the run's
    own folder is no place to mix exports of several of its models). Any other model folder: MODEL/model-OUTTYPE.gguf."""
    resolved = folder.resolve()
    for run in (resolved, resolved.parent, resolved.parent.parent):
        inside = resolved.relative_to(run).parts
        if written_by_us(run) and all(part in ("best", RELEASE_ADAPTER_DIR) or checkpoint_step(Path(part)) is not None
                                      for part in inside):
            return run / EXPORT_FOLDER / f"{'-'.join(inside) or 'model'}-{outtype}.gguf"
    return folder / f"model-{outtype}.gguf"


def modelfile_path(gguf_path: Path) -> Path:
    """One Modelfile per GGUF file, named after it (model-f16.gguf -> model-f16.Modelfile): exporting another
    --outtype next to it never repoints an existing Modelfile at the new file."""
    return gguf_path.with_suffix(".Modelfile")


def output_paths(args, folder: Path) -> tuple[Path, Path]:
    """(the .gguf file, its Modelfile), refused before anything loads when they cannot be written."""
    out = Path(args.output).expanduser() if args.output else default_output(folder, args.outtype)
    if any(ord(c) < 32 or c == "\x7f" for c in out.name):
        raise UserError(f"--output {out.name!r} has a control character (a newline, say) in its name, which would "
                        f"break the Modelfile's FROM line. HINT: pick a plain file name such as model.gguf")
    if out.is_dir():
        raise UserError(f"--output {out} is a folder. HINT: pass a file name such as {out / 'model.gguf'}")
    if out.suffix != ".gguf":
        raise UserError(f"--output {out} does not end in .gguf. HINT: name it like {out.with_suffix('.gguf').name}")
    if args.output and not out.parent.is_dir():
        raise UserError(f"the folder of --output {out} does not exist. HINT: create {out.parent} first")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists. HINT: pass --overwrite to replace it, or --output another file")
    model_file = modelfile_path(out)
    if model_file.exists() and not written_by_export(model_file) and not args.overwrite:
        raise UserError(f"{model_file} exists and was not written by export.py. HINT: pass --overwrite to replace "
                        f"it, or --output a file of another name")
    check_writable(out.parent)
    return out, model_file


def check_writable(folder: Path) -> None:
    """The folder the files go to (or, when it is still to be created, the nearest one that exists) takes a new
    file: tried with a probe file, which also catches a read-only filesystem for root (os.access does not
    see every case), so that a read-only place is one line before the model loads, not an error after it."""
    existing = next(p for p in (folder, *folder.parents) if p.is_dir())
    probe = existing / f"{TMP_PREFIX}probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the export into {folder} ({exc.strerror}: {existing}). HINT: pass "
                        f"--output FILE.gguf in a folder you can write to") from None


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
    plan = modelfile(out, model_file, str(folder), tokenizer, vocab.chat_template, model_context_length(config))
    model = load_model(folder, adapter)
    out.parent.mkdir(exist_ok=True)  # RUN/export/ (the folder of an --output exists: checked above)
    # What a killed export left here, whichever file it was writing (a later export of that very file
    # would remove it too, but another --outtype never would)
    remove_stale_temporaries(out.parent, r".+\.gguf|.+\.Modelfile")
    try:
        with sigterm_raises():  # a temporary .gguf is removed on SIGTERM, as on Ctrl-C or a full disk
            summary = write_gguf(out, model, model.config, vocab, args.outtype, name=folder.resolve().name)
            with atomic_file(model_file, f"the Modelfile {model_file}") as f:
                f.write(plan.text)
    except (KeyboardInterrupt, Terminated) as stop:
        signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        print(f"error: stopped by {'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'} while exporting to {out}; "
              f"the partial file was removed. HINT: run the same command again", file=sys.stderr, flush=True)
        return EXIT_SIGNAL[signum]
    if plan.warning:
        log.warning(plan.warning)
    merged = f", adapter merged into {adapter_base(folder)}" if adapter else ""
    log.info(f"wrote {out} ({summary.architecture}, {args.outtype}, {summary.n_tensors} tensors, "
          f"{summary.n_bytes / 2**20:.1f} MiB{merged}) and {model_file}; run it with "
          f"`llama-cli -m {out}` or `ollama create NAME -f {model_file}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
