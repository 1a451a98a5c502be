"""All-gather context parallelism for packed documents (the document-masked recipe of Llama 3).

Every rank gathers the K/V of the whole stream (GQA makes them a fraction of Q's size), then
attends its local queries to the keys they need, in a few packed (varlen) calls, with no further
communication; the backward computes float32 dK/dV for the whole stream and reduce-scatters them
to their owners. Against the ring it trades memory (the stream's K/V on every rank, and its float32
dK/dV in the backward) for fewer, larger kernel calls and two collectives instead of ``W - 1``
transfers per direction.

Keys are placed in stream order after the gather, so for ``contiguous`` and ``zigzag`` every local
query run of a document meets the document's keys in ONE sequence of a packed call (with its own
causal diagonal): zigzag runs two calls (the first and the second piece of every document),
contiguous one. ``stripe`` queries sit every ``W``-th position, which no single diagonal describes:
they attend the gathered blocks with the ring's own per-step pieces (``W`` calls).
"""

from __future__ import annotations

import functools
import math

import torch

from ..backends import backend_for
from ..comm.gather import all_gather_flat, reduce_scatter_flat
from ..comm.ring import Post, Wait
from .doc_layouts import _calls, _coalesce_full, doc_positions, doc_segments
from .layouts import _band, _mask_args
from .ring_loop import TAG_DKV, TAG_KV, bwd_piece, fwd_piece


@functools.lru_cache(maxsize=64)
def gather_plan(layout: str, cu: tuple[int, ...], rank: int, world: int, causal: bool, window) -> tuple:
    """``(pieces, order)``: this rank's calls against the gathered keys, and the stream index of
    every gathered row (None: the keys stay in rank-block order, as stripe uses them)."""
    n_local = cu[-1] // world
    if layout == "stripe" and world > 1:
        pieces = []
        for s in range(world):  # the ring's pairs with the block of rank s, shifted into place
            pairs = []
            for sq in doc_segments(layout, cu, rank, world):
                for sk in doc_segments(layout, cu, s, world):
                    if sk.doc != sq.doc:
                        continue
                    args = _mask_args(*_band(sq.pos0, sk.pos0, sq.stride, causal, window), sq.count, sk.count)
                    if args is not None:
                        pairs.append((sq.local0, sq.count, s * n_local + sk.local0, sk.count, args))
            pieces += _calls(_coalesce_full(pairs))
        return tuple(pieces), None
    pairs = []
    for sq in doc_segments(layout, cu, rank, world):
        n_doc = cu[sq.doc + 1] - cu[sq.doc]
        lo, hi = _band(sq.pos0, 0, 1, causal, window)  # keys at their positions in the document
        k0 = 0 if lo == -math.inf else max(0, int(lo))
        k1 = n_doc if hi == math.inf else min(n_doc, sq.count + int(hi))
        if k0 >= k1:
            continue
        args = _mask_args(*_band(sq.pos0, k0, 1, causal, window), sq.count, k1 - k0)
        if args is not None:
            pairs.append((sq.local0, sq.count, cu[sq.doc] + k0, k1 - k0, args))
    order = None  # contiguous shards, gathered in rank order, are the stream in order
    if layout != "contiguous":
        order = torch.cat([doc_positions(layout, cu, s, world) for s in range(world)])
    return tuple(_calls(pairs)), order


def in_order(blocks: torch.Tensor, order) -> torch.Tensor:
    """Gathered rank blocks ``[W * T_local, H, D]`` put in stream order (``order``: the stream
    index of every row; None keeps rank order)."""
    if order is None:
        return blocks
    return torch.empty_like(blocks).index_copy_(0, order.to(blocks.device), blocks)


def _gathered(x: torch.Tensor, world: int, group, order) -> torch.Tensor:
    """Every rank's ``x`` ``[T_local, H, D]``, as ``[T, H, D]`` in stream order (or rank order)."""
    return in_order(all_gather_flat(x, world, group).view(world * x.shape[0], *x.shape[1:]), order)


