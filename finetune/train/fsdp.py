"""Sharded full fine-tuning with PyTorch's FSDP2 (`fully_shard`) and Distributed Checkpoint (DCP).

Every process holds 1/N of the weights, gradients and AdamW state (fp32 master weights); each transformer
block is its own group, gathered for its forward/backward and freed after, the root group holds the rest
(the tied token embedding / lm_head among it: torch refuses a shared parameter split across groups).

Checkpoints keep the layout of checkpoints.py (one folder, published whole) with the weights and the
optimizer in `sharded/`, written by DCP: each rank its own `__RANK_0.distcp`, rank 0 the `.metadata` that
maps every tensor to its pieces. DCP reads any such folder at any number of processes (it re-slices the
pieces), so a resume may change the world size. best/ and the final model are plain Hugging Face folders:
the full weights are gathered to rank 0's CPU, one tensor at a time on the way, and written once.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.core.fsio import atomic_folder, file_crc32
from finetune.formats.checkpoints import DCP_METADATA, SHARDED_FOLDER
from finetune.models.loading import ModelFiles
from finetune.runtime.distributed import DistInfo, all_gather_objects

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("finetune")



# -----------------------------------------------------------------------------
# Checks before anything loads


def settings_problems(cfg: TrainConfig) -> list[str]:
    """What --fsdp cannot be combined with, seen from the flags alone."""
    if not cfg.fsdp:
        return []
    problems = []
    if cfg.compile:
        problems.append("--fsdp with --compile is not supported (the sharding hooks and torch.compile are not "
                        "tested together here). HINT: drop --compile")
    if cfg.lora_r:
        problems.append("--fsdp with --lora-r is not supported: LoRA trains only the adapters, so the frozen "
                        "base is the one copy worth sharding, and its adapter checkpoints are written from "
                        "one unsharded model. HINT: LoRA runs under plain torchrun (DDP); use --fsdp without "
                        "--lora-r for full fine-tuning")
    return problems


def block_classes(model) -> list[str]:
    """The class names of the model's transformer blocks, as transformers names them (_no_split_modules:
    the modules it never splits across devices; for GPT-2, GPT2Block)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def find_blocks(model) -> list:
    """The outermost modules of the block classes (Mamba names its block and the mixer inside it)."""
    names, found, prefixes = set(block_classes(model)), [], []
    for name, module in model.named_modules():
        if name and type(module).__name__ in names and not any(name.startswith(p) for p in prefixes):
            found.append(module)
            prefixes.append(name + ".")
    return found


