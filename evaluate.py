#!/usr/bin/env python
"""Judge models: the same data scored on each, side by side, in figures that compare across tokenizers.

    python evaluate.py --model out --data-dir data                      # the run's own held-out split
    python evaluate.py --model gpt2 --model out --input heldout.txt other.jsonl
    python evaluate.py --model out/best --tasks quiz.jsonl              # multiple choice / exact match

Models: a training output folder, its best/ or checkpoint-N/, a LoRA adapter (its base found as generate.py
finds it), or a hub name. Data: the val split of a --data-dir, in the very blocks the training script scores
(its loss equals the run's last val loss); --input text, folders and record files as prepare_data.py reads
them, each tokenized with each model's own tokenizer and scored whole in lm-evaluation-harness's rolling
windows (bits per byte, byte and word perplexity as lm-eval defines them); --tasks files of questions. A
--data-dir of preference pairs gives each model's preference accuracy on the val pairs (and DPO's reward
accuracy of each later model against the first).

Several processes: --nproc N (or torchrun) shares the batches out and adds the sums up, for the figures of one
process (finetune/evaluation/parallel.py). Memory does not grow with the inputs: they are read, tokenized and
scored as a stream.

Output: a table on stdout; with --output DIR (by default DIR is eval/ in the model's training run, a folder the
trainer never rewrites), eval.json, eval.md and eval.png there. No file of a model is ever written.
docs/evaluate.md says what each figure means and how it was checked against lm-evaluation-harness.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.core import cli
from finetune.core.console import setup_logging
from finetune.core.errors import UserError, exit_on_user_error, raise_if_problems
from finetune.core.flags import shared

log = logging.getLogger("evaluate")

DEFAULT_BATCH = 8
RUN_FOLDERS = ("best", "adapter")  # inside a run, beside checkpoint-N/: model folders the report never goes in


@dataclass
class Models:
    """models"""

    model: list[str] = shared("model", default_factory=list, action="append", metavar="DIR")
    """a model: a training output folder, its best/ or checkpoint-N/, a LoRA adapter folder, or a hub name; repeat
    to compare several (the first is the baseline). Default: out"""
    batch_size: int = shared("batch_size", DEFAULT_BATCH)
    """windows per forward pass (default: 8; --data-dir of a run: the run's)"""


@dataclass
class Runtime:
    """runtime"""

    device: str = shared("device", "auto")
    precision: str = shared("precision", "auto")
    """the forward pass's precision, as the training script picks it (default: auto: bf16 where the GPU or CPU
    runs it faster, else fp32); weights stay fp32 as in training"""
    seed: int = shared("seed", 0)
    """sampling seed, the same for every model (default: 0)"""
    nproc: int | None = shared("nproc", None, metavar="N")
    """score in N processes on this machine, each a share of the batches (one GPU each on CUDA), as the training
    script's --nproc starts them; the same figures as one process. Default: torchrun's processes, or 1"""


@dataclass
class Data:
    """data (at least one)"""

    data_dir: str | None = shared("data_dir", None, metavar="DIR")
    """a folder from prepare_data.py: its val split is scored, in the blocks a training run on it scored (all val
    blocks for a model that was not trained on it)"""
    input: list[str] = shared("input", default_factory=list)
    """text files, folders, JSONL/JSON/CSV/TSV/Parquet records or chat records, read as prepare_data.py reads
    them; a text file or a record is one document"""
    text_field: str = shared("text_field", "text")
    """the field of a record that holds its text (default: text)"""
    encoding: str = shared("encoding", "utf-8")
    """of the text inputs (default: utf-8)"""
    stride: int | None = field(default=None, metadata={"metavar": "N"})
    """score --input in overlapping windows that start every N tokens (the Hugging Face perplexity guide's loop):
    each token sees at least context - N tokens before it. Default: lm-eval's rolling windows, which do not
    overlap"""
    tasks: list[str] = field(default_factory=list, metadata={"action": "append", "metavar": "FILE"})
    """a JSONL file of questions: {"question", "choices", "answer"} (multiple choice: acc, acc_norm) or
    {"prompt", "answer"} (exact match of a greedy completion); repeatable"""
    lm_eval: str | None = field(default=None, metadata={"metavar": "TASKS"})
    """also run lm-evaluation-harness tasks (comma-separated, e.g. hellaswag,lambada_openai) on the same models,
    in this process (needs `pip install lm-eval`; most tasks download their data from the hub once)"""
    lm_eval_include: str | None = field(default=None, metadata={"metavar": "DIR"})
    """a folder of lm-eval task YAML files of your own"""
    lm_eval_limit: int | None = field(default=None, metadata={"metavar": "N"})
    """at most N examples per lm-eval task"""


@dataclass
class Samples:
    """samples"""

    prompt: list[str] = shared("prompt", default_factory=list)
    """a prompt each model completes, shown side by side (repeatable; '-' reads one prompt from stdin); a chat model
    answers it as a user turn through its template"""
    prompt_file: str | None = shared("prompt_file", None)
    max_new_tokens: int = shared("max_new_tokens", 64)
    """of each sample (default: 64)"""


@dataclass
class Output:
    """output"""

    output: str | None = shared("output", None, metavar="DIR")
    """folder for eval.json, eval.md and eval.png (default: eval/ in the first model's training run; none for a
    model outside a run)"""


GROUPS = (Models, Runtime, Data, Samples, Output)


@dataclass
class EvaluateSettings(Output, Samples, Data, Runtime, Models):
    """Every flag of evaluate.py, as one flat object (the groups above hold the fields and their help); eval.json
    records them under "settings", which --config reads back."""


def build_arg_parser(suppress_defaults: bool = False):
    return cli.build_arg_parser(GROUPS, "Evaluate one or more models on the same data, side by side.",
                                suppress_defaults)


def parse_args(argv: list[str] | None) -> EvaluateSettings:
    return cli.parse_config(EvaluateSettings, build_arg_parser, argv)[0]


def check_settings(args: EvaluateSettings) -> None:
    problems = []
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}. HINT: try {DEFAULT_BATCH}")
    if args.stride is not None and args.stride < 1:
        problems.append(f"--stride must be at least 1, got {args.stride}. HINT: try half the model's context, "
                        "e.g. 512 for GPT-2")
    if args.stride is not None and not args.input:
        problems.append("--stride applies to --input documents, and none is given. HINT: add --input FILE")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}. HINT: try 64")
    if not (args.data_dir or args.input or args.tasks or args.lm_eval or args.prompt or args.prompt_file):
        problems.append("nothing to evaluate on. HINT: pass --data-dir DIR (the val split), --input FILE (text or "
                        "records), --tasks FILE.jsonl, --lm-eval TASKS or --prompt TEXT")
    from finetune.evaluation.parallel import nproc_problems

    raise_if_problems(problems + nproc_problems(args.nproc, bool(args.lm_eval)))


