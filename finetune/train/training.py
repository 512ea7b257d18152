"""What the training loop works with besides the step itself: stop requests, the data loaders, and the run
object that records metrics, evaluates, samples and saves (each a one-line call from the loop).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.core.fsio import share_identical_files, stored_bytes
from finetune.formats.checkpoints import Progress, list_checkpoints, prune_checkpoints, save_checkpoint, training_state
from finetune.infer.sampling import sample_during_training
from finetune.models.loading import ModelFiles
from finetune.runtime.distributed import DistInfo, all_reduce_sum

from .config import TrainConfig
from .loss import evaluate
from .metrics import append_jsonl, plot_losses
from .plan import Plan, eval_blocks
from .rundir import resume_command
from .trackers import Trackers, open_trackers, parse_report_to

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader
    from transformers import PreTrainedTokenizerBase

    from finetune.data.dataset import EpochShuffleSampler

    from .objectives import Objective
    from .strategies import Strategy

log = logging.getLogger("finetune")


class StopRequest:
    """First SIGINT/SIGTERM: stop after the current optimizer step and save. Second: abort now."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> dict:
        """Install the handlers; returns the previous ones so they can be put back."""
        return {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing this step and saving a checkpoint (again to abort now)",
                    signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agree(self, votes: float) -> bool:
        """Given the stop requests of all processes counted together: whether they all stop now (a process
        that was not asked stops with the others, as if sent SIGTERM)."""
        if votes > 0 and not self.requested:
            self.signum = signal.SIGTERM
        return votes > 0

    def agreed(self, device, dist_info: DistInfo) -> bool:
        """Count the requests across processes (one all-reduce) and agree(). The training step counts them in
        the all-reduce it makes anyway (the script's train_step)."""
        import torch

        return self.agree(all_reduce_sum(torch.tensor(float(self.requested), device=device), dist_info).item())


class TrainingDiverged(Exception):
    pass


# -----------------------------------------------------------------------------
# Data loaders


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C/SIGTERM to the main process, which saves before exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loaders(cfg: TrainConfig, meta: dict, plan: Plan, device, dist_info: DistInfo, objective: Objective):
    """(train loader, its resumable sampler, validation loader over the plan's evaluation blocks)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from finetune.data.dataset import EpochShuffleSampler, validation_blocks

    # the objective's blocks: text cut into blocks, or packed examples / pairs (finetune/train/objectives/)
    train_set = objective.dataset(cfg.data_dir, "train", plan.block_size, meta)
    val_set = objective.dataset(cfg.data_dir, "val", plan.block_size, meta)
    sampler = EpochShuffleSampler(len(train_set), seed=cfg.seed, rank=dist_info.rank,
                                  num_replicas=dist_info.world_size)
    pin = device.type == "cuda"
    # Private generators: seeding workers and iterators must not consume the global RNG (dropout).
    # Workers start with each epoch's iterator and stop with it (TrainingRun.start_epoch, close): not persistent,
    # so that dropping the iterator is what shuts them down.
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                              pin_memory=pin,
                              worker_init_fn=ignore_signals_in_worker if cfg.num_workers > 0 else None,
                              generator=torch.Generator().manual_seed(cfg.seed))
    # Under --fsdp the ranks' shares may differ by a block (or be empty): evaluate() keeps the sharded forward
    # passes in step with a filler batch whose loss it ignores, so every chosen block counts, as without --fsdp.
    val_indices = validation_blocks(len(val_set), eval_blocks(cfg, plan), dist_info.rank, dist_info.world_size)
    # Validation reads a few blocks per evaluation: worker processes would cost more to start than they save.
    val_loader = DataLoader(Subset(val_set, val_indices), batch_size=cfg.batch_size, shuffle=False, pin_memory=pin,
                            generator=torch.Generator().manual_seed(cfg.seed))
    return train_loader, sampler, val_loader


def filler_batch(val_loader) -> dict:
    """One validation block as a batch: what a sharded process whose share of the validation blocks is done
    (or empty: fewer blocks than processes) forwards, its loss ignored, while the others still have batches,
    since each sharded forward pass gathers the weights from every process."""
    from torch.utils.data import default_collate

    return default_collate([val_loader.dataset.dataset[0]])


# -----------------------------------------------------------------------------
# The run


@dataclass
class TrainingRun:
    """Everything main() sets up, and what the loop does besides stepping: record, evaluate, sample, save."""
    cfg: TrainConfig
    script: Path               # the training script, for the printed resume command
    model: torch.nn.Module     # as trained: possibly wrapped by DDP / torch.compile, sharded by FSDP
    model_files: ModelFiles
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    ctx: Any                   # the autocast context of the forward pass (a nullcontext in fp32)
    device: torch.device
    dist_info: DistInfo
    plan: Plan
    train_loader: DataLoader
    sampler: EpochShuffleSampler
    val_loader: DataLoader
    fingerprints: dict         # data, tokenizer (and base model) fingerprints a resume is checked against
    progress: Progress = field(default_factory=Progress)
    metrics: list[dict] = field(default_factory=list)
    trackers: Trackers = field(default_factory=Trackers)  # --report-to; start_trackers() opens them
    objective: Objective = None  # what is trained: text, chat or preference (finetune/train/objectives/)
    strategy: Strategy = None  # how the weights train: full, LoRA or FSDP (finetune/train/strategies/)
    batches: Any = None        # the iterator over this epoch's batches (its worker processes live as long as it)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    # ---- metrics
    def record(self, record: dict) -> None:
        if record["kind"] == "train":  # the objective's own statistics since the last record (DPO: rewards)
            record = {**record, **self.objective.train_metrics(self.device, self.dist_info)}
        self.metrics.append(record)
        if self.dist_info.is_main:
            append_jsonl(self.output_dir / "metrics.jsonl", record)
            self.trackers.log(record)

    def start_trackers(self, state: dict | None) -> None:
        """Open the --report-to trackers: new runs, or (on resume) the runs the checkpoint's state names."""
        config = {**dataclasses.asdict(self.cfg), "block_size": self.plan.block_size,
                  "warmup_steps": self.plan.warmup_steps, "total_steps": self.plan.total_steps}
        self.trackers = open_trackers(parse_report_to(self.cfg.report_to), self.output_dir, config,
                                      self.progress.step, state.get("trackers") if state else None,
                                      self.metrics, self.dist_info.is_main)

    # ---- evaluation, best/ and early-stopping bookkeeping
    def evaluate_and_track(self, stop: StopRequest | None = None) -> float | None:
        """The validation loss, recorded (and best/ saved when it improved); None when a stop request ended
        the evaluation (within one batch; every process then stops, and nothing is recorded)."""
        progress = self.progress
        val_loss = evaluate(self.model, self.val_loader, self.ctx, self.device, self.dist_info, self.objective,
                            should_stop=(lambda: stop.requested) if stop else None,
                            filler=filler_batch(self.val_loader) if self.strategy.sharded else None)
        if val_loss is None:  # the evaluation counted the requests of every process: all stop
            stop.agree(1)
            return None
        # The base model's loss (step 0) is the first "best": best/ only holds a model that beats it.
        improved = progress.best_val_loss is not None and val_loss < progress.best_val_loss
        if progress.best_val_loss is None or improved:
            progress.best_val_loss = val_loss
        if progress.step > 0:
            progress.evals_without_improvement = 0 if improved else progress.evals_without_improvement + 1
        record = {"kind": "eval", "step": progress.step, "epoch": progress.epoch,
                  "epoch_progress": self.epoch_progress(), "tokens": progress.tokens_seen,
                  "val_loss": val_loss, **self.objective.eval_metrics(val_loss, self.device, self.dist_info)}
        self.record(record)
        if improved:  # every rank knows: val_loss is summed across them
            best = self.output_dir / "best"
            try:
                self.model_files.release(self.model, best, f"the best model {best}", self.dist_info)
            except BaseException:  # a full disk: the line says so, never "saved" (the error follows)
                self.log_evaluation(record, " (best so far; saving it to best/ failed)")
                raise
        # Logged once best/ is saved, so that "saved to best/" is never a line ahead of the truth.
        self.log_evaluation(record, " (best so far, saved to best/)" if improved else "")
        if self.dist_info.is_main:
            if any(m["kind"] == "train" for m in self.metrics):  # not at step 0: one point, and ~1 s to import
                plot_losses(self.metrics, self.output_dir / "loss.png")
        return val_loss

    def log_evaluation(self, record: dict, note: str) -> None:
        if self.dist_info.is_main:
            log.info("step %d: val loss %.4f, %s%s", record["step"], record["val_loss"],
                     self.objective.describe_eval(record), note)

    def should_stop_early(self) -> bool:
        patience = self.cfg.early_stopping_patience
        if patience and self.progress.evals_without_improvement >= patience:
            log.info("early stopping: %d evaluations without a better val loss",
                     self.progress.evals_without_improvement)
            return True
        return False

    # ---- samples (rank 0 only; RNG and train/eval mode are restored by the sampler)
    def write_samples(self, val_loss: float | None, stop: StopRequest | None = None) -> None:
        """Samples of the --sample-prompt prompts; a stop request ends them between prompts."""
        if not self.dist_info.is_main and not self.model_files.sharded:
            return
        # A sharded model samples on every rank (each forward pass gathers weights from all of them): the same
        # seed and weights draw the same tokens everywhere, and rank 0 writes them.
        texts = sample_during_training(
            self.model, self.tokenizer, self.cfg.sample_prompts,
            max_new_tokens=self.cfg.sample_max_new_tokens, seed=self.cfg.seed, device=self.device, ctx=self.ctx,
            chat=self.objective.chat_samples, should_stop=(lambda: stop.requested) if stop else None)
        if not self.dist_info.is_main:
            return
        samples = [{"step": self.progress.step, "val_loss": val_loss, "prompt": prompt, "text": text}
                   for prompt, text in zip(self.cfg.sample_prompts, texts)]
        for sample in samples:
            log.info("sample at step %d: %r", self.progress.step, sample["text"])
            append_jsonl(self.output_dir / "samples.jsonl", sample)
        self.trackers.log_samples(self.progress.step, samples)

    # ---- checkpoints and the final model
    def checkpoint(self) -> None:
        self.trackers.flush()  # what the trackers hold up to this step is on disk before the checkpoint is
        files, sharded = self.model_files, self.model_files.sharded
        state = training_state(self.progress, None if sharded else self.optimizer, self.scheduler, self.scaler,
                               dataclasses.asdict(self.cfg), world_size=self.dist_info.world_size,
                               trackers=self.trackers.state(), **self.fingerprints)
        path = save_checkpoint(self.output_dir, self.write_checkpoint_files, state, self.dist_info,
                               write_shards=(lambda folder: files.write_shards(self.model, self.optimizer, folder))
                               if sharded else None, shared_folder=getattr(files, "shared_folder", None))
        if self.dist_info.is_main:
            prune_checkpoints(self.output_dir, self.cfg.save_total_limit)
            log.info("saved %s", path)

    def write_checkpoint_files(self, folder: Path) -> None:
        self.model_files.write_checkpoint(self.model, folder)
        share_identical_files(folder, [self.output_dir / "best"])  # best/ of this very step: stored once

    def resume_command(self) -> str:
        return resume_command(self.script, self.output_dir, self.dist_info.world_size)

    def epoch_progress(self) -> float:
        """Epochs done plus the share of this epoch's micro-batches done, as the Trainer's fractional `epoch`
        counts it (metrics.jsonl's `epoch` stays the whole epochs done)."""
        batch = max(self.plan.batch_size, 1)
        done, per_epoch = (-(-n // batch) for n in (self.progress.samples_in_epoch, self.sampler.samples_per_replica()))
        return round(self.progress.epoch + done / max(per_epoch, 1), 6)

    # ---- the data of an epoch
    def start_epoch(self) -> None:
        """The sampler at the run's position in its epoch, and a fresh iterator over the batches from there."""
        self.batches = None  # the previous epoch's workers stop before the next ones start
        self.sampler.set_epoch(self.progress.epoch)
        self.sampler.set_start(self.progress.samples_in_epoch)
        self.batches = iter(self.train_loader)

    def close(self) -> None:
        """Stop the trackers and the DataLoader's worker processes. The workers ignore SIGTERM (the main
        process saves on it), so they are not left to the interpreter's exit, which can hang joining them:
        the run holds the one reference to the epoch's iterator, and dropping it asks them to exit."""
        self.trackers.close()
        self.batches = None

    def save_final_model(self) -> None:
        """The final weights, tokenizer and generation config, directly in --output-dir."""
        self.model_files.release(self.model, self.output_dir, f"the final model in {self.output_dir}",
                                 self.dist_info, into=True)
        if self.dist_info.is_main:
            # The newest checkpoint (this step's) and best/ (when the last evaluation was the best) often hold
            # these very weights: hard links, not three copies (a 124M run: 2.4 GB otherwise).
            share_identical_files(self.output_dir, [*list_checkpoints(self.output_dir)[-1:], self.output_dir / "best"])
            log.info("%s holds %.1f MB (identical files stored once)", self.output_dir,
                     stored_bytes(self.output_dir) / 1e6)