def check_on_meta_model(model_config) -> list[str]:
    """--fsdp needs the model's transformer blocks: looked for on a weightless copy, before loading."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)
    if find_blocks(model):
        return []
    classes = block_classes(model)
    looked_for = (f"modules of the classes its _no_split_modules names ({', '.join(classes)})" if classes
                  else "the block classes its _no_split_modules would name, and it names none")
    return [f"--fsdp: found no transformer blocks to shard in {type(model).__name__} (looked for {looked_for}). "
            f"HINT: train this model without --fsdp (torchrun alone replicates it), or use --lora-r"]


def resume_problems(cfg: TrainConfig, state: dict) -> list[str]:
    """An FSDP run resumes only an FSDP checkpoint: the other kind keeps the whole optimizer in one file."""
    sharded = bool(state.get("sharded"))
    if cfg.fsdp and not sharded:
        return ["--fsdp: the checkpoint was written without --fsdp (its optimizer state is one unsharded "
                "file), and a sharded run resumes only sharded checkpoints. HINT: resume without --fsdp, "
                "or start a new --fsdp run from its weights with --model CHECKPOINT"]
    return []


def rescaled_for_world_size(cfg: TrainConfig, state: dict, world_size: int, explicit: set[str]):
    """On a resume at another number of processes: the same global batch (batch x accum x processes), so the
    run continues on the same samples per step: the per-process share is --batch-size x --grad-accum, the
    micro-batch kept where it divides the share (else the largest that does). Returns (cfg, problem or None)."""
    import dataclasses

    saved = state["world_size"]
    if saved == world_size:
        return cfg, None
    global_batch = cfg.batch_size * cfg.grad_accum * saved
    if {"batch_size", "grad_accum"} & explicit:
        return cfg, (f"--batch-size and --grad-accum are chosen by a resume at another number of processes "
                     f"(the checkpoint's {saved}, now {world_size}), to keep the global batch of {global_batch} "
                     f"sequences. HINT: drop them from the command line")
    per_process = global_batch // world_size
    if global_batch % world_size:
        return cfg, (f"the checkpoint's global batch of {global_batch} sequences ({cfg.batch_size} x "
                     f"{cfg.grad_accum} accum x {saved} processes) does not split over {world_size} processes. "
                     f"HINT: resume with a number of processes that divides {global_batch}")
    batch = next(b for b in range(min(cfg.batch_size, per_process), 0, -1) if per_process % b == 0)
    rescaled = dataclasses.replace(cfg, batch_size=batch, grad_accum=per_process // batch)
    log.info("resharding: the checkpoint was written by %d process(es), this run has %d; the global batch "
             "stays %d sequences as --batch-size %d x --grad-accum %d per process", saved, world_size,
             global_batch, rescaled.batch_size, rescaled.grad_accum)
    return rescaled, None


# -----------------------------------------------------------------------------
# The process group and the sharding


def ensure_process_group(device) -> None:
    """FSDP and DCP work on a process group; a single process gets a group of one (no torchrun needed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def shard_model(model, device, precision: str):
    """fully_shard each transformer block, then the root. On a GPU in bf16, parameters are gathered in bf16
    and gradients reduced in fp32; the shards (the master weights AdamW steps) stay fp32 throughout."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" and precision == "bf16" else MixedPrecisionPolicy())
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_gradient_sync(model):
    """For an inner micro-step of gradient accumulation: DDP's no_sync(), or FSDP's gradients kept unreduced
    (no reduce-scatter) until the last micro-step."""
    if not is_sharded(model):
        return model.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_gradients(parameters, max_norm: float):
    """clip_grad_norm_ that also takes sharded (DTensor) gradients: their norm is one partial per rank, made
    whole (one all-reduce) before every rank scales its shard by the same factor. Returns the global norm."""
    import torch
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


# -----------------------------------------------------------------------------
# Checkpoints, best/ and the final model


def broadcast_path(path: Path | None, dist_info: DistInfo) -> Path:
    """Rank 0's temporary checkpoint folder, for every rank to write its shard into."""
    if not dist_info.enabled:
        return path
    import torch.distributed as dist

    box = [str(path) if dist_info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


class ShardedModelFiles(ModelFiles):
    """How an FSDP run writes its model: checkpoints as DCP shards (every rank), releases gathered."""

    sharded = True

    def __init__(self, tokenizer, dist_info: DistInfo):
        super().__init__(tokenizer)
        self.dist_info = dist_info

    def shared_folder(self, folder: Path | None) -> Path:
        return broadcast_path(folder, self.dist_info)

    def write_checkpoint(self, model, folder: Path) -> None:
        """Rank 0's part: the config, generation config and tokenizer; the weights are in the shards."""
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def write_shards(self, model, optimizer, folder: Path) -> dict[str, int]:
        """Every rank: its shard of the weights and of the AdamW state, through DCP; returns the CRC32 of
        every file of the sharded folder (each rank reads back only what it wrote)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        sharded = folder / SHARDED_FOLDER
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(sharded))
        rank = self.dist_info.rank
        mine = sorted(sharded.glob(f"__{rank}_*.distcp")) + ([sharded / DCP_METADATA] if rank == 0 else [])
        crcs = {}
        for part in all_gather_objects({f"{SHARDED_FOLDER}/{p.name}": file_crc32(p) for p in mine}, self.dist_info):
            crcs.update(part)
        return crcs

    def load_shards(self, model, optimizer, checkpoint: Path) -> None:
        """Every rank: the weights and AdamW state of its own shard, re-sliced by DCP to this world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_FOLDER))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])

    def release(self, model, final: Path, what: str, dist_info: DistInfo, into: bool = False) -> None:
        """best/ or the final model: the full weights gathered to rank 0 (a collective call), written there."""
        full = gather_full_state_dict(model)
        if dist_info.is_main:
            with atomic_folder(final, what, into=into) as tmp:
                write_full_model(model, full, self.tokenizer, tmp)
        del full

    def write_release(self, model, folder: Path) -> None:  # every release goes through release()
        raise AssertionError("ShardedModelFiles.release writes the releases")


def gather_full_state_dict(model) -> dict:
    """The whole model as plain tensors on rank 0's CPU (each tensor gathered, moved, then the next), an
    empty dict on the other ranks: no process ever holds more than one full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def without_tied_copies(model, state_dict: dict) -> dict:
    """One entry per parameter: the gathered copies of a tied one (lm_head.weight, the embedding's twin) are
    separate tensors, which save_pretrained would write twice; from_pretrained ties them again."""
    first_name, drop = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            drop.add(name)
        first_name.setdefault(id(param), name)
    return {name: tensor for name, tensor in state_dict.items() if name not in drop}


def write_full_model(model, state_dict: dict, tokenizer, folder: Path) -> None:
    """A from_pretrained-loadable folder from gathered weights, through a weightless (meta) copy of the model
    so that config.json names the model's own class, not FSDP's subclass of it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, trust_remote_code=False)
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder, state_dict=without_tied_copies(model, state_dict), safe_serialization=True)
    tokenizer.save_pretrained(folder)
