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

import torch

from ..backends import backend_for
from ..checks import check_cu_seqlens, check_max_seqlen, check_options, check_qkv, check_sink
from ..comm.agree import GRAPH_HINT, agree, records_graph
from ..comm.alltoall import seq_all_to_all
from ..comm.groups import group_rank_world
from ..ops import flash_attn_func, flash_attn_varlen_func
from .layouts import LAYOUTS, check_global_total, local_len_error
from .ring_funcs import RING_FUNCS

_HINTS = {"q shape": " (every rank needs a shard of equal length, batch and heads)", "gradients": GRAPH_HINT}


def kv_replication(hq: int, hk: int, ulysses_degree: int) -> int:
    """How many times each KV head is repeated for a Ulysses group of ``ulysses_degree`` ranks."""
    return math.lcm(hk, ulysses_degree) // hk


def _validate(q, k, v, opts, u, r, layout, cu_seqlens=None, max_seqlen=0):
    """This rank's arguments for Ulysses over ``u`` ranks (x a ring of ``r``), checked and normalised;
    with ``cu_seqlens`` a packed stream ``[T_local, H, D]`` (its global values are returned)."""
    causal, window, softcap, scale = check_options(*opts)
    packed = cu_seqlens is not None
    check_qkv(q, k, v, packed=packed, same_tokens=True)
    backend_for(q)
    cu = None
    if packed:
        if r > 1 or layout != "contiguous":
            raise ValueError("a packed stream goes through Ulysses alone, sharded contiguously")
        cu = check_cu_seqlens(cu_seqlens, None, "cu_seqlens (the global stream's)", q.device, allow_cpu=True)
        cu = tuple(cu if cu is not None else cu_seqlens.tolist())
        check_global_total(cu[-1], u, q.shape[0], "the group")
        check_max_seqlen(cu_seqlens, max_seqlen, "max_seqlen", list(cu))
    hq = q.shape[-2]
    if hq % u:
        g = math.gcd(hq, u * r)
        raise ValueError(
            f"Ulysses over {u} ranks needs the q heads ({hq}) to divide by {u}; repeating KV heads cannot "
            f"help. Use usp_attn_func with ulysses_degree dividing {hq} (e.g. {g} x ring {u * r // g}), "
            "where the ring takes over beyond the head count"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    if r > 1 and not packed:
        err = local_len_error(layout, r, q.shape[1] * u)
        if err:
            raise ValueError(err)
    return causal, window, softcap, scale, cu


def sp_attention(
    name,
    q,
    k,
    v,
    opts,
    deterministic,
    return_attn_probs,
    ulysses,
    ring,
    layout,
    error=None,
    cu_seqlens=None,
    max_seqlen=0,
    sink=None,
):
    """The Ulysses (x ring) core; ``opts`` as ``check_options`` takes them, ``ulysses``/``ring``
    are ``(group, rank, world)``, ``ring`` None: local attention after the all-to-all. ``error``:
    a problem the caller found, raised on every rank like any other. With ``cu_seqlens`` (global)
    q/k/v are a packed stream ``[T_local, H, D]`` sharded contiguously (Ulysses alone)."""
    ug, urank, u = ulysses
    rg, _, r = ring if ring is not None else (None, 0, 1)

    def exchange(tensors, scatter_dims, gather_dims):  # a Ulysses degree of 1 exchanges nothing
        return list(tensors) if u == 1 else seq_all_to_all(tensors, scatter_dims, gather_dims, ug)

    err, fields, cu = None, {}, None
    try:
        if error:
            raise ValueError(error)
        causal, window, softcap, scale, cu = _validate(q, k, v, opts, u, r, layout, cu_seqlens, max_seqlen)
        check_sink(sink, q)
        fields = {
            "function": name,
            "q shape": tuple(q.shape),
            "cu_seqlens": cu,
            "kv heads": k.shape[-2],
            "dtype": str(q.dtype),
            "causal": causal,
            "window_size": window,
            "softcap": softcap,
            "softmax_scale": scale,
            "layout": layout,
            "learnable_sink given": sink is not None,
            "gradients": records_graph(q, k, v),
        }
    except (ValueError, TypeError) as e:
        err = e
    agree([(ug, u), (rg, r)], err, fields, "the sequence-parallel group", _HINTS)
    packed = cu is not None
    if packed:  # the stream as a batch of one: the all-to-alls below are the padded ones
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    f = kv_replication(q.shape[2], k.shape[2], u)
    if f > 1:  # just enough copies for every rank to own whole KV heads; autograd sums them back
        k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
    qh, kh, vh = exchange([q, k, v], [2, 2, 2], [1, 1, 1])  # [B, S_ring_local, H/U, D]
    kw = dict(
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        softcap=softcap,
        deterministic=deterministic,
        return_attn_probs=True,
        # This rank's heads after the all-to-all are the u-th of U equal chunks.
        learnable_sink=None if sink is None else sink.view(u, -1)[urank],
    )
    if packed:  # every rank holds the whole stream for its heads: one packed call
        cud = torch.tensor(cu, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
        out, lse, _ = flash_attn_varlen_func(qh[0], kh[0], vh[0], cud, cud, longest, longest, **kw)
        out, lse = out.unsqueeze(0), lse.unsqueeze(0)
    elif ring is None:
        out, lse, _ = flash_attn_func(qh, kh, vh, **kw)
    else:
        out, lse, _ = RING_FUNCS[layout](qh, kh, vh, group=rg, **kw)
    if not return_attn_probs:
        out = exchange([out], [1], [2])[0]
        return out[0] if packed else out
    out, lse = exchange([out, lse], [1, 2], [2, 1])  # [B, S/W, Hq, D], [B, Hq, S/W]
    return (out[0], lse[0], None) if packed else (out, lse, None)


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
    learnable_sink=None,
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
        learnable_sink: ``[Hq]`` float tensor or None: one logit per query head joining every
            row's softmax denominator (no value); each rank merges its heads' sinks once.

    Returns:
        ``out [B, S/W, Hq, D]`` in q's dtype (or ``(out, lse, None)``).

    Raises:
        ValueError on every rank when any rank's arguments are invalid (heads not divisible by
        ``W``, shapes that differ between ranks, ...).

    Example:
        >>> q, k, v = (shard(x, group, layout="contiguous") for x in (q_full, k_full, v_full))
        >>> out = ulysses_attn_func(q, k, v, causal=True, group=group)   # [B, S/W, Hq, D]
    """
    opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
    ulysses = group_rank_world(group)
    return sp_attention(
        "ulysses_attn_func",
        q,
        k,
        v,
        opts,
        deterministic,
        return_attn_probs,
        ulysses,
        None,
        "contiguous",
        sink=learnable_sink,
    )


def ulysses_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    group=None,
    learnable_sink=None,
):
    """Ulysses over a packed stream of documents sharded contiguously across ``group``.

    The all-to-all gives every rank the whole stream for ``Hq / W`` heads, which attend in one
    packed call (each document only to itself), and a second all-to-all brings the output back.

    Args:
        q: ``[T_local, Hq, D]``, this rank's tokens ``[r*T/W, (r+1)*T/W)`` of the stream; ``Hq``
            must divide by ``W``. k, v: ``[T_local, Hk, D]`` (KV heads repeated as for Ulysses).
        cu_seqlens: int32 ``[N + 1]``, the global documents (``cu_seqlens[-1] == W * T_local``), on
            q's device or the CPU. max_seqlen: an int bounding the longest document.
        Other arguments: as ``ulysses_attn_func``.

    Returns:
        ``out [T_local, Hq, D]`` (or ``(out, lse [Hq, T_local], None)``).

    Raises:
        ValueError on every rank when any rank's arguments are invalid or the ranks disagree.

    Example:
        >>> q, k, v = (shard(x, group, dim=0, layout="contiguous") for x in (q_all, k_all, v_all))
        >>> out = ulysses_attn_varlen_func(q, k, v, cu, max_len, causal=True, group=group)
    """
    opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
    return sp_attention(
        "ulysses_attn_varlen_func",
        q,
        k,
        v,
        opts,
        deterministic,
        return_attn_probs,
        group_rank_world(group),
        None,
        "contiguous",
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        sink=learnable_sink,
    )
