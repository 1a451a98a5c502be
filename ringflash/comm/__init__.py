"""Process groups and communication: the ring P2P helper and launcher init helpers."""

from .init import DistInfo, init_distributed, init_from_deepspeed, init_from_mpi, init_from_torchrun
from .ring import Post, RingComm, SimProfile, Wait, run_on_group, run_simulated

__all__ = [
    "DistInfo",
    "Post",
    "RingComm",
    "SimProfile",
    "Wait",
    "init_distributed",
    "init_from_deepspeed",
    "init_from_mpi",
    "init_from_torchrun",
    "run_on_group",
    "run_simulated",
]