def gathered_fwd(backend, q, kf, vf, pieces, scale, softcap):
    """This rank's attention over the gathered keys: float32 ``(out, lse [H, T_local])``."""
    out = torch.zeros(q.shape[:-1] + (vf.shape[-1],), dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    for pc in pieces:
        fwd_piece(backend, q, kf, vf, out, lse, pc, scale, softcap, True)
    return out, lse


def gathered_bwd(backend, dout, q, kf, vf, out, lse, pieces, scale, softcap, order, dlse=None):
    """Gradients of ``gathered_fwd``: ``dq`` and float32 ``dK/dV`` of the whole stream in rank-block
    order (ready to reduce-scatter); ``dlse``: the gradient into the returned LSE, or None."""
    delta = backend.attn_bwd_delta(dout, out, packed=True)
    if dlse is not None:
        delta = (delta - dlse).contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkf = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
    dvf = torch.zeros(vf.shape, dtype=torch.float32, device=q.device)
    for pc in pieces:
        bwd_piece(backend, dout, q, kf, vf, out, lse, delta, dq, dkf, dvf, pc, scale, softcap, True)
    if order is not None:  # back to rank-block order, each block to its owner
        o = order.to(q.device)
        dkf, dvf = dkf.index_select(0, o), dvf.index_select(0, o)
    return dq, dkf, dvf


class AllGatherAttention(torch.autograd.Function):
    """Autograd for the all-gather method: gather, attend, and in the backward reduce-scatter."""

    @staticmethod
    def forward(ctx, q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world):
        pieces, order = gather_plan(layout, cu, rank, world, causal, window)
        kf, vf = _gathered(k, world, group, order), _gathered(v, world, group, order)
        out, lse = gathered_fwd(backend_for(q), q, kf, vf, pieces, scale, softcap)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, cu, scale, softcap, causal, window, group, rank, world)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, cu, scale, softcap, causal, window, group, rank, world = ctx.args
        pieces, order = gather_plan(layout, cu, rank, world, causal, window)
        kf, vf = _gathered(k, world, group, order), _gathered(v, world, group, order)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        args = (backend_for(q), dout, q, kf, vf, out, lse, pieces, scale, softcap, order, dlse)
        dq, dkf, dvf = gathered_bwd(*args)
        both = torch.cat([dkf.view(world, -1), dvf.view(world, -1)], 1)
        mine = reduce_scatter_flat(both, world, rank, group)
        dk, dv = mine[: k.numel()].view(k.shape), mine[k.numel() :].view(v.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 9)


METHODS = ("ring", "allgather", "auto")


def choose_method(plan_reach: tuple[int, ...], layout: str, world: int) -> str:
    """``method="auto"``: the all-gather when the ring would carry most blocks most of the way.

    The ring overlaps each transfer with a step's compute but runs one call per step; the all-gather
    moves the same bytes in one collective and runs one or two calls. When documents are short the
    ring's blocks stop after a hop or two (``Plan.reach``) and it moves a fraction of the bytes, so
    it wins; when documents span the stream every block travels ``W - 1`` hops and the all-gather's
    fewer, larger calls win. The rule: all-gather when the blocks' mean reach is at least half the
    ring, for the layouts whose queries meet the gathered keys in one call per piece (contiguous,
    zigzag); stripe gains nothing in calls and stays on the ring.
    """
    if world == 1 or layout == "stripe":
        return "ring"
    return "allgather" if 2 * sum(plan_reach) >= world * (world - 1) else "ring"


def allgather_attention(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world):
    """Attention of this rank's packed queries over the whole stream's gathered K/V:
    ``(out [T_local, Hq, D], lse [Hq, T_local])``."""
    return AllGatherAttention.apply(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world)


# ----------------------------------------------- the same method over ring messages (simulation)


def _gather_by_posts(x_pair, rank, world):
    """Generator: every rank's ``(k, v)`` through ``W - 1`` ring posts; returns rank-ordered blocks."""
    handles = []
    for s in range(1, world):
        handles.append((yield Post(list(x_pair), s, TAG_KV)))
    blocks = [None] * world
    blocks[rank] = list(x_pair)
    for s, h in zip(range(1, world), handles, strict=True):
        blocks[(rank - s) % world] = yield Wait(h)
    return [torch.cat([b[i] for b in blocks]) for i in range(len(x_pair))]


def allgather_fwd_loop(backend, q, k, v, layout, cu, rank, world, causal, window, scale, softcap):
    """Generator (``ringflash.comm.ring``'s protocol): the all-gather method's forward for one rank,
    its gather made of ring posts, for ``ringflash.parallel.simulate``. Returns float32 ``(out, lse)``."""
    pieces, order = gather_plan(layout, cu, rank, world, causal, window)
    kb, vb = yield from _gather_by_posts((k, v), rank, world)
    return gathered_fwd(backend, q, in_order(kb, order), in_order(vb, order), pieces, scale, softcap)


def allgather_bwd_loop(
    backend, dout, q, k, v, out, lse, layout, cu, rank, world, causal, window, scale, softcap
):
    """Generator: the backward of ``allgather_fwd_loop``; the reduce-scatter sends each block's
    float32 dK/dV to its owner. Returns float32 ``(dq, dk, dv)``."""
    pieces, order = gather_plan(layout, cu, rank, world, causal, window)
    kb, vb = yield from _gather_by_posts((k, v), rank, world)
    args = (pieces, scale, softcap, order)
    dq, dkf, dvf = gathered_bwd(backend, dout, q, in_order(kb, order), in_order(vb, order), out, lse, *args)
    n = k.shape[0]
    dk, dv = dkf[rank * n : (rank + 1) * n].clone(), dvf[rank * n : (rank + 1) * n].clone()
    handles = []
    for s in range(1, world):  # block of rank r + s goes s ranks ahead; the sum for mine comes from r - s
        b = (rank + s) % world
        handles.append((yield Post([dkf[b * n : (b + 1) * n], dvf[b * n : (b + 1) * n]], s, TAG_DKV)))
    for h in handles:
        dk_in, dv_in = yield Wait(h)
        dk.add_(dk_in)
        dv.add_(dv_in)
    return dq, dk, dv


__all__ = ["allgather_attention", "allgather_bwd_loop", "allgather_fwd_loop", "choose_method", "gather_plan"]
