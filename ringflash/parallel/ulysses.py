"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards and back.

With ``W`` ranks in the group and the sequence sharded contiguously (rank ``r`` holds tokens
``[r*S/W, (r+1)*S/W)`` of q, k and v, ``[B, S/W, H, D]``):

    q, k, v [B, S/W, H, D] --all-to-all (scatter heads, gather sequence)--> [B, S, H/W, D]
    local flash attention on the whole sequence for heads [r*H/W, (r+1)*H/W) of rank r
    out [B, S, H/W, D]     --all-to-all (scatter sequence, gather heads)--> [B, S/W, H, D]

q, k and v travel in one collective; the backward runs the reverse all-to-alls (autograd through
``ringflash.comm.alltoall.SeqAllToAll``) around the local kernel's backward. The result is exact:
every head sees every key, and the local kernel is the one ``flash_attn_func`` runs.

GQA/MQA: the query heads must divide by ``W``. When the KV heads ``Hk`` do not, each KV head is
repeated ``f = lcm(Hk, W) / Hk`` times before the all-to-all (``W / Hk`` times when ``Hk`` divides
``W``; never up to the query head count), so that query head ``h`` still meets KV head
``h // (Hq / Hk)`` on its rank; autograd sums the gradients of the copies back. When ``Hq`` does not
divide by ``W`` no replication helps: use ``usp_attn_func`` (hybrid Ulysses x ring), where any
sequence-parallel degree works.

The same core serves the hybrid (``hybrid.py``): after the Ulysses all-to-all, a ring over a second
group instead of the local kernel.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist

from ..comm.alltoall import seq_all_to_all
from ..ops import flash_attn_func
from .layouts import LAYOUTS, local_len_error
from .ring_attn import (
    gather_rows,
    group_rank_world,
    ring_flash_attn_func,
    stripe_flash_attn_func,
    zigzag_ring_flash_attn_func,
)

RING_FUNCS = {
    "contiguous": ring_flash_attn_func,
    "zigzag": zigzag_ring_flash_attn_func,
    "stripe": stripe_flash_attn_func,
}
_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_SIG = (
    "batch",
    "local seqlen",
    "q heads",
    "kv heads",
    "head dim",
    "v head dim",
    "dtype",
    "causal",
    "window_left",
    "window_right",
    "softcap",
    "softmax_scale",
    "layout",
)


def kv_replication(hq: int, hk: int, ulysses_degree: int) -> int:
    """How many times each KV head is repeated for a Ulysses group of ``ulysses_degree`` ranks."""
    return math.lcm(hk, ulysses_degree) // hk


def _fbits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _local_error(q, k, v, dropout_p, window_size, alibi_slopes, u, r, layout) -> str | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a tensor [B, S_local, H, D], got {getattr(t, 'shape', type(t))}"
        if t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}: expected float16, bfloat16 or float32"
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return "q, k, v must share a dtype and a device"
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p}: attention dropout is not supported by ringflash (pass 0.0)"
    if alibi_slopes is not None:
        return "alibi_slopes is not supported by sequence-parallel attention (pass None)"
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        return f"window_size must be a pair (left, right) with -1 for unbounded, got {window_size!r}"
    if k.shape[:-1] != v.shape[:-1]:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in batch, length or heads"
    if q.shape[:2] != k.shape[:2]:
        return (
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must hold the same tokens [B, S_local] "
            "(sequence parallelism shards queries and keys together)"
        )
    if q.shape[-1] != k.shape[-1] or max(q.shape[-1], v.shape[-1]) > 256:
        return f"q and k head dims must agree and be <= 256, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
    hq, hk = q.shape[2], k.shape[2]
    if hq % hk:
        return f"q heads ({hq}) must be a multiple of kv heads ({hk})"
    if hq % u:
        g = math.gcd(hq, u * r)
        return (
            f"Ulysses over {u} ranks needs the q heads ({hq}) to divide by {u}; repeating KV heads cannot "
            f"help. Use usp_attn_func with ulysses_degree dividing {hq} (e.g. {g} x ring {u * r // g}), "
            "where the ring takes over beyond the head count"
        )
    if layout not in LAYOUTS:
        return f"unknown layout {layout!r}: expected one of {LAYOUTS}"
    if r > 1:
        return local_len_error(layout, r, q.shape[1] * u)
    return None


def _signature(q, k, v, causal, window_size, softcap, scale, layout) -> list[int]:
    return [
        q.shape[0],
        q.shape[1],
        q.shape[2],
        k.shape[2],
        q.shape[3],
        v.shape[3],
        _DTYPES[q.dtype],
        int(bool(causal)),
        int(window_size[0]),
        int(window_size[1]),
        _fbits(softcap),
        _fbits(scale if scale is not None else -1.0),
        LAYOUTS.index(layout),
    ]


