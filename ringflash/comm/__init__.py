"""Process groups and communication: the ring P2P helper (send/receive, or copy engines within a
node: ``copy_engine.py``), all-to-all, 2-D groups, launcher init helpers."""

from .alltoall import all_to_all, seq_all_to_all
from .groups import USPGroups, build_usp_groups
from .init import (
    DistInfo,
    init_distributed,
    init_from_deepspeed,
    init_from_mpi,
    init_from_torchrun,
    init_process_group,
)
from .ring import Post, RingComm, SimProfile, Wait, run_on_group, run_simulated

__all__ = [
    "DistInfo",
    "USPGroups",
    "all_to_all",
    "build_usp_groups",
    "Post",
    "RingComm",
    "SimProfile",
    "Wait",
    "init_distributed",
    "init_from_deepspeed",
    "init_from_mpi",
    "init_from_torchrun",
    "init_process_group",
    "run_on_group",
    "run_simulated",
    "seq_all_to_all",
]
