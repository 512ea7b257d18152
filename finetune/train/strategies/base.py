"""The interface of a strategy: what it refuses, what it checks before the weights load, its memory per
process, how the model is loaded, converted, sharded or replicated and written (its ModelFiles), how a
training step skips the gradient sync and clips, and what a resume restores besides the training state.
The defaults are full fine-tuning in one process or under DDP. One instance per run."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from finetune.runtime.distributed import DistInfo
    from finetune.train.config import TrainConfig


class Strategy:
    name = "base"
    sharded = False          # the weights are split across processes (each takes part in every forward pass)
    trains_adapters = False  # only adapters train; the base is frozen
    loads_base = False       # the weights load from --model, a checkpoint holds only the strategy's part of them
    load_on_cpu = False      # the weights load into CPU memory (a sharder moves its share to the device)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # ---- settings (before anything loads)
    def precision_problem(self, precision: str) -> str | None:
        """A precision this strategy cannot train in (resolved from --precision)."""
        return None

    # ---- a --resume (the checkpoint's state, before the weights load)
    def resumed_config(self, cfg: TrainConfig, state: dict, world_size: int,
                       explicit: set[str]) -> tuple[TrainConfig, str | None]:
        """The resumed settings as this strategy continues them at `world_size` processes; (cfg, problem)."""
        return cfg, None

    def reshards(self, state: dict) -> bool:
        """Whether the checkpoint can be resumed at another number of processes."""
        return False

    def resume_problems(self, state: dict) -> list[str]:
        """A checkpoint this strategy cannot continue."""
        return []

    # ---- the model's config and tokenizer (preflight)
    def tokenizer_and_config(self, resume_path: Path | None):
        """(tokenizer, model config) of the run: from the checkpoint a resume continues, else from --model."""
        from finetune.models.loading import load_tokenizer_and_config

        return load_tokenizer_and_config(str(resume_path) if resume_path else self.cfg.model)

    def model_problems(self, model_config, fingerprints: dict, state: dict | None) -> tuple[list[str], dict | None]:
        """What this strategy finds wrong with the model, on a weightless copy; (problems, adapter counts).
        May add to `fingerprints` what a resume is checked against."""
        return [], None

    # ---- memory per process (preflight)
    def memory_per_process(self, model_config, n_params: int, plan, precision: str, world_size: int, device,
                           sharing, lora_counts: dict | None) -> tuple[float, str | None]:
        """(GiB per process, the line comparing DDP with FSDP or None). With more than one process, what each
        engine needs per process, side by side."""
        from finetune.train.plan import estimate_fsdp_memory_gib, estimate_memory_gib, sharding_line

        cfg = self.cfg
        memory_gib = estimate_memory_gib(model_config, n_params, cfg, plan, precision, lora_counts, device.type)  # DDP's
        if not (self.sharded or world_size > 1):
            return memory_gib, None
        fsdp_gib = estimate_fsdp_memory_gib(model_config, n_params, cfg, plan, precision, world_size, device.type)
        sharding = sharding_line(memory_gib, fsdp_gib, world_size, self.sharded, device, sharing)
        return (fsdp_gib if self.sharded else memory_gib), sharding

    # ---- the model (set-up)
    def weights_source(self, model_source: str) -> str:
        """Where the weights load from: the checkpoint a resume continues (or --model), or the base."""
        return self.cfg.model if self.loads_base else model_source

    def load_device(self, device: torch.device) -> torch.device:
        import torch

        return torch.device("cpu") if self.load_on_cpu else device

    def convert(self, model, tokenizer, model_source: str, precision: str):
        """The loaded model made trainable by this strategy, and how to write it: (model, ModelFiles)."""
        from finetune.models.loading import ModelFiles

        return model, ModelFiles(tokenizer)

    def shard(self, model, model_files, tokenizer, device: torch.device, precision: str, dist_info: DistInfo):
        """Before the optimizer, which steps what this returns: (model, ModelFiles)."""
        return model, model_files

    def replicate(self, model, device: torch.device, dist_info: DistInfo):
        """More than one process: DDP, a replica of the model in each, gradients all-reduced."""
        if not dist_info.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- a training step
    def no_gradient_sync(self, model) -> Any:
        """For an inner micro-step of gradient accumulation under more than one process."""
        return model.no_sync()

    def clip_gradients(self, parameters, max_norm: float):
        """Gradients clipped to `max_norm`; returns the global norm before clipping."""
        from finetune.train.fsdp import clip_gradients

        return clip_gradients(parameters, max_norm)

    def card_rows(self) -> list[tuple[str, str]]:
        """(setting, value) rows of the model card's training table that only this strategy has."""
        return []

    # ---- a --resume (after the set-up)
    def restore(self, run, resume) -> None:
        """What this strategy keeps in the checkpoint besides the training state, restored into `run`."""