# -----------------------------------------------------------------------------
# Models


def resolve_models(names: list[str]) -> list[dict]:
    """Each --model checked (generate.py's resolution: a folder, an adapter, or a hub name), with its label."""
    from finetune.models.folder import resolve_model

    models, seen = [], {}
    for name in names or ["out"]:
        source, is_local = resolve_model(name)
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name} ({seen[name]})"
        models.append({"label": label, "name": name, "source": source, "local": is_local})
    return models


def load_tokenizer_of(model: dict):
    """The model's tokenizer, and its base when it is an adapter (whose folder may hold no tokenizer)."""
    from finetune.models.folder import adapter_base, is_adapter_folder
    from finetune.models.loading import TOKENIZER_FILES, load_config, load_tokenizer

    source = model["source"]
    adapter = model["local"] and is_adapter_folder(Path(source))
    base = adapter_base(Path(source)) if adapter else source
    has_tokenizer = not adapter or any((Path(source) / f).is_file() for f in TOKENIZER_FILES)
    return load_config(base), load_tokenizer(source if has_tokenizer else base), adapter


def load_scorer(model: dict, args, device, dist_info=None):
    """The model loaded in fp32 (as the training script holds it), ready to score."""
    import torch

    from finetune.evaluation.parallel import Shard
    from finetune.evaluation.scoring import Scorer
    from finetune.models.folder import load_adapter_model
    from finetune.models.loading import load_weights, model_context_length
    from finetune.runtime.device import resolve_precision

    config, tokenizer, adapter = load_tokenizer_of(model)
    precision = resolve_precision(args.precision, device, getattr(config, "hidden_size", None), log)
    context = model_context_length(config) or min(getattr(tokenizer, "model_max_length", 1024), 1024)
    log.info("loading %s on %s (%s)", model["source"], device, precision)
    source = model["source"]
    weights = load_adapter_model(Path(source), torch.float32) if adapter else load_weights(source, torch.float32)
    weights = weights.to(device).eval()
    return Scorer(weights, tokenizer, device, precision, context, args.batch_size, model["label"],
                  Shard(dist_info, device))


