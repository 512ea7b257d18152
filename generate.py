#!/usr/bin/env python
"""Generate text with a fine-tuned (or any) GPT-2-style causal language model.

    python generate.py --model out/best --prompt "Once upon a time"
    python generate.py --model out --prompt-file prompts.txt --num-samples 3 --output samples.jsonl
    echo "The old captain" | python generate.py --prompt - --seed 1

Decoding. Sampling by default (--temperature 0.8, no top-k / top-p filter). --greedy picks the
most likely token at every step instead; it ignores the sampling flags. A temperature of 0 or
below is an error when sampling (it does not silently mean greedy): ask for --greedy.

Seeds. The RNG is re-seeded with --seed before each prompt, so a prompt's samples depend only on
the seed, the prompt and the settings, not on which other prompts share the run. Without --seed a
random one is drawn and printed, so any run can be repeated. Samples are generated 64 at a time
(SAMPLES_PER_BATCH), each batch seeded from --seed and its index, and printed and written as it is
done: up to 64 samples are exactly those of one generate call seeded with --seed, as before.

Precision. --precision bf16/fp16 loads the weights in that dtype (half the memory, faster on a
GPU); no autocast is used. auto means bf16 on GPUs that support it and on CPUs with native bf16
instructions, fp16 on older GPUs, else fp32.

Output. Samples go to stdout, each under a `--- sample i/n (prompt: "...") ---` header; log lines
go to stderr. With one prompt and one sample the text is streamed as it is generated.

The sampling code itself lives in finetune/infer/sampling.py, shared with the training-time samples.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core import cli
from finetune.core.console import setup_logging
from finetune.core.errors import EXIT_SIGNAL, UserError, exit_on_user_error, raise_if_problems
from finetune.core.flags import shared
from finetune.core.fsio import Terminated, atomic_file, sigterm_raises
from finetune.infer.sampling import chat_prompt_ids, generate_samples, generation_kwargs
from finetune.models.folder import DEFAULT_MODEL, adapter_base, is_adapter_folder, load_adapter_model, resolve_model
from finetune.models.loading import (
    TOKENIZER_FILES,
    load_config,
    load_tokenizer,
    load_weights,
    model_context_length,
)
from finetune.runtime.device import get_device, resolve_precision
from finetune.train.rundir import RUN_ARTIFACTS, written_by_us

log = logging.getLogger("generate")

DEFAULT_TEMPERATURE = 0.8
HEADER_PROMPT_CHARS = 40

# -----------------------------------------------------------------------------
# Command line


@dataclass
class Model:
    """model"""

    model: str = shared("model", DEFAULT_MODEL, metavar="DIR")
    """a saved model folder: the training output, or a checkpoint-*/ or best/ folder inside it; a LoRA adapter
    folder (OUT/adapter, a LoRA checkpoint: its base is loaded from where the adapter says); or a Hugging Face
    Hub name (default: out)"""


@dataclass
class Runtime:
    """runtime"""

    device: str = shared("device", "auto")
    precision: str = shared("precision", "auto")
    """dtype the weights are loaded in (default: auto: bf16 where the GPU/CPU supports it natively, fp16 on older
    GPUs, else fp32)"""
    seed: int | None = shared("seed", None)
    """RNG seed; same seed and settings give the same text (default: a random seed, printed so the run can be
    repeated)"""


@dataclass
class Prompts:
    """prompts (at least one)"""

    prompt: list[str] = shared("prompt", default_factory=list)
    """a prompt; repeat for several; '-' reads one prompt from stdin"""
    prompt_file: str | None = shared("prompt_file", None)
    """a UTF-8 file with one prompt per line; blank lines are skipped"""
    chat: bool = False
    """each prompt is a user turn, rendered with the model's saved chat template (the one it was trained with);
    only the reply is printed, ending at the end-of-turn token. With no --prompt and a terminal on stdin: a
    conversation (/reset starts over, /system TEXT sets the system turn, Ctrl-C stops a reply, Ctrl-D ends it)"""
    system: str | None = field(default=None, metadata={"metavar": "TEXT"})
    """with --chat: a system turn before the user's, e.g. the system prompt the model was trained with
    (default: none)"""


@dataclass
class Decoding:
    """decoding"""

    max_new_tokens: int = shared("max_new_tokens", 200)
    """most tokens generated per sample; fewer when the model ends the text (default: 200)"""
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={"metavar": "T"})
    """sampling temperature, above 0; lower is more conservative (default: 0.8)"""
    top_k: int | None = field(default=None, metadata={"metavar": "K"})
    """sample only from the K most likely tokens (default: off; 0 also means off)"""
    top_p: float | None = field(default=None, metadata={"metavar": "P"})
    """nucleus sampling: only the most likely tokens that together have probability P, in (0, 1] (default: off)"""
    repetition_penalty: float | None = field(default=None, metadata={"metavar": "R"})
    """above 1 discourages tokens already in the text, e.g. 1.2 (default: off)"""
    greedy: bool = False
    """always take the most likely token: deterministic, one sample per prompt; --temperature/--top-k/--top-p
    are ignored"""
    num_samples: int = field(default=1, metadata={"metavar": "N"})
    """samples per prompt (default: 1)"""


@dataclass
class Output:
    """output"""

    output: str | None = shared("output", None, metavar="FILE")
    """also write each sample as a JSON line: prompt, prompt_index, sample_index, text, completion, new_tokens,
    finish_reason, settings (the file is overwritten)"""


GROUPS = (Model, Runtime, Prompts, Decoding, Output)


@dataclass
class GenerateSettings(Output, Decoding, Prompts, Runtime, Model):
    """Every setting of generate.py, as one flat object (the groups above hold the fields and their help)."""


def build_arg_parser(suppress_defaults: bool = False):
    return cli.build_arg_parser(GROUPS, "Generate text with a fine-tuned GPT-2-style model.", suppress_defaults)


def parse_args(argv: list[str] | None) -> GenerateSettings:
    return cli.parse_config(GenerateSettings, build_arg_parser, argv)[0]


# -----------------------------------------------------------------------------
# Checking the input, before anything heavy is imported or loaded


def check_settings(args: GenerateSettings) -> None:
    """Every problem with the flags, in one error."""
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}. HINT: try 200")
    if args.num_samples < 1:
        problems.append(f"--num-samples must be at least 1, got {args.num_samples}. HINT: try 1 or 3")
    if args.greedy and args.num_samples > 1:
        problems.append(f"--greedy gives the same text every time, so --num-samples {args.num_samples} would "
                        "repeat it. HINT: drop --greedy to sample, or drop --num-samples")
    if not args.greedy and not (math.isfinite(args.temperature) and args.temperature > 0):
        problems.append(f"--temperature must be above 0 when sampling, got {args.temperature}. "
                        "HINT: use --greedy for deterministic most-likely-token decoding, or a temperature such as 0.8")
    if args.top_k is not None and args.top_k < 0:
        problems.append(f"--top-k must be 0 (off) or more, got {args.top_k}. HINT: try 50, or leave it out")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}. HINT: try 0.9, or leave it out")
    if args.repetition_penalty is not None and not (math.isfinite(args.repetition_penalty)
                                                    and args.repetition_penalty > 0):
        problems.append(f"--repetition-penalty must be above 0, got {args.repetition_penalty}. "
                        "HINT: 1.0 is off; try 1.1 to 1.3 against loops")
    if args.system is not None and not args.chat:
        problems.append("--system gives the system turn of a --chat conversation, but --chat is not on. "
                        "HINT: add --chat (the model's chat template renders it), or drop --system")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        problems.append(f"--seed must be in [0, 2**63), got {args.seed}. HINT: try --seed 1")
    if args.output is not None:
        out = Path(args.output)
        if out.is_dir():
            problems.append(f"--output {out} is a folder. HINT: pass a file name such as samples.jsonl")
        elif not out.parent.is_dir():
            problems.append(f"the folder of --output {out} does not exist. HINT: create {out.parent} first")
    raise_if_problems(problems)


def read_prompts(args: GenerateSettings) -> list[str]:
    """--prompt values in order ('-' is stdin), then the lines of --prompt-file."""
    prompts = prompt_texts(args.prompt)
    if args.prompt_file is not None:
        prompts.extend(read_prompt_file(Path(args.prompt_file)))
    if not prompts and args.chat and sys.stdin.isatty():
        return []  # a conversation in the terminal
    if not prompts and args.chat:
        raise UserError("--chat with no --prompt holds a conversation in a terminal, but stdin is not one. "
                        "HINT: pass --prompt TEXT (or --prompt - to read one turn from stdin)")
    if not prompts:
        raise UserError("no prompt given. HINT: pass --prompt TEXT, --prompt-file FILE, or --prompt - for stdin")
    for i, text in enumerate(prompts, 1):
        if not text.strip():
            raise UserError(f"prompt {i} is empty. HINT: give the model some text to continue")
    return prompts


def prompt_texts(prompts: list[str]) -> list[str]:
    """The --prompt values in order, '-' read from stdin (evaluate.py's --prompt too: one meaning)."""
    if prompts.count("-") > 1:
        raise UserError("--prompt - was given twice, but stdin can be read only once. HINT: pass it once")
    return [read_stdin() if text == "-" else text for text in prompts]


def read_stdin() -> str:
    """stdin as UTF-8, whatever the locale: under C or C.UTF-8, Python decodes stdin with surrogateescape, so
    invalid bytes would come through as lone surrogates (and fail later, in the tokenizer) instead of here."""
    try:
        stream = getattr(sys.stdin, "buffer", None)
        text = stream.read().decode("utf-8") if stream is not None else sys.stdin.read()
        text.encode("utf-8")  # a text stream that let surrogates through
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise UserError("stdin (--prompt -) is not valid UTF-8 text. HINT: convert it to UTF-8") from None
    # `echo text |` adds a newline the user did not mean as part of the prompt
    return text.rstrip("\r\n")


def read_prompt_file(path: Path) -> list[str]:
    # is_file() stats without opening, so a FIFO or /dev/zero is refused here and never read (a read would block
    # or never end).
    if path.is_dir():
        raise UserError(f"--prompt-file {path} is a folder, not a file. HINT: name a text file with one prompt "
                        f"per line")
    if path.exists() and not path.is_file():
        raise UserError(f"--prompt-file {path} is not a regular file (a device, FIFO or socket). HINT: save the "
                        f"prompts to a text file, one per line, or pass --prompt - to read stdin")
    if not path.is_file():
        raise UserError(f"--prompt-file {path} does not exist. HINT: check the path")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {path} is not UTF-8 text. HINT: save it as UTF-8") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {path} has no prompts, only blank lines. HINT: put one prompt per line")
    return prompts


