"""Hybrid (2-D) sequence parallelism, USP: Ulysses inside a group, ring attention across groups.

The sequence-parallel world of ``W = U * R`` ranks is a grid (``ringflash.comm.groups``): rank
``g = i * U + u`` is rank ``u`` of Ulysses group ``i`` and rank ``i`` of ring group ``u``.

How the global sequence of ``S`` tokens is sharded (``usp_shard`` does it, ``usp_positions`` tells):

    1. split it over the R ring ranks in the ring layout (contiguous / zigzag / stripe, as
       ``shard(x, ring_group, layout=layout)``): ring shard ``i`` has ``S / R`` tokens;
    2. split ring shard ``i`` contiguously over the U ranks of Ulysses group ``i``:
       rank ``g = i*U + u`` holds tokens ``[u*S/W, (u+1)*S/W)`` of ring shard ``i``.

    e.g. S = 16, U = 2, R = 2, zigzag: ring shard 0 = tokens {0..3, 12..15}, ring shard 1 = {4..11};
    rank 0: 0 1 2 3   rank 1: 12 13 14 15   rank 2: 4 5 6 7   rank 3: 8 9 10 11

With ``layout="contiguous"`` this is the plain contiguous sharding over all ``W`` ranks (rank g
holds ``[g*S/W, (g+1)*S/W)``), which is what DeepSpeed-Ulysses users already feed.

Forward: the Ulysses all-to-all turns ``[B, S/W, H, D]`` into ring shard ``i`` for heads
``[u*H/U, (u+1)*H/U)``: ``[B, S/R, H/U, D]``; ring attention runs over ring group ``u`` (all ranks
holding the same heads) and the reverse all-to-all brings ``[B, S/W, H, D]`` back. The query heads
must divide by ``U`` (KV heads are replicated as for Ulysses), so any sequence-parallel degree works:
``U = gcd(H, W)``, ``R = W / U``, and the ring takes over beyond the head count.
"""

from __future__ import annotations

import math

import torch

from ..comm.gather import all_gather_cat, all_gather_flat
from ..comm.groups import group_rank_world
from .layouts import check_layout, positions
from .sharding import shard_for
from .ulysses import sp_attention


def _groups(ulysses_group, ring_group):
    """``(ulysses, ring)`` as ``(group, rank, world)`` triples; ring None when there is no ring."""
    if ulysses_group is None and ring_group is None:
        return group_rank_world(None), None
    one = (None, 0, 1)
    uly = group_rank_world(ulysses_group) if ulysses_group is not None else one
    ring = group_rank_world(ring_group) if ring_group is not None else None
    if ring is not None and ring[2] == 1:
        ring = None
    return uly, ring


def usp_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    ulysses_group=None,
    ring_group=None,
    layout="zigzag",
    learnable_sink=None,
):
    """Hybrid Ulysses x ring attention (USP): exact attention over a 2-D sharded sequence.

    Args:
        q: ``[B, S/W, Hq, D]``, this rank's shard as made by ``usp_shard`` (see the module docstring);
            ``Hq`` must divide by the Ulysses degree ``U``.
        k, v: ``[B, S/W, Hk, D]``, ``Hq % Hk == 0``; KV heads are repeated ``lcm(Hk, U) / Hk`` times
            when ``Hk`` does not divide by ``U``.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic:
            as ``ulysses_attn_func`` (masks on global positions).
        return_attn_probs: also return the float32 LSE ``[B, Hq, S/W]`` as ``(out, lse, None)``.
        ulysses_group: the Ulysses group (consecutive ranks, from ``build_usp_groups``).
        ring_group: the ring group (ranks holding the same heads). Either may be None for a degree
            of 1; both None: Ulysses over the default group.
        layout: the ring layout, ``"zigzag"`` (balanced causal work), ``"stripe"`` or ``"contiguous"``.
        learnable_sink: ``[Hq]`` float tensor or None: one logit per query head joining every
            row's softmax denominator (no value), merged once after the ring.

    Returns:
        ``out [B, S/W, Hq, D]`` in q's dtype (or ``(out, lse, None)``).

    Example:
        >>> uly, ring = build_usp_groups(ulysses_degree=4, ring_degree=2)
        >>> q, k, v = (usp_shard(x, uly, ring, layout="zigzag") for x in (q_full, k_full, v_full))
        >>> out = usp_attn_func(q, k, v, causal=True, ulysses_group=uly, ring_group=ring)
    """
    uly, ring = _groups(ulysses_group, ring_group)
    opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
    return sp_attention(
        "usp_attn_func",
        q,
        k,
        v,
        opts,
        deterministic,
        return_attn_probs,
        uly,
        ring,
        layout,
        sink=learnable_sink,
    )


def usp_degrees(nheads: int, world: int) -> tuple[int, int]:
    """``(U, R)`` for ``nheads`` query heads over ``world`` ranks: the largest Ulysses degree that fits."""
    u = math.gcd(nheads, world)
    return u, world // u


def usp_positions_for(u: int, i: int, ulysses_degree: int, ring_degree: int, n_local: int, layout: str):
    """Global positions (int64 ``[n_local]``) held by grid rank ``(ring i, ulysses u)``."""
    check_layout(layout)
    ring_pos = positions(layout, i, ring_degree, n_local * ulysses_degree)
    return ring_pos[u * n_local : (u + 1) * n_local]


def _coords(ulysses_group, ring_group):
    (_, u, nu), ring = _groups(ulysses_group, ring_group)
    _, i, nr = ring if ring is not None else (None, 0, 1)
    return u, nu, i, nr


def usp_positions(n_local: int, ulysses_group=None, ring_group=None, layout: str = "zigzag") -> torch.Tensor:
    """Global positions (int64 ``[n_local]``) of this rank's tokens, e.g. for RoPE position_ids."""
    u, nu, i, nr = _coords(ulysses_group, ring_group)
    return usp_positions_for(u, i, nu, nr, n_local, layout if nr > 1 else "contiguous")


def usp_shard(x: torch.Tensor, ulysses_group=None, ring_group=None, dim: int = 1, layout: str = "zigzag"):
    """This rank's shard of the full sequence ``x`` (the same on every rank) for ``usp_attn_func``.

    Args:
        x: e.g. ``[B, S, H, D]`` (``dim=1``), input_ids ``[B, S]`` or positions ``[S]`` (``dim=0``);
            ``S`` must divide by ``W = U * R`` (and by ``2W`` for zigzag).

    Returns:
        ``[..., S / W, ...]``: ``shard(x, ring_group, layout)`` split contiguously over the Ulysses group.
    """
    u, nu, i, nr = _coords(ulysses_group, ring_group)
    lay = layout if nr > 1 else "contiguous"
    ring_shard = shard_for(x, i, nr, dim, lay)
    return shard_for(ring_shard, u, nu, dim, "contiguous")


def usp_unshard(x: torch.Tensor, ulysses_group=None, ring_group=None, dim: int = 1, layout: str = "zigzag"):
    """The full sequence from every rank's ``usp_shard`` (all-gathers; not differentiable)."""
    u, nu, i, nr = _coords(ulysses_group, ring_group)
    lay = layout if nr > 1 else "contiguous"
    n_local = x.shape[dim]
    ring_shard = all_gather_cat(x, nu, ulysses_group, dim)
    shards = list(all_gather_flat(ring_shard, nr, ring_group).view(nr, *ring_shard.shape).unbind(0))
    idx = torch.cat([positions(lay, r, nr, n_local * nu) for r in range(nr)]).to(x.device)
    full = torch.empty_like(torch.cat(shards, dim))
    return full.index_copy_(dim, idx, torch.cat(shards, dim))
