"""Starting torch.distributed from a launcher's environment: torchrun, DeepSpeed or MPI.

These helpers are the only place in ringflash that reads environment variables.

- ``init_from_torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``
  (torchrun, torch.distributed.launch, and the deepspeed launcher also set these).
- ``init_from_deepspeed``: ``deepspeed.init_distributed`` when DeepSpeed is installed, else as torchrun.
- ``init_from_mpi``: ``mpirun -n 4 python train.py`` with no torchrun: mpi4py supplies rank and
  world size, rank 0 picks its address and a free port and broadcasts them over MPI, and
  torch.distributed then rendezvous over TCP (it does the communication, not MPI).
- ``init_distributed``: whichever of these the environment points at, or nothing (one process).
- ``init_process_group``: ``torch.distributed.init_process_group`` for code that starts the group
  itself, with the one import that keeps ``destroy_process_group`` complete (see its doc).

Each returns a ``DistInfo(rank, world_size, local_rank, backend)``; the backend defaults to NCCL
when CUDA is available, else gloo, and with NCCL the local rank's GPU becomes the current device.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None


def _default_backend(backend: str | None) -> str:
    if backend is not None:
        return backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_device(backend: str, local_rank: int) -> None:
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def init_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group`` with ``torch._dynamo`` imported first.

    Importing ``torch._dynamo`` while a default group exists (an optimizer's constructor does, e.g.
    ``torch.optim.AdamW``) keeps that group alive after ``destroy_process_group``: with torch 2.13
    its gloo worker threads then outlive the script into the interpreter's teardown, where one that
    still holds work can abort the process ("terminate called without an active exception") after
    a run that succeeded. Imported before the group exists, it keeps nothing.
    """
    _preimport_dynamo()
    dist.init_process_group(backend, **kwargs)


def _preimport_dynamo() -> None:
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # a build without it: nothing to pre-import
        pass


def _already() -> DistInfo | None:
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, dist.get_world_size(), local, str(dist.get_backend()))
    return None


def init_from_torchrun(backend: str | None = None, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Initialise from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``)."""
    done = _already()
    if done:
        return done
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"torchrun environment incomplete, missing {missing}: launch with torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = _default_backend(backend)
    _set_device(backend, local)
    kw = {"timeout": timeout} if timeout is not None else {}
    init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, backend)


def init_from_deepspeed(backend: str | None = None, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Initialise with ``deepspeed.init_distributed`` (without DeepSpeed: as ``init_from_torchrun``)."""
    done = _already()
    if done:
        return done
    try:
        import deepspeed
    except ImportError:
        return init_from_torchrun(backend, timeout)
    backend = _default_backend(backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    _set_device(backend, local)
    kw = {"timeout": timeout} if timeout is not None else {}
    _preimport_dynamo()
    deepspeed.init_distributed(dist_backend=backend, **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_from_mpi(
    backend: str | None = None, timeout: datetime.timedelta | None = None, master_port: int | None = None
) -> DistInfo:
    """Initialise under ``mpirun``/``srun --mpi``: rank and size from mpi4py, master address broadcast."""
    done = _already()
    if done:
        return done
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("init_from_mpi needs mpi4py (pip install mpi4py, plus an MPI such as mpich)") from e
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr = None
    if rank == 0:
        host = socket.gethostname()
        try:
            ip = socket.gethostbyname(host)
        except OSError:
            ip = "127.0.0.1"
        addr = (ip, master_port or _free_port())
    ip, port = comm.bcast(addr, root=0)
    backend = _default_backend(backend)
    _set_device(backend, local)
    kw = {"timeout": timeout} if timeout is not None else {}
    init_process_group(backend, init_method=f"tcp://{ip}:{port}", rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local, backend)


def launcher() -> str:
    """Which launcher started this process: ``"torchrun"``, ``"mpi"`` or ``"none"``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun"
    if any(v in os.environ for v in _MPI_VARS):
        return "mpi"
    return "none"


def init_distributed(backend: str | None = None, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Initialise torch.distributed from whichever launcher started this process.

    torchrun / deepspeed launcher (``RANK`` set) -> ``init_from_torchrun``; mpirun (MPI variables
    set) -> ``init_from_mpi``; a plain ``python`` run -> nothing: ``DistInfo(0, 1, 0, None)``, and
    every ringflash function runs locally.

    Example:
        >>> info = init_distributed()
        >>> out = zigzag_ring_flash_attn_func(q, k, v, causal=True)   # default group
    """
    done = _already()
    if done:
        return done
    kind = launcher()
    if kind == "torchrun":
        return init_from_torchrun(backend, timeout)
    if kind == "mpi":
        return init_from_mpi(backend, timeout)
    return DistInfo(0, 1, 0, None)
