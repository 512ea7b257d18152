"""--fsdp: full fine-tuning with the weights, gradients and AdamW state sharded across the processes (FSDP2),
checkpoints as DCP shards. The work is finetune/train/fsdp.py's; this says when the run asks for it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.train import fsdp

from .base import Strategy

if TYPE_CHECKING:
    from finetune.train.config import TrainConfig


class FsdpStrategy(Strategy):
    name = "fsdp"
    sharded = True
    loads_base = True    # an FSDP checkpoint holds shards: the model loads from --model, the shards after
    load_on_cpu = True   # fully_shard moves each group to the device and keeps only this rank's shard there

    def precision_problem(self, precision: str) -> str | None:
        if precision == "fp16":
            return ("--fsdp runs in fp32 or bf16, not fp16 (the loss scaler of fp16 does not take sharded "
                    "gradients here). HINT: --precision bf16 on a GPU that has it, else --precision fp32")
        return None

    def resumed_config(self, cfg: TrainConfig, state: dict, world_size: int,
                       explicit: set[str]) -> tuple[TrainConfig, str | None]:
        """Another number of processes: the same global batch."""
        if not state.get("sharded"):
            return cfg, None
        return fsdp.rescaled_for_world_size(cfg, state, world_size, explicit)

    def reshards(self, state: dict) -> bool:
        return bool(state.get("sharded"))

    def resume_problems(self, state: dict) -> list[str]:
        return fsdp.resume_problems(self.cfg, state)

    def model_problems(self, model_config, fingerprints: dict, state: dict | None) -> tuple[list[str], dict | None]:
        return fsdp.check_on_meta_model(model_config), None

    def shard(self, model, model_files, tokenizer, device, precision: str, dist_info):
        return fsdp.shard_model(model, device, precision), fsdp.ShardedModelFiles(tokenizer, dist_info)

    def replicate(self, model, device, dist_info):
        return model  # the shards are the processes' copies: no DDP on top

    def no_gradient_sync(self, model):
        return fsdp.no_gradient_sync(model)

    def restore(self, run, resume) -> None:
        """Weights and AdamW state, re-sliced to this many processes; the position in the epoch, per process:
        the same samples consumed in all, spread over this many."""
        run.model_files.load_shards(run.model, run.optimizer, resume.path)
        run.progress.samples_in_epoch = (run.progress.samples_in_epoch * resume.state["world_size"]
                                         // run.dist_info.world_size)
