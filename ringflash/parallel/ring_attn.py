"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Each rank holds a shard of Q, K and V in one of the layouts of ``layouts.py`` (``contiguous``,
``zigzag``, ``stripe``); K/V (only the KV heads, so GQA/MQA send less) travel the ring while every
rank merges its partial results exactly in float32 (see ``ring_loop.py``). The output is this
rank's shard of ``softmax(Q K^T * scale) V`` for the whole sequence, in the input dtype.

Causal masks, sliding windows and softcapping are exact for every layout: fully masked blocks are
skipped, and ring steps that no rank needs (a window shorter than the distance to a shard) are
neither computed nor communicated. ``zigzag`` and ``stripe`` balance the work of causal attention;
they are correct (but pointless) without a causal mask, so ``causal=False`` is allowed with every
layout.

Inputs are checked by ``ringflash.checks`` (the checks of the local functions) and then agreed on
collectively (``ringflash.comm.agree``): before any ring communication every rank learns whether
any rank's input was bad or the ranks disagree (shapes, dtype, layout, masks, options), and then
every rank raises ``ValueError``, never a hang. With no process group initialised, or a group of
one rank, the same functions compute locally.
"""

from __future__ import annotations

import functools
import socket
import zlib

import torch
import torch.distributed as dist

from ..backends import backend_for
from ..checks import check_cu_seqlens, check_max_seqlen, check_options, check_qkv, check_sink, resolve_scale
from ..comm.agree import GRAPH_HINT, agree, records_graph
from ..comm.copy_engine import copy_engine_available
from ..comm.groups import group_rank_world
from ..comm.ring import RingComm, run_on_group
from ..merge import merge_sink
from .allgather import METHODS, allgather_attention, check_heads_k_stride, default_heads_k_stride
from .doc_layouts import build_doc_plan, padded_layout, total_error
from .layouts import Plan, build_plan, check_global_total, check_layout, local_len_error
from .method_cost import choose_method, link_bandwidth
from .options import forward_prefetch, ring_transport
from .ring_loop import TAG_DKV, TAG_KV, ring_bwd_loop, ring_fwd_loop

_HINTS = {
    "q shape": " (every rank needs a shard of equal length, batch and heads)",
    "ring transport": " (every rank must choose the same use_ring_transport)",
    "node": ' (use_ring_transport("copy_engine") needs every rank of the group on one node)',
    "ring prefetch": " (every rank must choose the same use_ring_prefetch)",
    "cu_seqlens": " (every rank passes the global cu_seqlens of the whole packed stream)",
    "heads_k_stride": " (its default follows each GPU's multiprocessors: pass one heads_k_stride)",
    "gradients": GRAPH_HINT,
}


@functools.cache
def _node_id() -> int:
    """A number for this host (the same in every process on it); read once, not on every call."""
    return zlib.crc32(socket.gethostname().encode())


# Plans depend only on these arguments and are read-only once built (their pieces only cache device
# copies of their own index lists), so a training loop builds each one once: building one costs
# hundreds of microseconds of host time at 8 ranks.
@functools.lru_cache(maxsize=256)
def _cached_plan(layout, rank, world, n_local, causal, window) -> Plan:
    return build_plan(layout, rank, world, n_local, causal, window)


@functools.lru_cache(maxsize=64)
def _cached_doc_plan(layout, cu, rank, world, causal, window) -> Plan:
    return build_doc_plan(layout, cu, rank, world, causal, window)


class RingAttention(torch.autograd.Function):
    """Autograd for one ring: forward and backward both run ``ring_loop`` over the same plan."""

    @staticmethod
    def forward(
        ctx, q, k, v, plan: Plan, scale: float, softcap: float, group, packed: bool, transport, prefetch
    ):
        k, v = k.contiguous(), v.contiguous()
        comm = _comm(group, plan, transport, q.device)
        loop = ring_fwd_loop(backend_for(q), q, k, v, plan, scale, softcap, packed, prefetch)
        out32, lse = run_on_group(loop, comm)
        out = out32.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.softcap, ctx.group, ctx.packed = plan, scale, softcap, group, packed
        ctx.transport = transport
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        comm = _comm(ctx.group, ctx.plan, ctx.transport, q.device)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        loop = ring_bwd_loop(
            backend_for(q), dout, q, k, v, out, lse, ctx.plan, ctx.scale, ctx.softcap, ctx.packed, dlse
        )
        dq, dk, dv = run_on_group(loop, comm)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _comm(group, plan: Plan, transport: str, device: torch.device) -> RingComm | None:
    """The ring's communicator: with ``transport="copy_engine"`` the K/V and the travelling dK/dV go
    to the next rank by copy engine (a dK/dV sent home over several hops goes through the group)."""
    if plan.world == 1:
        return None
    # The copy engines carry the regular one-hop stream; a plan whose blocks travel different
    # distances posts sends and receives alone, which go through the group.
    tags = (TAG_KV, TAG_DKV) if transport == "copy_engine" and plan.regular else ()
    return RingComm(group, copy_engine_tags=tags, device=device)


def _validate(q, k, v, layout, opts, world, group, cu_seqlens, max_seqlen, transport, method, stride=None):
    """This rank's arguments, checked and normalised (raises ValueError / TypeError)."""
    check_layout(layout, packed=cu_seqlens is not None)
    check_heads_k_stride(stride, k.shape[-2])
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if method != "ring" and cu_seqlens is None:
        raise ValueError(f"method={method!r} is for packed documents (ring_flash_attn_varlen_func)")
    causal, window, softcap, scale = check_options(*opts)
    packed = cu_seqlens is not None
    check_qkv(q, k, v, packed=packed, same_tokens=True)
    backend_for(q)  # a backend that cannot run on this device is an error of this rank's input
    n_local = q.shape[0] if packed else q.shape[1]
    cu_list = None
    if packed:
        cu_list = check_cu_seqlens(cu_seqlens, None, "cu_seqlens", q.device, allow_cpu=True)
        if cu_list is None:  # value checks skipped: the plan needs the values all the same
            cu_list = cu_seqlens.tolist()
        check_global_total(cu_list[-1], world, n_local, "the ring")
        err = total_error(world, cu_list[-1], layout)
        if err:
            raise ValueError(err)
        check_max_seqlen(cu_seqlens, max_seqlen, "max_seqlen", cu_list)
    else:
        err = local_len_error(layout, world, n_local)
        if err:
            raise ValueError(err)
    if transport == "copy_engine" and world > 1:
        if not q.is_cuda or dist.get_backend(group) != "nccl" or not copy_engine_available():
            raise ValueError(
                'use_ring_transport("copy_engine") needs CUDA tensors, an NCCL group and PyTorch symmetric '
                f"memory (got {q.device.type} tensors, a {dist.get_backend(group)} group)"
            )
    return causal, window, softcap, scale, cu_list


