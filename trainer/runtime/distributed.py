"""Process-group set-up and teardown, device choice, and cross-rank helpers.

One code path everywhere: a single process on a laptop (we set the rendezvous variables ourselves),
``torchrun`` / the ``deepspeed`` launcher / ``srun`` on a cluster. CUDA present -> NCCL and one GPU
per process; otherwise DeepSpeed's CPU accelerator with gloo.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from binaryduo.slurm.hostlist import first_host


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


def slurm_port(job_id: int) -> int:
    """A rendezvous port derived from the job id (jobs sharing a node do not collide unless
    their ids are 20,000 apart); the sbatch template exports the same number."""
    return 15000 + job_id % 20000


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
        if "MASTER_ADDR" not in env and env.get("SLURM_JOB_NODELIST"):
            env["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
        if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
            env["MASTER_PORT"] = str(slurm_port(int(env["SLURM_JOB_ID"])))
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
        timeout = timedelta(seconds=float(os.environ.get("BINARYDUO_DIST_TIMEOUT_S", 1800)))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=timeout)
    return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device)


def teardown(clean: bool = True) -> None:
    """Barrier, then destroy the group (a rank skipping this sometimes aborts at exit).

    After an error (``clean=False``) there is no barrier -- the other ranks may be inside a
    collective this rank will never join; destroying the group closes this rank's connections,
    so gloo peers fail at once instead of waiting for the timeout, and launchers (torchrun, the
    deepspeed launcher, ``srun --kill-on-bad-exit``) stop the rest of the job."""
    if not dist.is_initialized():
        return
    if not clean:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already failing; the original error matters
            pass
        return
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


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Sums a few float64 numbers over ranks (exact for counts below 2**53); one host read.
    ``values`` may already be a float64 tensor on ``device`` (built by device ops: then nothing
    waits for the device before the read)."""
    tensor = values if isinstance(values, torch.Tensor) else \
        torch.tensor(values, dtype=torch.float64, device=device)
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


class PeerRankError(RuntimeError):
    """Raised on every other rank when work done on rank 0 alone failed."""


def on_main_then_broadcast(fn, is_main: bool):
    """``fn()`` on rank 0, its result on every rank. If it raises, every rank raises (rank 0 the
    original, the others :class:`PeerRankError` naming it): no rank is left waiting in a
    collective for a peer that has left."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    outcome, error = None, None
    if is_main:
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    kind, value = broadcast_object(outcome)
    if kind == "ok":
        return value
    if error is not None:
        raise error
    raise PeerRankError(f"rank 0 failed: {value}")


def any_rank(flag: torch.Tensor | bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce)."""
    tensor = torch.as_tensor(flag, device=device).to(torch.int32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_gather_objects(value) -> list:
    """Every rank's Python object, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


@torch.no_grad()
def assert_replicas_agree(model: torch.nn.Module, what: str) -> None:
    """Raises if the ranks' copies of ``model`` (parameters and buffers) differ at all.

    A cheap guard (one float64 sum per tensor, one all-gather) against silent desynchronisation:
    data-parallel replicas must be identical after BN statistics are synced."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tensors = list(model.state_dict().items())
    sums = torch.stack([t.detach().to(torch.float64).sum() if t.numel() else
                        torch.zeros((), dtype=torch.float64, device=t.device)
                        for _, t in tensors]).to(tensors[0][1].device)
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    for rank, other in enumerate(gathered[1:], start=1):
        differ = (other != gathered[0]).nonzero().flatten().tolist()
        if differ:
            names = ", ".join(tensors[i][0] for i in differ[:5])
            raise RuntimeError(f"{what}: rank {rank}'s model differs from rank 0's in {names}"
                               f"{' ...' if len(differ) > 5 else ''}")
