"""Preference tuning with DPO (Rafailov et al. 2023), the sigmoid loss: for a pair (prompt x, chosen y_w,
rejected y_l),

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

with log pi(y|x) the completion's token log-probabilities summed in fp32 (finetune/data/pairs.py packs the pairs).
The step's loss is the mean over its pairs (all micro-batches, all processes), as TRL's DPOTrainer's.

The reference is the model the run starts from: its log-probabilities are computed once, in one pass over
both splits before step 0 (eval mode, the adapter switched off under LoRA, so the base), written with the run
(REFERENCE_FILE in --output-dir) and read back on a resume; no second model is held in memory. The guard: at
step 0 the policy is the reference, so every pair's loss must be ln 2 (the step-0 evaluation checks each
validation pair, and the first training step each of its pairs when nothing draws dropout); anything else
stops the run with one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np

from finetune.core.errors import UserError
from finetune.runtime.distributed import DistInfo, all_reduce_sum, barrier

from .base import Objective, packed_data_size_problems

REFERENCE_FILE = "reference_logps.npz"
LN2 = math.log(2.0)
GUARD_TOLERANCE = {"fp32": 1e-4, "16-bit": 5e-2}  # |pair loss - ln 2| at step 0
METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "logps_chosen", "logps_rejected")
log = logging.getLogger("finetune")


# -----------------------------------------------------------------------------
# Log-probabilities of the completions


def scored_rows(labels):
    """(B, T) bool: the positions whose logits are scored, logits[b, t] predicting labels[b, t + 1] != -100.
    Only these rows go through the output layer (the prompts', the first tokens' and the padding's logits are
    never computed: with a 50k vocabulary the output layer is most of a small model's work)."""
    import torch

    rows = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


@contextlib.contextmanager
def output_rows_only(model, rows):
    """Within it, the model's output layer sees only hidden[rows], so its logits are (rows.sum(), vocab)
    instead of (B, T, vocab). A forward pre-hook on the output layer, so it works through DDP's forward and
    peft's wrappers; a compiled model (a hook would recompile it each batch) or one without an output layer
    keeps its full logits, which the caller then indexes."""
    compiled = hasattr(getattr(model, "module", model), "_orig_mod")
    head = None if compiled else unwrapped(model).get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows], *args[1:]) if args else None)
    try:
        yield
    finally:
        handle.remove()


def target_logps(logits, targets, rows_per_chunk: int = 256):
    """logp[i] = log softmax(logits[i])[targets[i]] in fp32, for (N, vocab) logits of the scored rows only.
    Chunked like finetune/train/loss.py's kernels: no fp32 copy of the whole logits; in training the gradient
    (one_hot - softmax) is computed in the forward pass and kept in the logits' dtype."""
    import torch

    if not logits.requires_grad:
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, len(targets), rows_per_chunk):
            end = min(start + rows_per_chunk, len(targets))
            out[start:end] = _chunk_logps(logits[start:end], targets[start:end, None])[0]
        return out
    return chunked_target_logps_function().apply(logits, targets, rows_per_chunk)


def _chunk_logps(logits, target):
    """(the log-probabilities of `target` (rows, 1), the chunk's fp32 log-softmax)."""
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(1, target)[:, 0], log_probs


@functools.cache
def chunked_target_logps_function():
    import torch

    class ChunkedTargetLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets, rows_per_chunk):
            out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
            grad = torch.empty_like(logits)
            for start in range(0, len(targets), rows_per_chunk):
                end = min(start + rows_per_chunk, len(targets))
                target = targets[start:end, None]
                out[start:end], log_probs = _chunk_logps(logits[start:end], target)
                minus_probs = log_probs.exp_().neg_()
                minus_probs.scatter_add_(1, target, torch.ones_like(target, dtype=minus_probs.dtype))
                grad[start:end] = minus_probs
            ctx.save_for_backward(grad)
            return out

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            # in place: the saved gradient is used once (no retain_graph here), and this spares an (N, vocab) copy
            return grad.mul_(grad_output[:, None].to(grad.dtype)), None, None

    return ChunkedTargetLogps


