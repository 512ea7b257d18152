"""Fine-tune a causal language model (GPT-2 by default) on token files from prepare_data.py.

    python prepare_data.py --input book.txt
    python finetune_generative.py --model gpt2 --data-dir data --output-dir out

This file holds the training loop (micro-steps -> clip -> check -> step -> log -> eval -> checkpoint), the run's
life in order (`FineTune`: check -> setup -> train -> finish, cleanup always) and main(), which alone turns how a
run ended into an exit code. The settings are finetune/train/config.py; every other concern has its room in the
finetune/ package (docs/development.md draws the layout).
Checkpoints are atomic and resume exactly (`--resume`); Ctrl-C or SIGTERM saves one before exiting.
Multi-GPU: `torchrun --nproc_per_node=N finetune_generative.py ...`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.core.console import progress_display, setup_logging
from finetune.core.errors import (
    EXIT_DIVERGED,
    EXIT_SAVE_FAILED,
    EXIT_SIGNAL,
    SaveFailed,
    UserError,
    exit_on_user_error,
    first_line,
    raise_if_problems,
)
from finetune.formats.checkpoints import list_checkpoints
from finetune.runtime import launcher
from finetune.runtime.distributed import DistInfo, all_reduce_sum, barrier, raised_in_a_collective, setup_distributed, shutdown
from finetune.train.config import TrainConfig, changed_settings, parse_config
from finetune.train.preflight import (
    MemoryPlan,
    Preflight,
    Resume,
    check_before_loading,
    plan_memory,
    resumed_config,
    settings_problems,
    with_extended_warmup,
)
from finetune.train.training import StopRequest, TrainingDiverged, TrainingRun

if TYPE_CHECKING:
    import torch

SCRIPT = Path(__file__).resolve()
log = logging.getLogger("finetune")


# -----------------------------------------------------------------------------
# The training loop


def train_loop(run: TrainingRun, stop: StopRequest, bar) -> bool:
    """The optimizer steps from where the run is to its end: True when it got there (or stopped early on the
    validation loss), False when a signal stopped it (after saving a checkpoint; `stop` says which)."""
    cfg, plan, progress, dist_info = run.cfg, run.plan, run.progress, run.dist_info
    run.model.train()
    # tokens/s counts time spent fetching data and stepping, not evaluating or saving.
    log_losses, log_tokens, log_seconds = [], 0, 0.0
    while progress.step < plan.total_steps:
        run.start_epoch()  # the sampler at the run's position in its epoch, a fresh iterator over the batches
        step_start = time.perf_counter()
        while window := next_window(run.batches, cfg.grad_accum):
            # ---- forward/backward, clip, check, step
            lr = run.scheduler.get_last_lr()[0]
            window_samples = sum(b["input_ids"].shape[0] for b in window)
            step_loss, grad_norm, stopping = train_step(run, window, window_samples, stop, lr)
            # ---- bookkeeping
            window_tokens = window_samples * plan.block_size * dist_info.world_size
            progress.step += 1
            progress.tokens_seen += window_tokens
            progress.samples_in_epoch += window_samples
            if progress.samples_in_epoch >= run.sampler.samples_per_replica():
                progress.epoch, progress.samples_in_epoch = progress.epoch + 1, 0
            finished = progress.step >= plan.total_steps
            log_losses.append(step_loss)
            log_tokens += window_tokens
            log_seconds += time.perf_counter() - step_start
            bar.update(1)
            # ---- log (and before a stop: every finished step's loss is in metrics.jsonl)
            if progress.step % cfg.log_every == 0 or finished or stopping:
                record_train_losses(run, bar, log_losses, log_tokens, log_seconds, lr, grad_norm)
                log_losses, log_tokens, log_seconds = [], 0, 0.0
            # ---- evaluate (the plan says when: --eval-every, each epoch end, the end)
            sampled = False
            if plan.evaluates_at(progress.step):
                val_loss = run.evaluate_and_track(stop)
                stopping = stopping or val_loss is None  # a stop during the evaluation (agreed): save now
                finished = finished or (val_loss is not None and run.should_stop_early())
                if cfg.sample_prompts and cfg.sample_every is None and val_loss is not None:
                    run.write_samples(val_loss, stop)
                    sampled = True
            if cfg.sample_prompts and cfg.sample_every and (progress.step % cfg.sample_every == 0 or finished):
                run.write_samples(None, stop)
                sampled = True
            if sampled and not stopping:  # a stop while rank 0 sampled: every process agrees, then saves now
                stopping = stop.agreed(run.device, run.dist_info)
            if stopping and log_losses:  # a stop during the evaluation or the samples: the steps since the last line
                record_train_losses(run, bar, log_losses, log_tokens, log_seconds, lr, grad_norm)
            # ---- checkpoint
            if finished or stopping or plan.saves_at(progress.step):
                run.checkpoint()
            if stopping or finished:
                return not stopping
            step_start = time.perf_counter()
    return True


def record_train_losses(run: TrainingRun, bar, losses: list, tokens: int, seconds: float, lr: float,
                        grad_norm: float) -> None:
    """One metrics.jsonl line (and progress line) for the steps since the last: their mean loss, tokens/s."""
    progress = run.progress
    tokens_per_s = tokens / seconds if seconds > 0 else None
    mean_loss = sum(losses) / len(losses)
    run.record({"kind": "train", "step": progress.step, "epoch": progress.epoch,
                "epoch_progress": run.epoch_progress(), "tokens": progress.tokens_seen,
                "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s})
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", tok_s=f"{tokens_per_s or 0:,.0f}")


def next_window(batches, grad_accum: int) -> list:
    """Up to grad_accum micro-batches; fewer at the end of an epoch, none when it is over."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == grad_accum:
            break
    return window


