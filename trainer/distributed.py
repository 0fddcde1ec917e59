"""Process-group set-up and teardown, device choice, and cross-rank helpers.

One code path everywhere: a single process on a laptop (we set the rendezvous variables ourselves),
``torchrun`` / the ``deepspeed`` launcher / ``srun`` on a cluster. CUDA present -> NCCL and one GPU
per process; otherwise DeepSpeed's CPU accelerator with gloo.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_rendezvous_environment() -> None:
    """Sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for a process no launcher started.

    Under Slurm without a launcher (``srun python -m ...``), the SLURM_* variables give the ranks.
    Without any, this is a single process; DeepSpeed would otherwise try MPI discovery.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; start it with "
                               "torchrun, the deepspeed launcher or srun")
        env["MASTER_PORT"] = str(_free_port())


def init_distributed() -> DistributedContext:
    """Joins (or creates) the process group and picks this process's device."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _fill_rendezvous_environment()
    import deepspeed  # after DS_ACCELERATOR: it picks its accelerator at import

    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device)


def teardown() -> None:
    """Barrier, then destroy the group (a rank skipping this sometimes aborts at exit)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


@torch.no_grad()
def sync_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Averages BN running statistics over ranks (DeepSpeed broadcasts parameters only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(world)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a few float64 numbers over ranks (exact for counts below 2**53)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