def agree(groups, err: str | None, sig: list[int]) -> None:
    """Raise ``ValueError`` on every rank of the grid when any rank's ``err`` is set or signatures differ.

    ``groups`` is ``[(group, world), ...]`` (the Ulysses group, then the ring group): an OR within
    the first, then across the second, reaches every rank of the 2-D grid in two small all-gathers,
    so a bad input on one rank never leaves the others waiting in an all-to-all.
    """
    real = [(g, w) for g, w in groups if w > 1]
    if not real:
        if err:
            raise ValueError(err)
        return
    sig = sig if not err else [0] * len(_SIG)
    row = torch.tensor([1 if err else 0, 0] + sig, dtype=torch.int64)
    mismatch = ""
    for g, w in real:
        members = [dist.get_global_rank(g, r) for r in range(w)]
        table = gather_rows(row, g, members)  # on the host, see ring_attn
        row = row.clone()
        row[0] = int(table[:, 0].max())
        ok = table[:, 0] == 0
        if ok.sum() > 1 and not mismatch:
            good = table[ok, 2:]
            for f, name in enumerate(_SIG):
                vals = good[:, f].tolist()
                if len(set(vals)) > 1:
                    mismatch = f"ranks of the group disagree on {name}: {vals}"
                    row[1] = 1
                    break
        row[1] = max(int(row[1]), int(table[:, 1].max()))
    if err:
        raise ValueError(f"{err} (raised on every rank of the sequence-parallel group)")
    if row[0]:
        raise ValueError(
            "another rank of the sequence-parallel group got invalid arguments (its error says which)"
        )
    if row[1]:
        raise ValueError(mismatch or "ranks of the sequence-parallel group disagree on their arguments")


def sp_attention(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    return_attn_probs,
    ulysses,
    ring,
    layout,
):
    """The Ulysses (x ring) core; ``ulysses``/``ring`` are ``(group, rank, world)``, ``ring`` None: local."""
    ug, _, u = ulysses
    rg, _, r = ring if ring is not None else (None, 0, 1)
    err = _local_error(q, k, v, dropout_p, window_size, alibi_slopes, u, r, layout)
    sig = [] if err else _signature(q, k, v, causal, window_size, softcap, softmax_scale, layout)
    agree([(ug, u), (rg, r)], err, sig)
    f = kv_replication(q.shape[2], k.shape[2], u)
    if f > 1:  # just enough copies for every rank to own whole KV heads; autograd sums them back
        k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
    qh, kh, vh = seq_all_to_all([q, k, v], [2, 2, 2], [1, 1, 1], ug)  # [B, S_ring_local, H/U, D]
    kw = dict(
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        deterministic=deterministic,
        return_attn_probs=True,
    )
    if ring is None:
        out, lse, _ = flash_attn_func(qh, kh, vh, **kw)
    else:
        out, lse, _ = RING_FUNCS[layout](qh, kh, vh, group=rg, **kw)
    if not return_attn_probs:
        return seq_all_to_all([out], [1], [2], ug)[0]
    out, lse = seq_all_to_all([out, lse], [1, 2], [2, 1], ug)  # [B, S/W, Hq, D], [B, Hq, S/W]
    return out, lse, None


def ulysses_attn_func(
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
    group=None,
):
    """Ulysses sequence-parallel attention: exact attention over a contiguously sharded sequence.

    Rank ``r`` of the ``W`` ranks of ``group`` holds tokens ``[r*S/W, (r+1)*S/W)`` (use
    ``shard(x, group, layout="contiguous")``). Heads are exchanged for sequence by an all-to-all,
    the local kernel attends over the whole sequence for ``Hq/W`` heads, and a second all-to-all
    brings the output back to sequence shards. Causal and window masks are on global positions.

    Args:
        q: ``[B, S/W, Hq, D]``, this rank's shard; ``Hq`` must divide by ``W``.
        k, v: ``[B, S/W, Hk, D]`` with ``Hq % Hk == 0``. When ``Hk`` does not divide by ``W`` each
            KV head is repeated ``lcm(Hk, W) / Hk`` times (``W / Hk`` for ``Hk < W``); exact.
        dropout_p: must be 0. alibi_slopes: must be None.
        softmax_scale: defaults to ``D ** -0.5``.
        causal, window_size, softcap: as ``flash_attn_func``, on global positions.
        deterministic: passed to the local kernel.
        return_attn_probs: also return the float32 LSE of this rank's shard:
            ``(out, lse [B, Hq, S/W], None)``.
        group: the sequence-parallel group (None: the default group; not initialised: run locally).

    Returns:
        ``out [B, S/W, Hq, D]`` in q's dtype (or ``(out, lse, None)``).

    Raises:
        ValueError on every rank when any rank's arguments are invalid (heads not divisible by
        ``W``, shapes that differ between ranks, ...).

    Example:
        >>> q, k, v = (shard(x, group, layout="contiguous") for x in (q_full, k_full, v_full))
        >>> out = ulysses_attn_func(q, k, v, causal=True, group=group)   # [B, S/W, Hq, D]
    """
    ulysses = group_rank_world(group)
    return sp_attention(
        q,
        k,
        v,
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        deterministic,
        return_attn_probs,
        ulysses,
        None,
        "contiguous",
    )