def train_step(run: TrainingRun, window: list, window_samples: int, stop: StopRequest,
               lr: float) -> tuple[float, float, bool]:
    """One optimizer step over the micro-batches of `window` (`window_samples` sequences in all):
    (loss, grad norm, whether to stop after it).

    The loss of a step is the objective's mean over the whole step (text: over its predictions; chat: over
    its trained tokens; preference: over its pairs): each micro-batch's loss is weighted by the share the
    objective gives it (finetune/train/objectives/).
    """
    import torch

    cfg, model, device, dist_info, scaler = run.cfg, run.model, run.device, run.dist_info, run.scaler
    shares = run.objective.micro_batch_shares(window, window_samples, run.plan.block_size, device, dist_info)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(window):
        # Gradients are all-reduced only on the last micro-step.
        sync = (contextlib.nullcontext() if not dist_info.enabled or i == len(window) - 1
                else run.strategy.no_gradient_sync(model))
        with sync:
            with run.ctx:
                loss = run.objective.loss(model, batch, device)
            share = shares[i]
            scaler.scale(loss * share).backward()
        loss_sum += loss.detach() * share
    scaler.unscale_(run.optimizer)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = run.strategy.clip_gradients(model.parameters(), max_norm)
    stats = torch.stack([loss_sum.float(), grad_norm.float().to(device),
                         torch.tensor(float(stop.requested), device=device)])
    if dist_info.enabled:  # mean loss over processes; a signal on any rank stops them all
        all_reduce_sum(stats, dist_info)
        stats[:2] /= dist_info.world_size
    step_loss, step_grad_norm, stop_votes = stats.tolist()  # the one host sync per step
    stopping = stop.agree(stop_votes)  # decided here, where all ranks agree: a later signal waits for the next step
    bad = "loss" if not math.isfinite(step_loss) else "gradient norm" if (
        not scaler.is_enabled() and not math.isfinite(step_grad_norm)) else None
    if bad:
        raise TrainingDiverged(f"{bad} is {step_loss if bad == 'loss' else step_grad_norm} at step "
                               f"{run.progress.step + 1} (lr {lr:.3g}); stopped before the optimizer step")
    scaler.step(run.optimizer)
    scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return step_loss, step_grad_norm, stopping


# -----------------------------------------------------------------------------
# The run's life