def model_record(model: dict, scorer) -> dict:
    from finetune.formats.tokenfiles import tokenizer_fingerprint
    from finetune.models.adapters import base_fingerprint

    fingerprint = base_fingerprint(model["source"]) if model["local"] else model["source"]
    return {"label": model["label"], "source": model["source"], "fingerprint": fingerprint,
            "tokenizer_fingerprint": tokenizer_fingerprint(scorer.tokenizer), "precision": scorer.precision,
            "device": str(scorer.device), "context": scorer.context,
            "parameters": sum(p.numel() for p in scorer.model.parameters())}


# -----------------------------------------------------------------------------
# Where the report goes


def run_folder_of(model: dict) -> Path | None:
    from finetune.evaluation.datadir import run_config

    found = run_config(Path(model["source"])) if model["local"] else None
    return found[0] if found else None


def output_folder(args, models: list[dict]) -> Path | None:
    """--output, else eval/ in the first model's training run (a name the trainer never writes or removes)."""
    if args.output:
        folder = Path(args.output).expanduser()
    else:
        run = next((r for r in map(run_folder_of, models) if r is not None), None)
        folder = run / "eval" if run else None
    if folder is not None:
        check_output_folder(folder, args.output is not None)
    return folder


def check_output_folder(folder: Path, given: bool) -> None:
    """Never into a model's folder (best/, checkpoint-N/, adapter/, a folder with weights), never over a file
    evaluate.py did not write."""
    import json

    from finetune.evaluation.report import JSON_FILE, REPORT_FORMAT
    from finetune.formats.checkpoints import checkpoint_step
    from finetune.models.loading import WEIGHT_FILES

    flag = "--output" if given else "the default output folder"
    resolved = folder.resolve()
    inside = next((p for p in [resolved, *resolved.parents]
                   if p.name in RUN_FOLDERS or checkpoint_step(p) is not None
                   or (p == resolved and (any((p / f).is_file() for f in WEIGHT_FILES)
                                          or (p / "adapter_config.json").is_file()))), None)
    if inside is not None:
        raise UserError(f"{flag} {folder} is {'' if inside == resolved else 'inside '}the model folder {inside}, whose "
                        f"files belong to the model. HINT: write the report elsewhere, e.g. --output "
                        f"{inside.parent / 'eval'}")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder. HINT: pass a folder name such as eval")
    report = folder / JSON_FILE
    if report.is_file():
        try:
            ours = json.loads(report.read_text(encoding="utf-8")).get("format") == REPORT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{report} exists and was not written by evaluate.py, so it is not replaced. HINT: pass "
                            "another --output folder")


# -----------------------------------------------------------------------------
# The evaluations: read before any model loads, so a bad input costs no load


def build_evaluations(args) -> tuple[list, list[dict]]:
    """(the evaluations, fingerprints of their data)."""
    from finetune.evaluation.datadir import ValSplitEvaluation
    from finetune.evaluation.documents import read_documents
    from finetune.evaluation.perplexity import TextEvaluation
    from finetune.evaluation.preference import PreferenceEvaluation
    from finetune.evaluation.tasks import TaskEvaluation, read_tasks
    from finetune.prepare.lines import file_sha256

    evaluations, data = [], []
    if args.data_dir:
        from finetune.formats.tokenfiles import load_meta
        from finetune.train.objectives import data_kind

        meta = load_meta(args.data_dir)
        if data_kind(meta) == "preference":  # pairs: which completion each model prefers, not a perplexity
            evaluations.append(PreferenceEvaluation(args.data_dir, meta, args.batch_size))
        else:
            evaluations.append(ValSplitEvaluation(args.data_dir, meta, args.batch_size, None))
        data.append({"name": args.data_dir, "kind": "data-dir", "tokenizer_fingerprint":
                     meta.get("tokenizer", {}).get("fingerprint"),
                     "sources": [s.get("sha256") for s in meta.get("sources", [])]})
    if args.input:
        documents = read_documents(args.input, args.text_field, args.encoding)
        name = ", ".join(args.input) if len(args.input) <= 3 else f"{len(args.input)} inputs"
        evaluations.append(TextEvaluation(name, documents, args.stride))
        data += [{"name": str(p), "kind": "input", "sha256": file_sha256(p)} for p in documents.files]
    for path in args.tasks:
        evaluations.append(TaskEvaluation(path, read_tasks(Path(path))))
        data.append({"name": path, "kind": "tasks", "sha256": file_sha256(Path(path))})
    if args.lm_eval:
        from finetune.evaluation.lmeval import LmEvalEvaluation, check_task_names, require_lm_eval, task_names

        require_lm_eval()
        names = task_names(args.lm_eval)
        check_task_names(names, args.lm_eval_include)
        evaluations.append(LmEvalEvaluation(names, args.lm_eval_include, args.lm_eval_limit))
    return evaluations, data