def ring_attention(
    name: str,
    q,
    k,
    v,
    layout: str,
    opts: tuple,
    return_attn_probs: bool,
    group,
    cu_seqlens=None,
    max_seqlen=0,
    error: str | None = None,
    method: str = "ring",
    sink=None,
    heads_k_stride=None,
):
    """Check, agree and run one ring call; ``opts`` = ``(dropout_p, softmax_scale, window_size,
    softcap, alibi_slopes, causal)`` as ``check_options`` takes them. ``error``: a problem the
    caller already found (a malformed packed input): raised on every rank like any other.
    ``method``: ``"ring"``, ``"allgather"`` or ``"auto"`` (packed streams). ``sink``: the learnable
    sink ``[Hq]``, merged once into the ring's result. ``heads_k_stride``: KV heads per piece of
    the all-gather's exchange (None: ``allgather.default_heads_k_stride``)."""
    g, rank, world = group_rank_world(group)
    transport = ring_transport()
    prefetch = forward_prefetch(transport)
    err, fields = None, {}
    try:
        if error:
            raise ValueError(error)
        causal, window, softcap, scale, cu_list = _validate(
            q, k, v, layout, opts, world, g, cu_seqlens, max_seqlen, transport, method, heads_k_stride
        )
        check_sink(sink, q)
        stride = None  # the ring ignores it; the all-gather's default follows the device's SMs,
        if cu_list is not None and method != "ring":  # so ranks on different GPUs must agree on it
            stride = heads_k_stride or default_heads_k_stride(q, k)
        fields = {
            "function": name,
            "layout": layout,
            "method": method,
            "causal": causal,
            "window_size": window,
            "softcap": softcap,
            "softmax_scale": scale,
            "q shape": tuple(q.shape),
            "kv heads": k.shape[-2],
            "dtype": str(q.dtype),
            "cu_seqlens": tuple(cu_list) if cu_list is not None else None,
            "group members": tuple(dist.get_process_group_ranks(g)) if g is not None else (0,),
            "ring transport": transport,
            "node": _node_id() if transport == "copy_engine" else None,
            "ring prefetch": prefetch,
            "learnable_sink given": sink is not None,
            "heads_k_stride": stride,
            # only the ranks that record the call run its backward (and "auto" prices it)
            "gradients": records_graph(q, k, v),
        }
    except (ValueError, TypeError) as e:
        err = e
    agree([(g, world)], err, fields, "the ring", _HINTS)
    scale = resolve_scale(scale, q.shape[-1])
    packed = cu_list is not None
    if packed:
        plan = _cached_doc_plan(layout, tuple(cu_list), rank, world, causal, window)
        if method == "auto":
            grads = records_graph(q, k, v)
            pieces = k.shape[-2] // stride
            cu = tuple(cu_list)
            link = functools.partial(link_bandwidth, g, world, q.device)
            method = choose_method(layout, cu, world, causal, window, plan.reach, q, k, grads, link, pieces)
    else:
        plan = _cached_plan(layout, rank, world, q.shape[1], causal, window)
    one = padded_layout(layout, tuple(cu_list), world) if packed and method != "allgather" else None
    if one is not None:  # a single document: the padded ring of one sequence, the same pairs
        plan = _cached_plan(one, rank, world, q.shape[0], causal, window)
        args = (plan, float(scale), float(softcap), g, False, transport, prefetch)
        out, lse = RingAttention.apply(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), *args)
        out, lse = out[0], lse[0]
    elif packed and method == "allgather" and world > 1:
        args = (layout, tuple(cu_list), float(scale), float(softcap), causal, window, g, rank, world, stride)
        out, lse = allgather_attention(q, k, v, *args)
    else:
        args = (plan, float(scale), float(softcap), g, packed, transport, prefetch)
        out, lse = RingAttention.apply(q, k, v, *args)
    if sink is not None:  # once, after every rank's keys
        out, lse = merge_sink(out, lse, sink)
    return (out, lse, None) if return_attn_probs else out
