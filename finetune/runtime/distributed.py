"""torchrun helpers: no-ops in a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_request: str) -> DistInfo:
    """Read torchrun's environment and join the process group (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    use_cuda = device_request in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def barrier(dist_info: DistInfo) -> None:
    if dist_info.enabled:
        import torch.distributed as dist
        dist.barrier()


def all_reduce_sum(tensor, dist_info: DistInfo):
    if dist_info.enabled:
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj, dist_info: DistInfo) -> list:
    """`obj` of every rank, in rank order (a list of one in a single process)."""
    if not dist_info.enabled:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def shutdown(dist_info: DistInfo) -> None:
    """Leave the process group: torchrun's, or the group of one a single --fsdp process made for itself."""
    import torch.distributed as dist

    if dist_info.enabled or (dist.is_available() and dist.is_initialized()):
        dist.destroy_process_group()


# What the backends say when a peer process is gone; DDP's gradient all-reduce raises from inside autograd's
# C++ engine, so no torch.distributed frame shows, only the message.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport", "NCCL")


def raised_in_a_collective(exc: BaseException) -> bool:
    """Whether `exc` came out of a collective whose peer is gone (gloo's "Connection closed by peer", NCCL's
    errors): a torch.distributed error type or frame, or the backends' words."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())) or any(words in str(exc) for words in PEER_LOST):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if "torch/distributed/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False