def read_prompts(args) -> list[str]:
    from generate import prompt_texts, read_prompt_file

    prompts = prompt_texts(args.prompt) + (read_prompt_file(Path(args.prompt_file)) if args.prompt_file else [])
    for i, text in enumerate(prompts, 1):
        if not text.strip():
            raise UserError(f"prompt {i} is empty. HINT: give the model some text to continue")
    return prompts


def samples_of(scorer, prompts: list[str], args) -> list[str]:
    """Each prompt's sampled completion (a chat model: its reply through its template), seeded alike."""
    import torch

    from finetune.infer.sampling import chat_prompt_ids, generate_samples, generation_kwargs

    chat = bool(getattr(scorer.tokenizer, "chat_template", None))
    kwargs = generation_kwargs(scorer.model, scorer.tokenizer, max_new_tokens=args.max_new_tokens)
    texts = []
    for prompt in prompts:
        ids = chat_prompt_ids(scorer.tokenizer, [{"role": "user", "content": prompt}]) if chat else scorer.encode(prompt)
        room = scorer.context - len(ids)
        if room < 1:
            texts.append("[no sample: the prompt fills the model's context]")
            continue
        with torch.no_grad():
            (sample,) = generate_samples(scorer.model, scorer.tokenizer, ids, dict(kwargs, max_new_tokens=min(
                args.max_new_tokens, room)), num_samples=1, seed=args.seed, device=scorer.device, ctx=scorer.ctx)
        texts.append(sample.completion)
    return texts


def check_data_dir_tokenizer(args, model: dict, tokenizer, config) -> None:
    from finetune.formats.tokenfiles import check_data_matches_model, load_meta

    problems = check_data_matches_model(load_meta(args.data_dir), config.vocab_size, tokenizer)
    if problems:
        message = problems[0].replace(" (HINT:", ". HINT:").rstrip(")")
        raise UserError(f"--data-dir {args.data_dir} does not fit --model {model['name']}: {message}; or evaluate "
                        f"this model on --input text, which is tokenized with its own tokenizer")


def settle_pair_blocks(evaluations: list, models: list[dict], configs: list, data_dir: str) -> None:
    """Pairs are scored in one block size for every model (the same pairs, cut alike): a training run's on this
    folder when a model comes from one, else the smallest context (the models' configs are at hand)."""
    from finetune.evaluation.datadir import DEFAULT_BLOCK, run_config, same_folder
    from finetune.evaluation.preference import PreferenceEvaluation
    from finetune.models.loading import model_context_length

    contexts = [model_context_length(config) or DEFAULT_BLOCK for config in configs]
    run_block_size = None
    for model, context in zip(models, contexts):
        run = run_config(Path(model["source"])) if model["local"] else None
        if run and same_folder(run[1].data_dir, data_dir):
            run_block_size = run[1].block_size or min(context, DEFAULT_BLOCK)
            break
    short = next((m for m, c in zip(models, contexts) if run_block_size and c < run_block_size), None)
    if short is not None:
        raise UserError(f"the pairs of {data_dir} are scored in the {run_block_size}-token blocks of the run of "
                        f"{model['name']}, longer than the context of {short['name']} "
                        f"({contexts[models.index(short)]} tokens). HINT: evaluate {short['name']} in another "
                        "evaluate.py call")
    for evaluation in evaluations:
        if isinstance(evaluation, PreferenceEvaluation):
            evaluation.settle_block_size(contexts, run_block_size)


