"""torch.distributed start-up for torchrun (``--launcher pytorch``): nccl with CUDA, gloo without."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_dist(launcher: str = "none", tcp_port: int = 18888) -> DistInfo:
    """``none``: one process. ``pytorch``: read torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
    (``--tcp_port`` is the rendezvous port only when ``MASTER_PORT`` is unset) and join the group."""
    if launcher == "none":
        return DistInfo()
    if launcher != "pytorch":
        raise ValueError(f"--launcher: expected 'none' or 'pytorch', got {launcher!r}")
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--launcher pytorch needs torchrun's environment ({', '.join(missing)} unset); "
                           "start with torchrun or tools/scripts/dist_train.sh")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(tcp_port))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def leave_process_group(info: DistInfo) -> None:
    """After a run that ended well: wait for every rank, then leave the process group. A group still
    alive when the interpreter shuts down can abort the process from gloo's threads (SIGABRT, "terminate
    called without an active exception"), and torchrun then fails a run whose checkpoints are written.
    Not for error paths: a rank that failed would leave the others waiting in the barrier."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