class FineTune:
    """One run, in order: check (nothing loaded yet) -> setup (the output folder, model, optimizer, data) ->
    train (step 0, the loop) -> finish (the final model); cleanup always. How it ended is for main() to say."""

    # set by check()
    resume: Resume | None             # the checkpoint a --resume continues
    preflight: Preflight              # meta.json, tokenizer, model config, plan, fingerprints
    device: torch.device
    precision: str                    # fp32 | bf16 | fp16, resolved from --precision
    # set by setup()
    run: TrainingRun | None = None

    def __init__(self, cfg: TrainConfig, explicit: set[str], dist_info: DistInfo):
        self.cfg, self.explicit, self.dist_info = cfg, explicit, dist_info
        self.stop = StopRequest()
        self.exits = contextlib.ExitStack()  # what setup() took (the folder's lock, signal handlers, the run's workers)

    def check(self) -> MemoryPlan:
        """The checkpoint a --resume continues (its settings under the flags given now), the data against the
        model's config and tokenizer, the device and precision, the plan and its memory: all before the weights
        load. Raises one UserError listing every problem."""
        from finetune.runtime.device import get_device, resolve_precision

        cfg, dist_info = self.cfg, self.dist_info
        cfg, self.resume = resumed_config(cfg, self.explicit, dist_info)
        self.preflight = check_before_loading(cfg, self.explicit, dist_info, self.resume)
        self.cfg = cfg = with_extended_warmup(cfg, self.preflight.plan)
        self.cfg = cfg = self.preflight.objective.run_settings(cfg, resuming=self.resume is not None)
        self.device = get_device(cfg.device, dist_info.local_rank if dist_info.enabled else None)
        hidden_size = getattr(self.preflight.model_config, "hidden_size", None)  # the shape the precision probe times
        self.precision = resolve_precision(cfg.precision, self.device, hidden_size)
        # auto's choice is recorded as the run's setting (train_config.json, every checkpoint), so a resume keeps it
        # instead of asking a speed probe again, which another machine or a missing cache can answer otherwise
        self.cfg = cfg = dataclasses.replace(cfg, precision=self.precision)
        precision_problem = self.preflight.strategy.precision_problem(self.precision)
        if precision_problem:
            raise UserError(precision_problem)
        return plan_memory(cfg, self.preflight, dist_info, self.device, self.precision)

    def setup(self, plan_text: str) -> None:
        """The output folder (one run at a time; an earlier run is replaced only on request), the head of the log,
        then model, optimizer and data. A signal from here on (the model loading and step 0 included) stops the
        run with its own message, not a traceback."""
        from finetune.runtime.device import library_versions
        from finetune.train.build import build_run
        from finetune.train.rundir import check_output_dir, locked_output_dir, prepare_output_dir

        cfg, dist_info, resume = self.cfg, self.dist_info, self.resume
        output_dir = Path(cfg.output_dir)
        check_output_dir(output_dir, resume=resume is not None, overwrite=cfg.overwrite,
                         script=SCRIPT.name if dist_info.is_main else None)
        barrier(dist_info)  # every rank has checked before rank 0 writes there
        if dist_info.is_main:
            self.exits.enter_context(locked_output_dir(output_dir, SCRIPT.name))
            prepare_output_dir(output_dir, cfg.overwrite and resume is None,
                               json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        log.info("settings (not at their defaults; all of them in %s):\n%s", output_dir / "train_config.json",
                 changed_settings(cfg))
        log.info("versions %s", json.dumps(library_versions()))
        log.info("device %s, precision %s, %d process(es)%s", self.device, self.precision, dist_info.world_size,
                 f", resuming from {resume.path}" if resume else "")
        log.info("plan\n%s", plan_text)
        previous_handlers = self.stop.install()
        self.exits.callback(lambda: [signal.signal(signum, handler) for signum, handler in previous_handlers.items()])
        self.run = build_run(cfg, self.preflight, resume, SCRIPT, self.device, self.precision, dist_info)
        self.exits.callback(self.run.close)
        self.run.start_trackers(resume.state if resume else None)
        if resume:  # where the run continued: loss.png marks it (the trackers' own runs need no such record)
            progress = self.run.progress
            self.run.record({"kind": "resume", "step": progress.step, "tokens": progress.tokens_seen,
                             "total_steps": self.run.plan.total_steps, "extended": cfg.extend})

    def train(self) -> bool:
        """Step 0 of a new run (the base model's validation loss and samples: the "before"), then the loop.
        True when the run reached its end; False when a signal stopped it (self.stop says which)."""
        run, stop, is_main = self.run, self.stop, self.dist_info.is_main
        if self.resume is None:
            if not stop.requested:  # a signal while the model loaded: no need to evaluate it
                val_loss = run.evaluate_and_track(stop)  # None: stopped within one batch
                if self.cfg.sample_prompts and val_loss is not None:
                    run.write_samples(val_loss, stop)
            if stop.agreed(run.device, self.dist_info):  # every process stops here, or none
                if is_main:
                    log.warning("%s: stopped before the first training step, so nothing was trained and there is "
                                "nothing to resume; the same command starts the run again", signal.Signals(stop.signum).name)
                return False
        bar = progress_display(run.plan.total_steps, run.progress.step, is_main, log)
        try:
            finished = train_loop(run, stop, bar)
        finally:
            bar.close()  # before any other line, so that no progress line is printed after it
        if not finished and is_main:
            log.warning("stopped at step %d; continue with:\n  %s", run.progress.step, run.resume_command())
        return finished

    def finish(self) -> None:
        """The final model in --output-dir, what the run did, and its report card."""
        from finetune.evaluation.card import write_report_card

        self.run.save_final_model()
        write_report_card(self.run, self.precision)  # report_card.json/.md and the model card README.md
        log.info(end_of_run_summary(self.run))  # last: the summary and the next commands end the output

    def cleanup(self) -> None:
        self.exits.close()  # in reverse: the run's trackers and workers, the signal handlers, the folder's lock

    # ---- how a run that failed ends: one line each (main() prints it and exits with the code)
    def diverged(self, exc: TrainingDiverged) -> str:
        checkpoints = list_checkpoints(Path(self.cfg.output_dir))
        kept = f"the last checkpoint, {checkpoints[-1]}, is untouched" if checkpoints else "no checkpoint was written"
        return (f"error: {exc}; {kept}. HINT: lower --lr (now {self.cfg.lr:g}), raise --warmup-steps, "
                f"or use --precision fp32")

    def save_failed(self, exc: SaveFailed) -> str:
        checkpoints = list_checkpoints(Path(self.cfg.output_dir))
        if checkpoints:
            kept = f"the newest complete checkpoint, {checkpoints[-1]}, is intact"
            then = f"continue with `{self.run.resume_command()}`"
        else:
            kept, then = "no complete checkpoint exists yet", "start again with --overwrite"
        return f"error: {exc}; {kept}. HINT: free disk space (or lower --save-total-limit), then {then}"


def end_of_run_summary(run: TrainingRun) -> str:
    """The validation loss before -> after, where the models are, and the commands to run next."""
    from finetune.train.rundir import next_commands

    evals = [m for m in run.metrics if m["kind"] == "eval"]  # step 0 first (a resume reads it back), then on
    before, after = evals[0], evals[-1]
    best = run.output_dir / "best"
    if best.is_dir():
        best_eval = min(evals, key=lambda m: m["val_loss"])
        kept = f"best model (val loss {best_eval['val_loss']:.4f}, step {best_eval['step']}) in {best}"
    else:
        kept = "and no best/: no evaluation beat the base model's val loss at step 0"
    prompt = run.cfg.sample_prompts[0] if run.cfg.sample_prompts else "Once upon a time"
    commands = "".join(f"\n  {what + ':':<23}{command}"
                       for what, command in next_commands(run.script, run.output_dir, prompt, run.objective.chat_samples).items())
    return (f"done: val loss {before['val_loss']:.4f} at step {before['step']} -> {after['val_loss']:.4f} at step "
            f"{after['step']}; final model in {run.output_dir}, {kept}\nnext:{commands}")



# -----------------------------------------------------------------------------
# main


@exit_on_user_error
def main(argv=None) -> int:
    cfg, explicit = parse_config(argv)
    raise_if_problems(settings_problems(cfg))  # the flags alone, before anything is read
    if launcher.wanted(cfg.nproc, cfg.dry_run):  # --nproc N: this process starts the N that train, and waits
        return launcher.launch(cfg.nproc, str(SCRIPT), sys.argv[1:] if argv is None else list(map(str, argv)), cfg.device)
    dist_info = setup_distributed(cfg.device)
    setup_logging("finetune", dist_info.is_main)
    recipe = FineTune(cfg, explicit, dist_info)
    try:
        plan = recipe.check()
        if plan.large_adapter:  # worth a word, not a refusal: a large rank can be meant
            log.warning(plan.large_adapter)
        if cfg.dry_run and dist_info.is_main:
            print(plan.text)
        if plan.refusal:  # before the weights load, not at the wall (the dry run says so by its exit code too)
            raise UserError(plan.refusal)
        if cfg.dry_run:
            return 0
        try:
            recipe.setup(plan.text)
            if not recipe.train():
                return EXIT_SIGNAL[recipe.stop.signum]
            recipe.finish()
            return 0
        except TrainingDiverged as exc:
            print(recipe.diverged(exc), file=sys.stderr, flush=True)
            return EXIT_DIVERGED
        except SaveFailed as exc:
            print(recipe.save_failed(exc), file=sys.stderr, flush=True)
            return EXIT_SAVE_FAILED
        except KeyboardInterrupt:
            if not recipe.stop.requested:  # Ctrl-C before the handlers were in place: exit_on_user_error's line
                raise
            print("error: aborted by a second interrupt; the newest complete checkpoint is intact",
                  file=sys.stderr, flush=True)
            return EXIT_SIGNAL[signal.SIGINT]
        except RuntimeError as exc:
            if not (dist_info.enabled and raised_in_a_collective(exc)):
                raise
            # Another process is gone (killed, crashed): the launcher or torchrun says which; one line here.
            print(f"error: process {dist_info.rank} lost the other processes of the run ({first_line(exc, 100)}), "
                  "so it stopped too. HINT: the line of the process that failed says why; the checkpoints written "
                  "are intact: resume from the newest with the same command and --resume", file=sys.stderr, flush=True)
            return 1
        finally:
            recipe.cleanup()
    finally:
        shutdown(dist_info)


if __name__ == "__main__":
    sys.exit(main())