def check_stride(args, model: dict, context: int) -> None:
    if args.stride is not None and args.stride >= context:
        raise UserError(f"--stride {args.stride} is not below the context of {model['name']} ({context} tokens), so "
                        f"tokens between windows would not be scored. HINT: use --stride {context // 2}")


# -----------------------------------------------------------------------------
# main


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("evaluate")
    check_settings(args)
    models = resolve_models(args.model)
    folder = output_folder(args, models)
    evaluations, data = build_evaluations(args)
    prompts = read_prompts(args)
    configs = []
    for model in models:  # cheap (config and tokenizer): a mismatch is found before any weights load
        config, tokenizer, _ = load_tokenizer_of(model)
        configs.append(config)
        if args.data_dir:
            check_data_dir_tokenizer(args, model, tokenizer, config)
    if args.data_dir:
        settle_pair_blocks(evaluations, models, configs, args.data_dir)

    from finetune.evaluation import parallel

    check_processes(args, models, configs, evaluations, prompts)
    if parallel.wanted(args.nproc):  # --nproc N: this process starts the N that evaluate, and waits
        return parallel.start(args.nproc, str(Path(__file__).resolve()),
                              sys.argv[1:] if argv is None else list(map(str, argv)), args.device)
    dist_info = parallel.join(args.device)
    setup_logging("evaluate", dist_info.is_main)
    return parallel.run_in_processes(dist_info, lambda: evaluate_models(args, models, folder, evaluations, data,
                                                                        prompts, dist_info))


def check_processes(args, models: list[dict], configs: list, evaluations: list, prompts: list[str]) -> None:
    """More processes than there is work for (parallel.py shares batches out): refused before any weights load."""
    from finetune.evaluation import parallel
    from finetune.evaluation.datadir import DEFAULT_BLOCK, run_config
    from finetune.models.loading import model_context_length

    processes = parallel.processes_wanted(args.nproc)
    if processes > 1:
        contexts = [model_context_length(config) or DEFAULT_BLOCK for config in configs]
        runs = [run_config(Path(model["source"])) if model["local"] else None for model in models]
        raise_if_problems(parallel.work_problems(processes, parallel.most_shares(evaluations, contexts, runs),
                                                 prompts_only=bool(prompts) and not evaluations))


def evaluate_models(args, models: list[dict], folder: Path | None, evaluations: list, data: list[dict],
                    prompts: list[str], dist_info) -> int:
    """Every model on every evaluation (this process's share of it), then the report (the first process's)."""
    from finetune.evaluation.datadir import ValSplitEvaluation, run_config
    from finetune.evaluation.report import build_report, console_table, write_report
    from finetune.runtime.device import get_device, library_versions

    device = get_device(args.device, dist_info.local_rank if dist_info.enabled else None)
    results = [{} for _ in evaluations]
    records, samples = [], [{"prompt": p, "completions": {}} for p in prompts]
    for model in models:
        scorer = load_scorer(model, args, device, dist_info)
        check_stride(args, model, scorer.context)
        records.append(model_record(model, scorer))
        for i, evaluation in enumerate(evaluations):
            if isinstance(evaluation, ValSplitEvaluation):  # the blocks of the run this model comes from
                run = run_config(Path(model["source"])) if model["local"] else None
                evaluation = ValSplitEvaluation(args.data_dir, evaluation.meta, args.batch_size, run)
            results[i][model["label"]] = evaluation.run(scorer)
        for sample, text in zip(samples, samples_of(scorer, prompts if dist_info.is_main else [], args)):
            sample["completions"][model["label"]] = text
        if scorer.seconds:
            log.info("%s: %d tokens scored in %.1f s (%.0f tokens/s)", model["label"], scorer.tokens_scored,
                     scorer.seconds, scorer.tokens_scored / scorer.seconds)
        del scorer
    if not dist_info.is_main:
        return 0
    settings = {k: v for k, v in vars(args).items() if k not in ("output",)}
    report = build_report(records, list(zip(evaluations, results)), settings, library_versions(), data, samples)
    sys.stdout.write(console_table(report))
    if folder is not None:
        written = write_report(report, folder)
        log.info("wrote %s", ", ".join(str(p) for p in written))
    else:
        log.info("the report was not saved (the model is not in a training run): pass --output DIR to keep it")
    return 0


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    raise SystemExit(main())
