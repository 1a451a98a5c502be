"""Moving between the full sequence and this rank's shard in a layout (``layouts.py``).

``shard`` is a local gather (every rank holds the full tensor, keeps its own tokens);
``unshard`` all-gathers the shards over the group and puts every token back at its global position.
``shard_for`` / ``unshard_from`` are the same maps for an explicit rank and world size, without
communication (the simulator and tests use them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..checks import check_cu_seqlens
from ..comm.agree import agree
from ..comm.gather import all_gather_flat
from ..comm.groups import group_rank_world
from .doc_layouts import doc_positions, total_error
from .layouts import check_layout, local_len_error, positions


def _check(n: int, world: int, layout: str, dim: int) -> int:
    check_layout(layout)
    if n % world:
        raise ValueError(f"sequence length {n} (dim {dim}) must divide by the world size {world}")
    err = local_len_error(layout, world, n // world)
    if err:
        raise ValueError(err)
    return n // world


def _check_tensor(x, dim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim() or x.dim() == 0:
        raise ValueError(f"dim {dim} is not a dim of the {what} of shape {tuple(x.shape)}")


def _local_index(n: int, world: int, rank: int, dim: int, layout: str, cu_seqlens) -> torch.Tensor:
    """Stream (or sequence) indices of rank ``rank``'s tokens, in local order."""
    if cu_seqlens is None:
        return positions(layout, rank, world, _check(n, world, layout, dim))
    check_layout(layout, packed=True)
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else None
    vals = check_cu_seqlens(cu_seqlens, n, "cu_seqlens", device)
    cu = tuple(vals if vals is not None else cu_seqlens.tolist())  # the layout needs the values
    err = total_error(world, n, layout)
    if err:
        raise ValueError(err)
    return doc_positions(layout, cu, rank, world)


def shard_for(
    x: torch.Tensor, rank: int, world: int, dim: int = 1, layout: str | None = None, cu_seqlens=None
) -> torch.Tensor:
    """Rank ``rank``'s tokens of the full ``x`` (length along ``dim`` divisible by ``world``), contiguous."""
    _check_tensor(x, dim, "sequence to shard")
    idx = _local_index(x.shape[dim], world, rank, dim, layout, cu_seqlens).to(x.device)
    return x.index_select(dim, idx)


def unshard_from(
    shards: list[torch.Tensor], dim: int = 1, layout: str | None = None, cu_seqlens=None
) -> torch.Tensor:
    """The full tensor from every rank's shard (``shards[r]`` of rank ``r``)."""
    world = len(shards)
    n = shards[0].shape[dim] * world
    idx = torch.cat([_local_index(n, world, r, dim, layout, cu_seqlens) for r in range(world)])
    full = torch.empty_like(torch.cat(shards, dim))
    return full.index_copy_(dim, idx.to(shards[0].device), torch.cat(shards, dim))


def shard(
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    dim: int = 1,
    layout: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's shard of the full sequence ``x`` (the same on every rank) in ``layout``.

    Args:
        x: a tensor whose ``dim`` is the sequence, e.g. ``[B, S, H, D]`` (dim 1), input_ids
            ``[B, S]`` or a packed stream ``[T, H, D]`` / ``[T]`` (dim 0).
        group: the sequence-parallel group (None: default group, or one rank when not initialised).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"stripe"``; for a packed stream also
            ``"balanced"`` (whole documents per rank, long ones cut in zigzag pieces). Required:
            the layout of the attention function the shards go to (``ring_flash_attn_func``
            takes contiguous shards, ``zigzag_ring_flash_attn_func`` zigzag ones), since shards
            in another layout would give a wrong result without an error.
        cu_seqlens: int32 ``[N + 1]``, the documents of a packed stream (the global ones, the same
            on every rank). With it the layout applies per document (``doc_layouts``): zigzag cuts
            every document into ``2W`` nearly equal pieces, rank ``r`` holding pieces ``r`` and
            ``2W-1-r`` of each; stripe deals each document's tokens out in turn. Only the stream's
            length must divide by ``W``. Without it ``S`` must divide by ``W`` (by ``2W`` for zigzag).

    Returns:
        ``[..., S / W, ...]``: the rank's tokens in local order.

    Example:
        >>> pos = shard(torch.arange(S), group, dim=0, layout="zigzag")   # global positions, e.g. for RoPE
        >>> ids_l = shard(ids, group, dim=0, layout="zigzag", cu_seqlens=cu)   # a packed stream
        >>> pos_l = shard(position_ids, group, dim=0, layout="zigzag", cu_seqlens=cu)  # restart per doc
    """
    _, rank, world = group_rank_world(group)
    return shard_for(x, rank, world, dim, layout, cu_seqlens)


def unshard(
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    dim: int = 1,
    layout: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full sequence from every rank's shard ``x`` (all-gather over ``group``); not differentiable.
    Shards of other shapes or dtypes on some ranks raise ``ValueError`` on every rank."""
    g, _, world = group_rank_world(group)
    err, fields = None, {}
    try:
        _check_tensor(x, dim, "shard")
        check_layout(layout, packed=cu_seqlens is not None)
        fields = {
            "shard shape": tuple(x.shape),
            "dtype": str(x.dtype),
            "dim": dim % x.dim(),
            "layout": layout,
        }
    except ValueError as e:
        err = e
    agree([(g, world)], err, fields, "the group")
    if world == 1:
        return x.clone()
    parts = all_gather_flat(x, world, g).view(world, *x.shape).unbind(0)
    return unshard_from(list(parts), dim, layout, cu_seqlens)
