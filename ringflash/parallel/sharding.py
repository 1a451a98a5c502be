"""Moving between the full sequence and this rank's shard in a layout (``layouts.py``).

``shard`` is a local gather (every rank holds the full tensor, keeps its own tokens);
``unshard`` all-gathers the shards over the group and puts every token back at its global position.
``shard_for`` / ``unshard_from`` are the same maps for an explicit rank and world size, without
communication (the simulator and tests use them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm.gather import all_gather_flat
from ..comm.groups import group_rank_world
from .layouts import check_layout, local_len_error, positions


def _check(n: int, world: int, layout: str, dim: int) -> int:
    check_layout(layout)
    if n % world:
        raise ValueError(f"sequence length {n} (dim {dim}) must divide by the world size {world}")
    err = local_len_error(layout, world, n // world)
    if err:
        raise ValueError(err)
    return n // world


def shard_for(x: torch.Tensor, rank: int, world: int, dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """Rank ``rank``'s tokens of the full ``x`` (length along ``dim`` divisible by ``world``), contiguous."""
    n_local = _check(x.shape[dim], world, layout, dim)
    idx = positions(layout, rank, world, n_local).to(x.device)
    return x.index_select(dim, idx)


def unshard_from(shards: list[torch.Tensor], dim: int = 1, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor from every rank's shard (``shards[r]`` of rank ``r``)."""
    world = len(shards)
    n_local = shards[0].shape[dim]
    _check(n_local * world, world, layout, dim)
    idx = torch.cat([positions(layout, r, world, n_local) for r in range(world)]).to(shards[0].device)
    full = torch.empty_like(torch.cat(shards, dim))
    return full.index_copy_(dim, idx, torch.cat(shards, dim))


def shard(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "zigzag"
) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` (the same on every rank) in ``layout``.

    Args:
        x: a tensor whose ``dim`` is the sequence, e.g. ``[B, S, H, D]`` (dim 1) or packed
            ``[T, H, D]`` (dim 0); ``S`` must divide by the world size (by ``2W`` for zigzag).
        group: the ring's process group (None: default group, or one rank when not initialised).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"stripe"``.

    Returns:
        ``[..., S / W, ...]``: the rank's tokens in local order.

    Example:
        >>> pos = shard(torch.arange(S), group, dim=0, layout="zigzag")   # global positions, e.g. for RoPE
    """
    _, rank, world = group_rank_world(group)
    return shard_for(x, rank, world, dim, layout)


def unshard(
    x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "zigzag"
) -> torch.Tensor:
    """The full sequence from every rank's shard ``x`` (all-gather over ``group``); not differentiable."""
    g, _, world = group_rank_world(group)
    if world == 1:
        return x.clone()
    parts = all_gather_flat(x, world, g).view(world, *x.shape).unbind(0)
    return unshard_from(list(parts), dim, layout)
