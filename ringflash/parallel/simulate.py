"""A ring of ``W`` virtual ranks in one process: the real ring loop with a simulated communicator.

Every virtual rank runs ``ring_loop``'s generators on the same device and their messages go
through in-process mailboxes (``ringflash.comm.ring.run_simulated``). Tests use it to check the
loop without processes; the one-GPU benchmark uses its per-rank timings (``profile=True``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from ..backends import backend_for
from ..comm.ring import Post, SimProfile, Wait, run_simulated
from .allgather import (
    METHODS,
    _add_home,
    _in_stream_order,
    _outgoing,
    _sizes,
    bwd_delta,
    bwd_state,
    default_heads_k_stride,
    fwd_state,
    head_pieces,
    heads_bwd,
    heads_fwd,
)
from .doc_layouts import build_doc_plan, padded_layout
from .gather_plan import gather_plan
from .layouts import Plan, build_plan
from .method_cost import choose_method, compute_rates
from .options import ring_prefetch
from .ring_loop import TAG_DKV, TAG_KV, ring_bwd_loop, ring_fwd_loop


def simulate_plans(
    world: int,
    n_local: int,
    layout: str = "contiguous",
    causal: bool = False,
    window_size=(-1, -1),
    cu_seqlens=None,
) -> list[Plan]:
    """The plans of all ``world`` virtual ranks (``cu_seqlens``: global, for the packed form)."""
    window = (int(window_size[0]), int(window_size[1]))
    if cu_seqlens is None:
        return [build_plan(layout, r, world, n_local, causal, window) for r in range(world)]
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if cu[-1] != world * n_local:
        raise ValueError(f"global cu_seqlens total {cu[-1]} != world * local tokens {world * n_local}")
    return [build_doc_plan(layout, tuple(cu), r, world, bool(causal), window) for r in range(world)]


def _cu(cu_seqlens) -> tuple[int, ...]:
    return tuple(
        int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)
    )


def _one_document(layout, cu_seqlens, plans: list[Plan], method: str, call) -> str | None:
    """The padded layout a packed call of a single document runs as (``doc_layouts.padded_layout``),
    unless it takes the all-gather method; None for other calls."""
    if cu_seqlens is None or _method(method, plans, layout, cu_seqlens, *call) == "allgather":
        return None
    return padded_layout(layout, _cu(cu_seqlens), len(plans))


def _method(method: str, plans: list[Plan], layout: str, cu_seqlens, q, k, causal, window) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if method != "auto":
        return method
    # As for a call with gradients, so that the forward and backward simulations pick the same
    # way; the simulator's messages are device copies: its link is the device's memory.
    link = compute_rates(q.device, q.shape[-1])[1]
    window = (int(window[0]), int(window[1]))
    return choose_method(
        layout, _cu(cu_seqlens), len(plans), bool(causal), window, plans[0].reach, q, k, True, link
    )


def simulate_ring_attn(
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    layout: str = "contiguous",
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    cu_seqlens=None,
    profile: bool = False,
    sync: Callable[[], None] | None = None,
    cuda_events: bool = False,
    prefetch: int | None = None,
    method: str = "ring",
    heads_k_stride: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], SimProfile | None]:
    """Forward ring attention of ``W = len(qs)`` virtual ranks.

    Args:
        qs, ks, vs: per-rank shards ``[B, S_local, H, D]`` (or packed ``[T_local, H, D]`` with the
            global ``cu_seqlens``), e.g. from ``shard_for``.

        profile, sync, cuda_events: per-rank timing between communication points, as in
            ``ringflash.comm.ring.run_simulated``.
        prefetch: K/V blocks each rank holds and computes at once after its own (``ring_fwd_loop``);
            None: ``ringflash.use_ring_prefetch``'s choice, as the ring functions use.
        method: ``"ring"``, ``"allgather"`` or ``"auto"`` for a packed stream (its two
            exchanges made of ring messages), as ``ring_flash_attn_varlen_func`` takes it, and
            ``heads_k_stride`` for the all-gather (its pieces run one after another here).

    Returns:
        ``(outs, lses, profile)``: per-rank outputs in q's dtype and float32 LSEs.
    """
    packed = cu_seqlens is not None
    n_local = qs[0].shape[0 if packed else 1]
    plans = simulate_plans(len(qs), n_local, layout, causal, window_size, cu_seqlens)
    call = (qs[0], ks[0], causal, window_size)
    one = _one_document(layout, cu_seqlens, plans, method, call)
    if one is not None:  # as ring_flash_attn_varlen_func: the padded ring of one sequence
        mask = dict(causal=causal, window_size=window_size, softcap=softcap, softmax_scale=softmax_scale)
        rows = ([x.unsqueeze(0) for x in xs] for xs in (qs, ks, vs))
        outs, lses, prof = simulate_ring_attn(
            *rows, one, **mask, profile=profile, sync=sync, cuda_events=cuda_events, prefetch=prefetch
        )
        return [o[0] for o in outs], [lse[0] for lse in lses], prof
    scale = softmax_scale if softmax_scale is not None else qs[0].shape[-1] ** -0.5
    backend = backend_for(qs[0])
    prefetch = ring_prefetch() if prefetch is None else prefetch
    if _method(method, plans, layout, cu_seqlens, *call) == "allgather":
        cu, mask = _cu(cu_seqlens), (bool(causal), (int(window_size[0]), int(window_size[1])))
        loops = [
            allgather_fwd_loop(
                backend,
                q,
                k.contiguous(),
                v.contiguous(),
                layout,
                cu,
                r,
                len(qs),
                *mask,
                scale,
                softcap,
                heads_k_stride,
            )
            for r, (q, k, v) in enumerate(zip(qs, ks, vs, strict=True))
        ]
    else:
        loops = [
            ring_fwd_loop(backend, q, k.contiguous(), v.contiguous(), p, scale, softcap, packed, prefetch)
            for q, k, v, p in zip(qs, ks, vs, plans, strict=True)
        ]
    res, prof = run_simulated(loops, profile, sync, cuda_events)
    return [o.to(q.dtype) for (o, _), q in zip(res, qs, strict=True)], [lse for _, lse in res], prof


def simulate_ring_attn_backward(
    douts,
    qs,
    ks,
    vs,
    outs,
    lses,
    layout: str = "contiguous",
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    cu_seqlens=None,
    profile=False,
    sync=None,
    cuda_events=False,
    method="ring",
    heads_k_stride=None,
):
    """Backward of ``simulate_ring_attn``: returns ``(dqs, dks, dvs, profile)`` per virtual rank."""
    packed = cu_seqlens is not None
    n_local = qs[0].shape[0 if packed else 1]
    plans = simulate_plans(len(qs), n_local, layout, causal, window_size, cu_seqlens)
    call = (qs[0], ks[0], causal, window_size)
    one = _one_document(layout, cu_seqlens, plans, method, call)
    if one is not None:
        mask = dict(causal=causal, window_size=window_size, softcap=softcap, softmax_scale=softmax_scale)
        rows = ([x.unsqueeze(0) for x in xs] for xs in (douts, qs, ks, vs, outs, lses))
        *grads, prof = simulate_ring_attn_backward(
            *rows, one, **mask, profile=profile, sync=sync, cuda_events=cuda_events
        )
        return (*([g[0] for g in gs] for gs in grads), prof)
    scale = softmax_scale if softmax_scale is not None else qs[0].shape[-1] ** -0.5
    backend = backend_for(qs[0])
    if _method(method, plans, layout, cu_seqlens, *call) == "allgather":
        cu, mask = _cu(cu_seqlens), (bool(causal), (int(window_size[0]), int(window_size[1])))
        loops = [
            allgather_bwd_loop(
                backend,
                do.contiguous(),
                q,
                k,
                v,
                o,
                lse,
                layout,
                cu,
                r,
                len(qs),
                *mask,
                scale,
                softcap,
                heads_k_stride,
            )
            for r, (do, q, k, v, o, lse) in enumerate(zip(douts, qs, ks, vs, outs, lses, strict=True))
        ]
    else:
        loops = [
            ring_bwd_loop(
                backend, do.contiguous(), q, k.contiguous(), v.contiguous(), o, lse, p, scale, softcap, packed
            )
            for do, q, k, v, o, lse, p in zip(douts, qs, ks, vs, outs, lses, plans, strict=True)
        ]
    res, prof = run_simulated(loops, profile, sync, cuda_events)
    dqs = [dq.to(q.dtype) for (dq, _, _), q in zip(res, qs, strict=True)]
    dks = [dk.to(k.dtype) for (_, dk, _), k in zip(res, ks, strict=True)]
    dvs = [dv.to(v.dtype) for (_, _, dv), v in zip(res, vs, strict=True)]
    return dqs, dks, dvs, prof


# ------------------------------------------ the all-gather method over ring messages


def _exchange_by_posts(x: torch.Tensor, sends: list[int], recvs: list[int], rank: int, world: int, tag: int):
    """Generator: ``comm.gather.start_exchange(x, sends, recvs)``'s result through ring posts (the
    block for rank ``rank + s`` goes ``s`` ranks ahead; blocks of no rows are not posted), each
    received into its place in the result, as the collective writes it."""
    at, into = [0, *itertools.accumulate(sends)], [0, *itertools.accumulate(recvs)]
    got = x.new_empty((into[-1], *x.shape[1:]))
    got[into[rank] : into[rank + 1]] = x[at[rank] : at[rank + 1]]
    handles = []
    for s in range(1, world):
        dst, src = (rank + s) % world, (rank - s) % world
        out = [x[at[dst] : at[dst + 1]]] if sends[dst] else []
        place = [got[into[src] : into[src + 1]]] if recvs[src] else []
        handles.append((yield Post(out, s, tag, recv=place, into=True)))
    for h in handles:
        yield Wait(h)
    return got


def _gather_by_posts(backend, k, v, plan, rank: int, world: int):
    """Generator: ``allgather._start_gather``'s exchange through ring posts; returns the function
    that puts the received keys in stream order, as the real exchange's wait does (``heads_fwd``
    and ``heads_bwd`` call it after queueing the calls on the rank's own documents, which it
    overlaps on a GPU)."""
    if not plan.moves:
        return lambda: (None, None)
    got = yield from _exchange_by_posts(_outgoing(backend, k, v, plan), *_sizes(plan), rank, world, TAG_KV)
    return lambda: _in_stream_order(got, plan)


def allgather_fwd_loop(
    backend, q, k, v, layout, cu, rank, world, causal, window, scale, softcap, stride=None
):
    """Generator (``ringflash.comm.ring``'s protocol): the all-gather method's forward for one rank,
    its exchange made of ring posts, piece by piece of ``stride`` KV heads (None: the library's
    default for q's device). Returns ``(out, lse)`` as ``allgather_attention`` computes them."""
    plan = gather_plan(layout, cu, rank, world, causal, window)
    state = fwd_state(q, v, plan)
    for piece in head_pieces(q.shape[1], k.shape[1], stride or default_heads_k_stride(q, k)):
        gathered = yield from _gather_by_posts(backend, k[:, piece[0]], v[:, piece[0]], plan, rank, world)
        heads_fwd(backend, q, k, v, piece, gathered, plan, scale, softcap, state)
    return state[0].to(q.dtype), state[1]


def allgather_bwd_loop(
    backend, dout, q, k, v, out, lse, layout, cu, rank, world, causal, window, scale, softcap, stride=None
):
    """Generator: the backward of ``allgather_fwd_loop``; the reverse exchange takes each gathered
    key's float32 dK/dV to the rank that sent it. Returns ``(dq, dk, dv)``."""
    plan = gather_plan(layout, cu, rank, world, causal, window)
    delta, grads = bwd_delta(backend, dout, out, None), bwd_state(q, k, v, plan)
    for piece in head_pieces(q.shape[1], k.shape[1], stride or default_heads_k_stride(q, k)):
        gathered = yield from _gather_by_posts(backend, k[:, piece[0]], v[:, piece[0]], plan, rank, world)
        back = heads_bwd(
            backend, dout, q, k, v, out, lse, delta, piece, gathered, plan, scale, softcap, grads
        )
        if back is not None:
            sends, recvs = _sizes(plan)
            got = yield from _exchange_by_posts(back, recvs, sends, rank, world, TAG_DKV)
            _add_home(backend, grads[1][:, piece[0]], grads[2][:, piece[0]], got, plan)
    dq, dk, dv = grads
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