def pair_logps(model, batch: dict, device):
    """Per pair slot of a batch of packed blocks: (log pi(chosen), log pi(rejected)) as a (B, pairs, 2) fp32
    tensor (0 for an empty slot), and the slots that hold a pair, (B, pairs) bool. The one forward pass every
    DPO quantity comes from; evaluation code (preference accuracy) can call it on any model."""
    import torch

    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    slot = batch["slot"].to(device, non_blocking=True)
    held = batch["pairs"].to(device, non_blocking=True) >= 0
    rows = scored_rows(labels)
    with output_rows_only(model, rows):
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    if logits.dim() == 3:  # the full logits (see output_rows_only)
        logits = logits[rows]
    scored = labels[:, 1:] != -100  # the tokens scored by `rows`, in the same (row-major) order
    logps = target_logps(logits, labels[:, 1:][scored])
    slots_per_row = 2 * held.shape[1]
    index = (slot[:, 1:] + slots_per_row * torch.arange(slot.shape[0], device=device)[:, None])[scored]
    sums = torch.zeros(slot.shape[0] * slots_per_row, dtype=torch.float32, device=device)
    sums = sums.index_add(0, index, logps)
    return sums.view(slot.shape[0], held.shape[1], 2), held


def unwrapped(model):
    """The module under DDP and torch.compile (the reference pass runs a different number of batches on each
    process, which must not go through DDP's collectives)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def adapter_off(model):
    """Under LoRA the base without the adapter (peft's disable_adapter); otherwise nothing changes."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


def logps_table(model, dataset, batch_size: int, ctx, device, dist_info: DistInfo, adapter: bool = True) -> np.ndarray:
    """(log pi(chosen), log pi(rejected)) of every pair of a PackedPairDataset, float64 (pairs in the split, 2),
    NaN for a skipped pair, in eval mode (`adapter` False: a LoRA model's base). Each process scores every
    world_size-th block, then the tables are summed. Every process runs the same number of forward passes (a
    sharded model's forward gathers from all of them): a process with fewer blocks repeats one and does not
    count it. Evaluation code (preference accuracy) can call it with any model and DistInfo() for one process."""
    import torch
    from torch.utils.data import DataLoader, Subset

    table = torch.zeros((dataset.packing.examples, 2), dtype=torch.float64, device=device)
    mine = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    per_process = -(-len(dataset) // dist_info.world_size)
    counted = torch.arange(per_process, device=device) < len(mine)
    order = mine + [mine[0] if mine else 0] * (per_process - len(mine))
    inner = unwrapped(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), contextlib.nullcontext() if adapter else adapter_off(inner):
            loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False)
            for start, batch in zip(range(0, per_process, batch_size), loader):
                with ctx:
                    logps, held = pair_logps(inner, batch, device)
                held &= counted[start:start + len(held), None]
                table[batch["pairs"].to(device)[held]] = logps[held].double()
    finally:
        inner.train(was_training)
    all_reduce_sum(table, dist_info)
    table = table.cpu().numpy()
    skipped = np.ones(len(table), dtype=bool)
    skipped[dataset.packing.numbers] = False
    table[skipped] = np.nan
    return table


def reference_table(model, dataset, batch_size: int, ctx, device, dist_info: DistInfo) -> np.ndarray:
    """The reference log-probabilities of one split: the starting model's (under LoRA, the base's)."""
    return logps_table(model, dataset, batch_size, ctx, device, dist_info, adapter=False)


# -----------------------------------------------------------------------------
# The objective


class PreferenceObjective(Objective):
    kind = "preference"

    def __init__(self, beta: float = 0.1):
        self.beta = float(beta)
        self.datasets: dict = {}
        self.guard_eval = False         # step 0 of a new run: every validation pair's loss must be ln 2
        self.guard_first_step = False   # ... and every pair of the first step, when nothing draws dropout
        self.tolerance = GUARD_TOLERANCE["fp32"]
        self.sums = {"train": None, "eval": None}
        self.stepped = False

    # ---- the data
    def prepare_tokenizer(self, tokenizer, meta: dict) -> None:
        template = meta["preference"].get("template")
        if template:  # conversational pairs: the template goes into every tokenizer saved
            tokenizer.chat_template = template
            self.chat_samples = True

    def packed_blocks(self, data_dir, meta: dict, block_size: int):
        from finetune.data.packing import packed_blocks
        from finetune.data.pairs import split_packing

        if block_size < 4:
            raise UserError(f"--block-size {block_size} is too small for preference pairs (each of a pair's two "
                            "sequences needs a prompt and a completion token). HINT: use --block-size 4 or more")
        return packed_blocks(data_dir, meta, block_size, packing_of=split_packing)

    def data_size_problems(self, meta: dict, plan, block_size: int, world_size: int) -> list[str]:
        return packed_data_size_problems(plan, block_size, world_size, "a pair to compare", "pairs",
                                         f"no pair left to compare in blocks of {block_size} tokens")

    def dataset(self, data_dir, split: str, block_size: int, meta: dict):
        from finetune.data.pairs import PackedPairDataset

        self.datasets[split] = PackedPairDataset.from_data_dir(data_dir, split, block_size, meta)
        return self.datasets[split]

    def run_settings(self, cfg, resuming: bool):
        """Dropout off unless --dropout is given, as TRL's DPOTrainer does: the reference log-probabilities are
        computed without dropout, so with it the policy's differ from them at step 0 by noise alone, and DPO
        trains on that noise (the rewards of an unchanged model are not 0)."""
        if cfg.dropout is not None or resuming:
            return cfg
        log.info("preference data: dropout off (--dropout 0), as for the reference; pass --dropout to keep some")
        return dataclasses.replace(cfg, dropout=0.0)

    # ---- before step 0: the reference
    def start(self, run, resume) -> None:
        cfg, path = run.cfg, Path(run.cfg.output_dir) / REFERENCE_FILE
        adapters = run.strategy.trains_adapters  # LoRA: the starting model is the base with the adapter off
        tables = read_reference(path, self.datasets) if resume is not None else None
        if tables is None and resume is not None and not adapters:
            raise UserError(f"{path} is missing or does not match the data, and the starting model it was computed "
                            "from is not this checkpoint: the run cannot go on exactly. HINT: start the run again "
                            "(--overwrite), from the same --model")
        if tables is None:  # a new run, or LoRA (whose reference, the base without adapter, is at hand)
            tables = {split: reference_table(run.model, dataset, cfg.batch_size, run.ctx, run.device,
                                             run.dist_info) for split, dataset in self.datasets.items()}
            if run.dist_info.is_main:
                write_reference(path, tables)
            barrier(run.dist_info)
            log.info("reference log-probabilities of %s computed (the starting model%s), kept in %s",
                     " and ".join(f"{len(t):,} {s} pairs" for s, t in tables.items()),
                     ", adapter off" if adapters else "", path)
        for split, dataset in self.datasets.items():
            dataset.reference = tables[split]
        if resume is None:
            self.guard_eval = True
            lora_dropout = cfg.lora_dropout if cfg.lora_dropout is not None else 0.05
            self.guard_first_step = cfg.dropout == 0 and not (adapters and lora_dropout > 0)
            self.tolerance = GUARD_TOLERANCE["fp32" if isinstance(run.ctx, contextlib.nullcontext) else "16-bit"]

    # ---- a training step
    def micro_batch_shares(self, window, window_samples, block_size, device, dist_info) -> list[float]:
        import torch

        self.guard_first_step, self.stepped = self.guard_first_step and not self.stepped, True

        pairs = torch.tensor(float(sum(int((batch["pairs"] >= 0).sum()) for batch in window)),
                             dtype=torch.float64, device=device)
        all_reduce_sum(pairs, dist_info)
        return [dist_info.world_size / max(pairs.item(), 1.0)] * len(window)

    def loss(self, model, batch, device):
        losses = self.pair_losses(model, batch, device, "train")
        if self.guard_first_step:
            self.check_step_zero(losses, "the first training step")
        return losses.sum()

    def pair_losses(self, model, batch, device, mode: str):
        """DPO's loss of each pair in the batch (statistics added to `mode`'s sums)."""
        import torch
        import torch.nn.functional as F

        logps, held = pair_logps(model, batch, device)
        policy = logps[held]
        reference = batch["reference"].to(device)[held].to(policy.dtype)
        if torch.isnan(reference).any():
            raise RuntimeError("a pair without reference log-probabilities reached the loss")
        rewards = self.beta * (policy - reference)  # (pairs, 2): chosen, rejected
        losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
        self.add_stats(mode, rewards.detach(), policy.detach())
        return losses

    def add_stats(self, mode: str, rewards, policy) -> None:
        import torch

        stats = torch.stack([rewards[:, 0].sum(), rewards[:, 1].sum(), (rewards[:, 0] - rewards[:, 1]).sum(),
                             (rewards[:, 0] > rewards[:, 1]).float().sum(), policy[:, 0].sum(), policy[:, 1].sum(),
                             torch.tensor(float(len(rewards)), device=rewards.device)]).double()
        self.sums[mode] = stats if self.sums[mode] is None else self.sums[mode] + stats

    def check_step_zero(self, losses, where: str) -> None:
        """The guard: at step 0 the policy is the reference, so each pair's loss is ln 2."""
        worst = float((losses.detach() - LN2).abs().max()) if len(losses) else 0.0
        if worst > self.tolerance:
            raise UserError(f"DPO's loss at step 0 ({where}) is {LN2 + worst:.6f} for a pair, not ln 2 = {LN2:.6f} "
                            f"(off by {worst:.2e}, more than {self.tolerance:g}): the reference log-probabilities "
                            "are not the starting model's, so the run would train against the wrong model. HINT: "
                            f"start the run again with --overwrite (recomputing {REFERENCE_FILE}); if it repeats, "
                            "the model computes differently from one pass to the next (report it)")

    # ---- validation
    def begin_eval(self) -> None:
        self.sums["eval"] = None

    def eval_sums(self, model, batch, device):
        losses = self.pair_losses(model, batch, device, "eval")
        if self.guard_eval:
            self.check_step_zero(losses, "the validation pairs")
        return losses.double().sum(), len(losses)

    # ---- what is logged
    def train_metrics(self, device, dist_info) -> dict:
        return self.reduced("train", "", device, dist_info)

    def eval_metrics(self, val_loss, device, dist_info) -> dict:
        self.guard_eval = False
        return self.reduced("eval", "val_", device, dist_info)

    def describe_eval(self, record: dict) -> str:
        if "val_rewards_accuracy" not in record:
            return "no pair"
        return (f"reward accuracy {record['val_rewards_accuracy']:.2f}, margin {record['val_rewards_margin']:.4f}, "
                f"chosen log-prob {record['val_logps_chosen']:.2f}")

    def reduced(self, mode: str, prefix: str, device, dist_info) -> dict:
        import torch

        sums = self.sums[mode] if self.sums[mode] is not None else torch.zeros(len(METRICS) + 1, dtype=torch.float64,
                                                                               device=device)
        self.sums[mode] = None
        sums = all_reduce_sum(sums.clone(), dist_info).tolist()
        count = sums[-1]
        return {prefix + name: value / count for name, value in zip(METRICS, sums)} if count else {}


# -----------------------------------------------------------------------------
# The reference file


def write_reference(path: Path, tables: dict) -> None:
    from finetune.core.fsio import atomic_path

    with atomic_path(path, f"the reference log-probabilities {path}") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **tables)


def read_reference(path: Path, datasets: dict) -> dict | None:
    """The tables of a run's reference file, or None when it is missing or holds other pairs."""
    if not path.is_file():
        return None
    with np.load(path) as stored:
        tables = {split: stored[split] for split in stored.files}
    for split, dataset in datasets.items():
        table = tables.get(split)
        if table is None or table.shape != (dataset.packing.examples, 2) or \
                np.isnan(table[dataset.packing.numbers]).any():
            return None
    return tables