# -----------------------------------------------------------------------------
# Loading the model










def check_prompt_lengths(prompts: list, tokenizer, n_ctx: int | None, max_new_tokens: int) -> None:
    """Positions past the context have no embedding: fail now rather than crash mid-generation. A prompt is
    text, or token ids (a rendered chat turn)."""
    if n_ctx is None:
        return
    for i, prompt in enumerate(prompts, 1):
        n_prompt = len(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else len(prompt)
        if n_prompt + max_new_tokens <= n_ctx:
            continue
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if n_prompt >= n_ctx:
            hint = f"HINT: shorten {where} to well under {n_ctx} tokens"
        else:
            hint = f"HINT: lower --max-new-tokens to {n_ctx - n_prompt} or less, or shorten {where}"
        raise UserError(f"{where} ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} is more than "
                        f"the model's context of {n_ctx} tokens. {hint}")


# -----------------------------------------------------------------------------
# Generation (shared by the command line and the training script)












# -----------------------------------------------------------------------------
# Samples during training








# -----------------------------------------------------------------------------
# Output


def sample_header(sample_i: int, num_samples: int, prompt_i: int, num_prompts: int, prompt: str) -> str:
    short = prompt if len(prompt) <= HEADER_PROMPT_CHARS else prompt[:HEADER_PROMPT_CHARS] + "…"
    which = f"prompt {prompt_i + 1}/{num_prompts}: " if num_prompts > 1 else "prompt: "
    return f"--- sample {sample_i + 1}/{num_samples} ({which}{json.dumps(short, ensure_ascii=False)}) ---"


def settings_record(args: GenerateSettings, seed: int, device, precision: str) -> dict:
    sampling = {} if args.greedy else dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return dict(model=args.model, greedy=args.greedy, **sampling, repetition_penalty=args.repetition_penalty,
                max_new_tokens=args.max_new_tokens, seed=seed, device=str(device), precision=precision)


# -----------------------------------------------------------------------------
# main


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("generate")
    # cheap checks first: a typo should not cost a model load
    check_settings(args)
    source, is_local = resolve_model(args.model)
    check_output(args.output, folders_to_protect(source, is_local))
    prompts = read_prompts(args)
    sampling_flags = (args.temperature != DEFAULT_TEMPERATURE, args.top_k is not None, args.top_p is not None)
    if args.greedy and any(sampling_flags):
        log.info("--greedy ignores --temperature, --top-k and --top-p")

    import torch

    device = get_device(args.device)
    precision = resolve_precision(args.precision, device)
    adapter = is_local and is_adapter_folder(Path(source))
    base = adapter_base(Path(source)) if adapter else source
    has_tokenizer = not adapter or any((Path(source) / f).is_file() for f in TOKENIZER_FILES)
    config, tokenizer = load_config(base), load_tokenizer(source if has_tokenizer else base)
    if args.chat and not tokenizer.chat_template:
        raise UserError(f"--chat renders prompts with the model's chat template, but {source} has none. HINT: "
                        "fine-tune on chat data (prepare_data.py on conversations; training saves the template "
                        "with the model), or drop --chat to continue plain text")
    system = system_turn(args.system)
    inputs = [chat_prompt_ids(tokenizer, [*system, {"role": "user", "content": p}], source) for p in prompts] \
        if args.chat else prompts
    check_prompt_lengths(inputs, tokenizer, model_context_length(config), args.max_new_tokens)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if args.seed is None and not args.greedy:  # greedy decoding draws nothing: the same text every time
        log.info(f"seed {seed} (pass --seed {seed} to get the same samples again)")
    log.info(f"loading {source}{f' onto its base {base}' if adapter else ''} on {device} ({precision})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = load_adapter_model(Path(source), dtype) if adapter else load_weights(source, dtype)
    model = model.to(device).eval()

    gen_kwargs = generation_kwargs(model, tokenizer, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   repetition_penalty=args.repetition_penalty)
    settings = settings_record(args, seed, device, precision)
    # Ctrl-C and SIGTERM (`timeout`, a scheduler) alike stop the samples and keep those written: --output
    # is then put in place with them, as at the end of a run (the handler is gone again by then).
    with open_output(args.output) as out_file, sigterm_raises():
        try:
            if args.chat and not prompts:
                converse(model, tokenizer, gen_kwargs, seed, device, model_context_length(config), out_file,
                         settings, source, args.system)
            else:
                run(model, tokenizer, prompts, gen_kwargs, args.num_samples, seed, device, settings, out_file,
                    inputs=inputs if args.chat else None)
        except (KeyboardInterrupt, Terminated) as stop:
            print(file=sys.stderr)
            return EXIT_SIGNAL[signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT]
    return 0


# Samples generated together: --num-samples 100000 must not ask for 100000 rows of logits at once (~20 GB for
# GPT-2's vocabulary); a batch this size is a few MB, and still fills a GPU well for a small model.
SAMPLES_PER_BATCH = 64


def batch_seed(seed: int, batch: int) -> int:
    """The seed of a batch of samples: `seed` itself for the first (so up to SAMPLES_PER_BATCH samples are
    exactly those of one generate call seeded with it), then one seed per batch, far from seed + 1's."""
    return seed if batch == 0 else (seed + batch * 0x9E3779B97F4A7C15) % 2**63


def run(model, tokenizer, prompts, gen_kwargs, num_samples, seed, device, settings, out_file,
        inputs: list[list[int]] | None = None) -> None:
    """Samples for each prompt, SAMPLES_PER_BATCH at a time. With `inputs` (--chat: each prompt rendered as a
    user turn), only the reply is printed and recorded, and one reply for one prompt is printed with no header."""
    import torch
    from transformers import TextStreamer

    chat = inputs is not None
    # one text at a time can be shown as it is generated; several would interleave
    stream = len(prompts) == 1 and num_samples == 1
    for p_i, prompt in enumerate(prompts):
        if stream and not chat:
            print(sample_header(0, 1, 0, 1, prompt), flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=chat, skip_special_tokens=True) if stream else None
        for batch, first in enumerate(range(0, num_samples, SAMPLES_PER_BATCH)):
            with torch.inference_mode():
                samples = generate_samples(model, tokenizer, inputs[p_i] if chat else prompt, gen_kwargs,
                                           num_samples=min(SAMPLES_PER_BATCH, num_samples - first),
                                           seed=batch_seed(seed, batch), device=device, streamer=streamer)
            for s_i, sample in enumerate(samples, first):  # each batch printed and written as it is done
                if chat:
                    sample.text = sample.completion  # the reply is the text: the template's own is not shown
                write_sample(sample, s_i, num_samples, p_i, prompt, len(prompts), stream, settings, out_file)


def write_sample(sample, s_i: int, num_samples: int, p_i: int, prompt: str, num_prompts: int, streamed: bool,
                 settings: dict, out_file) -> None:
    if not streamed:
        print(sample_header(s_i, num_samples, p_i, num_prompts, prompt))
        print(sample.text)
    print(flush=True)
    if out_file is not None:
        record = dict(prompt=prompt, prompt_index=p_i, sample_index=s_i, text=sample.text,
                      completion=sample.completion, new_tokens=sample.new_tokens,
                      finish_reason=sample.finish_reason, settings=settings)
        out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        out_file.flush()  # keep what is done if the run is interrupted


def system_turn(text: str | None) -> list[dict]:
    """The system turn that starts every conversation (--system, /system), or none."""
    return [] if text is None else [{"role": "system", "content": text}]


def converse(model, tokenizer, gen_kwargs, seed, device, n_ctx: int | None, out_file, settings, source: str,
             system: str | None = None) -> None:
    """--chat with no --prompt and a terminal: read a turn, print the reply, keep the history (the oldest
    turns dropped when it would not fit the context with --max-new-tokens); /reset forgets it, /system TEXT
    sets the system turn (/system alone drops it), Ctrl-C stops a reply and forgets that turn, Ctrl-D ends.
    A message the template cannot render is one error line, and the conversation goes on."""
    import torch
    from transformers import TextStreamer

    print("chat: type a message; /reset starts over, /system TEXT sets the system turn, Ctrl-C stops a reply, "
          "Ctrl-D ends", file=sys.stderr, flush=True)
    history: list[dict] = []
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            print("(system turn set)" if system else "(system turn removed)", file=sys.stderr, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            prompt_ids = trimmed_history(tokenizer, history, n_ctx, gen_kwargs["max_new_tokens"], source,
                                         system_turn(system))
        except UserError as exc:  # the template refused this conversation: say so, keep the one before it
            history.pop()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        if prompt_ids is None:
            history.pop()
            print(f"error: this message alone plus --max-new-tokens {gen_kwargs['max_new_tokens']} is more than the "
                  f"model's context of {n_ctx} tokens. HINT: write a shorter message, or lower --max-new-tokens",
                  file=sys.stderr, flush=True)
            continue
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.inference_mode():
                (sample,) = generate_samples(model, tokenizer, prompt_ids, gen_kwargs, num_samples=1, seed=seed,
                                             device=device, streamer=streamer)
        except KeyboardInterrupt:  # Ctrl-C during a reply: stop it, keep the conversation before this turn
            history.pop()
            print("\n(reply stopped; that message and its partial reply are not kept)", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": sample.completion})
        if out_file is not None:
            record = dict(prompt=text, prompt_index=len(history) // 2 - 1, sample_index=0, text=sample.completion,
                          completion=sample.completion, new_tokens=sample.new_tokens,
                          finish_reason=sample.finish_reason, settings=settings)
            out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            out_file.flush()


def trimmed_history(tokenizer, history: list[dict], n_ctx: int | None, max_new_tokens: int, source: str,
                    system: list[dict] = ()) -> list[int] | None:
    """The conversation (after the `system` turn, which is always kept) rendered up to the reply, its oldest
    turns (a user message and the reply to it) dropped from `history` until it fits the context with room for
    max_new_tokens; None if even the newest message alone does not."""
    while True:
        ids = chat_prompt_ids(tokenizer, [*system, *history], source)
        if n_ctx is None or len(ids) + max_new_tokens <= n_ctx:
            return ids
        if len(history) == 1:
            return None
        del history[:2]


SAMPLE_FIELDS = ("prompt", "sample_index", "settings")  # every record of our --output JSONL has these


def written_by_generate(path: Path) -> bool:
    """`path` is a JSONL file of samples this script wrote (its first record has our fields)."""
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and all(k in first for k in SAMPLE_FIELDS)


def folders_to_protect(source: str, is_local: bool) -> list[Path]:
    """The --model folder and, when it is a checkpoint-*/, best/ or adapter/ of a training run, that run."""
    if not is_local:
        return []
    model = Path(source).resolve()
    run = model.parent
    return [model, run] if written_by_us(run) else [model]


def check_output(output: str | None, protected: list[Path]) -> None:
    """--output never replaces a file it should not: a model's or a run's files, or anything else that is
    not a sample file of ours (data loss: `--output out/config.json` used to replace the model's config)."""
    if output is None:
        return
    path = Path(output).expanduser()
    if path.exists() and not path.is_file():
        return  # /dev/stdout, a FIFO: written as a stream, nothing is replaced
    ours = path.is_file() and written_by_generate(path)
    inside = next((f for f in protected if f == path.resolve().parent or f in path.resolve().parents), None)
    if inside is not None and (path.suffix != ".jsonl" or path.name in RUN_ARTIFACTS or
                               (path.exists() and not ours)):
        raise UserError(f"--output {output} would write into the model folder {inside}, whose files "
                        f"{'are' if inside == protected[0] else 'belong to'} the model or its training run. "
                        "HINT: write the samples elsewhere, e.g. --output samples.jsonl")
    if path.is_file() and path.stat().st_size > 0 and not ours:
        raise UserError(f"--output {output} exists and is not a sample file written by generate.py, so it "
                        "is not replaced. HINT: pass a new file name, or delete that file first")


@contextlib.contextmanager
def open_output(path: str | None):
    if path is None:
        yield None
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_file():  # a stream: nothing to replace atomically
        with open(target, "w", encoding="utf-8") as f:
            yield f
        return
    if not os.access(target.parent, os.W_OK):  # bad input, not a failed save: say so before any sample
        raise UserError(f"cannot write --output {path} (its folder is not writable). HINT: pick a writable location")
    with atomic_file(target, f"--output {path}") as f:
        yield f


if __name__ == "__main__":
    # a terminal that cannot show a generated character should not end the run
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    raise SystemExit(main())
