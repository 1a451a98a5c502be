"""A ring of ``W`` virtual ranks in one process: the real ring loop with a simulated communicator.

Every virtual rank runs ``ring_loop``'s generators on the same device and their messages go
through in-process mailboxes (``ringflash.comm.ring.run_simulated``). Tests use it to check the
loop without processes; the one-GPU benchmark uses its per-rank timings (``profile=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..backends import backend_for
from ..comm.ring import SimProfile, run_simulated
from .allgather import METHODS, allgather_bwd_loop, allgather_fwd_loop
from .doc_layouts import build_doc_plan, padded_layout
from .layouts import Plan, build_plan
from .method_cost import choose_method, compute_rates
from .options import ring_prefetch
from .ring_loop import ring_bwd_loop, ring_fwd_loop


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
            exchanges made of ring messages), as ``ring_flash_attn_varlen_func`` takes it.

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
                backend, q, k.contiguous(), v.contiguous(), layout, cu, r, len(qs), *mask, scale, softcap
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
                backend, do.contiguous(), q, k, v, o, lse, layout, cu, r, len(qs), *mask, scale, softcap
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
