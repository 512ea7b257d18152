"""evaluate.py in several processes (`--nproc N`, or torchrun), each scoring a share of the work.

Every process reads and tokenizes the same data and cuts it into the same batches (the inputs are read in a
fixed order and the batches formed alike), so the batches are the very ones one process would run. Batch k
of a model (counted across its evaluations) is run by process k mod N; a process fills the batches it does
not run with zeros, and the sums (log-likelihoods, per document, per choice, per pair; a val split's loss
sums) are added across the processes at the end of each evaluation. Each batch is the same forward pass as
in one process, and a sum of partial sums differs from the one-process sum only in the order its float64
terms are added, so the figures equal the one-process run's (accuracies exactly). Greedy completions (exact
match) go to process i mod N by question; samples (--prompt) run on the first process only. Only the first
process prints the table and writes the report.

The processes are started as the training script starts them (finetune/runtime/launcher.py: torch's launcher,
one OMP_NUM_THREADS share of the cores each); runtime/distributed.py joins the process group (gloo on CPU, NCCL on
CUDA: one GPU each) and is a no-op in one process.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

from finetune.runtime import launcher
from finetune.runtime.distributed import DistInfo, all_gather_objects, all_reduce_sum

RESTART_HINT = "run the same command again"  # after a process was killed: nothing to resume, nothing written


def nproc_problems(nproc: int | None, lm_eval: bool) -> list[str]:
    """--nproc alone: at least 1, torchrun's number under torchrun, and no lm-eval (which runs whole in the
    process it is called from, so N processes would each run all of it)."""
    if nproc is None:
        return []
    if nproc < 1:
        return [f"--nproc must be at least 1, got {nproc}. HINT: --nproc 2 scores in 2 processes on this "
                "machine; leave it out for one"]
    problems = launcher.nproc_problems(nproc, False)
    if nproc > 1 and lm_eval:
        problems.append(f"--lm-eval runs lm-evaluation-harness whole in one process, so --nproc {nproc} would run "
                        "it in each. HINT: run --lm-eval in its own evaluate.py call without --nproc")
    return [p.replace("python finetune_generative.py", "python evaluate.py") for p in problems]


def wanted(nproc: int | None) -> bool:
    """Whether this process is to start the others (--nproc 2 or more, not already under torchrun)."""
    return launcher.wanted(nproc, False)


def start(nproc: int, script: str, argv: list[str], device_request: str) -> int:
    """Run `script argv` in `nproc` processes on this machine (each joins the group: join()); the exit code."""
    return launcher.launch(nproc, script, argv, device_request, restart_hint=RESTART_HINT)


def join(device_request: str) -> DistInfo:
    from finetune.runtime.distributed import setup_distributed

    return setup_distributed(device_request)


def work_problems(processes: int, shares: int, prompts_only: bool) -> list[str]:
    """More processes than the work can be shared among: some would have nothing to do."""
    if processes <= 1:
        return []
    if prompts_only:
        return [f"--nproc {processes}: samples (--prompt) run in one process, and there is nothing else to "
                "evaluate. HINT: drop --nproc"]
    if shares < processes:
        return [f"--nproc {processes}: this evaluation has work for at most {shares} process(es) (a batch of "
                f"windows, of val blocks or pairs, or an exact-match question each), so "
                f"{processes - shares} would have nothing to do. HINT: --nproc {max(shares, 1)}"
                f"{', or leave it out' if shares <= 1 else ''}"]
    return []


def batches_at_most(items: int, batch_size: int) -> int:
    return math.ceil(items / batch_size)


class Shard:
    """Which batches this process runs: batch k of a model (k counted over all its evaluations) belongs to
    process k mod world_size."""

    def __init__(self, dist_info: DistInfo | None = None, device=None):
        self.dist_info = dist_info or DistInfo()
        self.device = device
        self.batches = 0

    @property
    def world_size(self) -> int:
        return self.dist_info.world_size

    @property
    def rank(self) -> int:
        return self.dist_info.rank

    def owns_next_batch(self) -> bool:
        mine = self.batches % self.world_size == self.rank
        self.batches += 1
        return mine

    def owns_item(self, index: int) -> bool:
        """An item of work handed out by its number (an exact-match question)."""
        return index % self.world_size == self.rank

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Elementwise sum of `values` (float64) over the processes; `values` itself in one process."""
        values = np.asarray(values, dtype=np.float64)
        if not self.dist_info.enabled:
            return values
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        return all_reduce_sum(tensor, self.dist_info).cpu().numpy()

    def gather(self, obj) -> list:
        """`obj` of every process, in rank order."""
        return all_gather_objects(obj, self.dist_info)


def most_shares(evaluations: list, contexts: list[int], runs: list) -> int:
    """The most processes that get work: a process gets some when a model has more batches (counted over its
    evaluations) than its rank. `contexts` and `runs`: each model's context and training run (or None)."""
    best = 0
    for context, run in zip(contexts, runs):
        shares = 0
        for evaluation in evaluations:
            if hasattr(evaluation, "for_model"):  # the val split: in the blocks of the model's own run
                evaluation = evaluation.for_model(run)
            shares += evaluation.most_shares(context) if hasattr(evaluation, "most_shares") else 0
        best = max(best, shares)
    return best


def processes_wanted(nproc: int | None) -> int:
    """How many processes will evaluate: --nproc, else torchrun's, else 1."""
    return nproc or int(os.environ.get("WORLD_SIZE", "1"))


def run_in_processes(dist_info: DistInfo, evaluate) -> int:
    """`evaluate()` in this process of the group; a peer that is gone (killed, crashed) is one line here, the
    launcher or torchrun saying which; the group is left at the end."""
    from finetune.core.errors import first_line
    from finetune.runtime.distributed import raised_in_a_collective, shutdown

    try:
        return evaluate()
    except RuntimeError as exc:
        if not (dist_info.enabled and raised_in_a_collective(exc)):
            raise
        print(f"error: process {dist_info.rank} lost the other processes of the evaluation ({first_line(exc, 100)}), "
              "so it stopped too. HINT: the line of the process that failed says why; nothing was written: run "
              "the same command again", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown(dist_info)
