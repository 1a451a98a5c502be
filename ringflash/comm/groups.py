"""2-D (Ulysses x ring) process groups for hybrid sequence parallelism (USP).

A sequence-parallel group of ``W = U * R`` ranks (group ranks ``g = 0..W-1``) is laid out as a grid
with ``g = i * U + u``: ring index ``i`` (``0..R-1``), Ulysses index ``u`` (``0..U-1``).

    ulysses group i = {i*U + u : u = 0..U-1}     consecutive ranks (inside a node: all-to-all is
                                                 bandwidth hungry and wants NVLink)
    ring group u    = {i*U + u : i = 0..R-1}     strided ranks (across nodes: P2P overlaps compute)

``torch.distributed.new_group`` is collective over the whole default group: every process calls it
for every group, in the same order, even for groups it is not in. ``build_usp_groups`` does that
(or, with ``local_sync=True``, only the ranks of the group being split call it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class USPGroups:
    """The two groups of this rank and its grid coordinates (``rank = ring_rank * U + ulysses_rank``)."""

    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int

    def __iter__(self):  # ``ulysses_group, ring_group = build_usp_groups(...)``
        return iter((self.ulysses_group, self.ring_group))


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, rank, world_size)`` of ``group`` (None: the default group); ``(None, 0, 1)`` when
    torch.distributed is not initialised (every function then runs locally)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given, but torch.distributed is not initialised")
        return None, 0, 1
    g = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(g)
    if rank < 0:
        raise ValueError("this process is not a member of the process group it passed")
    return g, rank, dist.get_world_size(g)


def usp_grid(ulysses_degree: int, ring_degree: int, world: int) -> tuple[list[list[int]], list[list[int]]]:
    """Group ranks of every Ulysses group and every ring group for a world of ``world`` ranks."""
    if not (isinstance(ulysses_degree, int) and isinstance(ring_degree, int)):
        raise ValueError(f"degrees must be ints, got {ulysses_degree!r} x {ring_degree!r}")
    if ulysses_degree < 1 or ring_degree < 1 or ulysses_degree * ring_degree != world:
        raise ValueError(
            f"ulysses_degree x ring_degree = {ulysses_degree} x {ring_degree} = "
            f"{ulysses_degree * ring_degree} does not tile the sequence-parallel group of {world} ranks: "
            "the product must equal it"
        )
    uly = [[i * ulysses_degree + u for u in range(ulysses_degree)] for i in range(ring_degree)]
    ring = [[i * ulysses_degree + u for i in range(ring_degree)] for u in range(ulysses_degree)]
    return uly, ring


def build_usp_groups(
    ulysses_degree: int, ring_degree: int, group: dist.ProcessGroup | None = None, local_sync: bool = False
) -> USPGroups:
    """Build the Ulysses and ring groups of a ``ulysses_degree x ring_degree`` grid over ``group``.

    Every process of the default group must call this with the same arguments (``new_group`` is
    collective), also processes outside ``group``; they get ``None`` groups and rank -1.

    Args:
        ulysses_degree: ``U``, ranks per Ulysses group (consecutive ranks: keep it within a node).
        ring_degree: ``R``, ranks per ring group; ``U * R`` must equal the size of ``group``.
        group: the sequence-parallel group to split (None: the default group).
        local_sync: create the groups with ``use_local_synchronization=True``: only the ranks of
            ``group`` call (e.g. lazily, from one of several data-parallel replicas).

    Returns:
        ``USPGroups`` (unpacks as ``ulysses_group, ring_group``), with this rank's coordinates.
        Without torch.distributed initialised and ``U = R = 1``: ``None`` groups (local run).

    Example:
        >>> uly, ring = build_usp_groups(4, 2)         # 8 ranks: 2 nodes of 4 GPUs
        >>> out = usp_attn_func(q, k, v, causal=True, ulysses_group=uly, ring_group=ring)
    """
    if not (dist.is_available() and dist.is_initialized()):
        usp_grid(ulysses_degree, ring_degree, 1)
        return USPGroups(None, None, 1, 1, 0, 0)
    parent = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(parent)
    uly_sets, ring_sets = usp_grid(ulysses_degree, ring_degree, world)
    if group is not None:
        members = [dist.get_global_rank(parent, r) for r in range(world)]
    else:
        members = list(range(world))
    me = dist.get_rank(parent)  # -1 when this process is outside ``group``
    mine_u = mine_r = None
    for ranks in uly_sets:
        g = dist.new_group([members[r] for r in ranks], use_local_synchronization=local_sync)
        if me in ranks:
            mine_u = g
    for ranks in ring_sets:
        g = dist.new_group([members[r] for r in ranks], use_local_synchronization=local_sync)
        if me in ranks:
            mine_r = g
    if me < 0:
        return USPGroups(None, None, ulysses_degree, ring_degree, -1, -1)
    return USPGroups(mine_u, mine_r, ulysses_degree, ring_degree, me % ulysses_degree, me // ulysses_degree)
