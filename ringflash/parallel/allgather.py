"""All-gather context parallelism for packed documents (the document-masked recipe of Llama 3).

Every rank gathers the K/V of the documents that span several ranks (*shared* documents; GQA makes
K/V a fraction of Q's size), then attends its local queries to the keys they need in a few packed
(varlen) calls, with no further communication; documents that lie whole on one rank attend their
local K/V and never travel. The backward computes float32 dK/dV for the shared documents and
reduce-scatters them to their owners. Against the ring it trades memory (the shared documents' K/V
on every rank, and their float32 dK/dV in the backward) for fewer, larger kernel calls and two
collectives instead of ``W - 1`` transfers per direction.

The gathered keys are put in stream order (of the shared documents only), so for ``contiguous``,
``zigzag`` and ``balanced`` every local query run of a document meets the document's keys in ONE
sequence of a packed call (with its own causal diagonal): zigzag runs two calls (the first and the
second piece of every document), contiguous one. ``stripe`` queries sit every ``W``-th position,
which no single diagonal describes: they attend the whole gathered stream in rank-block order with
the ring's own per-step pieces (``W`` calls).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch

from ..backends import backend_for
from ..comm.gather import all_gather_flat, reduce_scatter_flat
from ..comm.ring import Post, Wait
from .doc_layouts import _calls, _coalesce_full, _pairs, doc_segments
from .layouts import Piece, _band, _mask_args
from .ring_loop import TAG_DKV, TAG_KV, bwd_piece, fwd_piece


@dataclass(frozen=True)
class GatherPlan:
    """One rank's all-gather plan.

    ``local``: calls on the rank's own K/V (documents whole on this rank). ``shared``: calls on the
    gathered K/V. ``rows[r]``: rank ``r``'s local rows of shared documents, which it sends (padded
    to ``width`` rows). ``src``: for every row of the gathered keys, its row in the rank-block
    buffer ``[W * width]`` (None: that buffer is used as it is); ``inverse``: the gathered row of
    every rank-block row, when there is no padding (None otherwise). ``write_once``: no local row
    is in two calls' sequences; ``covers_all``: moreover every local row is in one.
    """

    local: tuple[Piece, ...]
    shared: tuple[Piece, ...]
    rows: tuple[torch.Tensor, ...]
    width: int
    src: torch.Tensor | None
    inverse: torch.Tensor | None = None
    write_once: bool = False
    covers_all: bool = False
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """``x`` (one of the plan's index tensors) on ``device``, copied there once: a copy from
        the host on every call would wait for the device to reach it."""
        if x is None or x.device == device:
            return x
        key = (id(x), str(device))
        if key not in self.copies:
            self.copies[key] = x.to(device)
        return self.copies[key]


def _spans(layout: str, cu: tuple[int, ...], world: int) -> list[int]:
    """How many ranks hold tokens of each document."""
    holders = [set() for _ in range(len(cu) - 1)]
    for r in range(world):
        for s in doc_segments(layout, cu, r, world):
            if s.count:
                holders[s.doc].add(r)
    return [len(h) for h in holders]


@functools.lru_cache(maxsize=64)
def gather_plan(layout: str, cu: tuple[int, ...], rank: int, world: int, causal: bool, window) -> GatherPlan:
    """This rank's calls on its own and on the gathered keys, and what every rank sends."""
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
        rows = tuple(torch.arange(n_local) for _ in range(world))
        return GatherPlan((), tuple(pieces), rows, n_local, None)
    shared = [n > 1 for n in _spans(layout, cu, world)]
    mine = {s.local0 for s in doc_segments(layout, cu, rank, world) if s.count and not shared[s.doc]}
    own = [p for p in _pairs(layout, cu, rank, rank, world, causal, window) if p[0] in mine]
    local = _calls(_coalesce_full(own))
    start, at = [], 0  # each shared document's first row in the gathered keys
    for d, (a, b) in enumerate(itertools.pairwise(cu)):
        start.append(at)
        at += (b - a) if shared[d] else 0
    runs = []  # (rank, local0, count, row in the gathered keys) of every shared segment
    for r in range(world):
        runs += [
            (r, s.local0, s.count, start[s.doc] + s.pos0)
            for s in doc_segments(layout, cu, r, world)
            if s.count and shared[s.doc]
        ]
    sent = [0] * world
    for r, _, count, _ in runs:
        sent[r] += count
    width = max(sent)
    rows = [[] for _ in range(world)]
    src_rows, at_rank = torch.empty(at, dtype=torch.int64), [0] * world
    for r, local0, count, dest in runs:
        rows[r].append(torch.arange(local0, local0 + count))
        src_rows[dest : dest + count] = torch.arange(count) + (r * width + at_rank[r])
        at_rank[r] += count
    rows = [torch.cat(x) if x else torch.zeros(0, dtype=torch.int64) for x in rows]
    pairs = []
    for sq in doc_segments(layout, cu, rank, world):
        if not shared[sq.doc]:
            continue
        n_doc = cu[sq.doc + 1] - cu[sq.doc]
        lo, hi = _band(sq.pos0, 0, 1, causal, window)  # keys at their positions in the document
        k0 = 0 if lo == -math.inf else max(0, int(lo))
        k1 = n_doc if hi == math.inf else min(n_doc, sq.count + int(hi))
        if k0 >= k1:
            continue
        args = _mask_args(*_band(sq.pos0, k0, 1, causal, window), sq.count, k1 - k0)
        if args is not None:
            pairs.append((sq.local0, sq.count, start[sq.doc] + k0, k1 - k0, args))
    inverse = None
    if len(src_rows) == world * width:
        inverse = torch.empty_like(src_rows).index_copy_(0, src_rows, torch.arange(len(src_rows)))
    runs = sorted((p[0], p[0] + p[1]) for p in [*pairs, *own])
    once = all(a[1] <= b[0] for a, b in itertools.pairwise(runs))  # no row in two calls
    covers = once and sum(b - a for a, b in runs) == n_local
    calls = tuple(_calls(pairs))
    return GatherPlan(tuple(local), calls, tuple(rows), width, src_rows, inverse, once, covers)


def _send_block(x: torch.Tensor, plan: GatherPlan, rank: int) -> torch.Tensor:
    """This rank's rows of shared documents ``[width, H, D]`` (padded with zeros): what it gathers out."""
    mine = plan.rows[rank]
    if plan.src is None or len(mine) == x.shape[0]:  # every local row is shared, in local order
        return x
    block = x.new_zeros((plan.width, *x.shape[1:]))
    block[: len(mine)] = x.index_select(0, plan.on(mine, x.device))
    return block


def in_order(blocks: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """Gathered rank blocks ``[W * width, H, D]`` as the shared documents' keys in stream order."""
    return blocks if plan.src is None else blocks.index_select(0, plan.on(plan.src, blocks.device))


def _gathered(k, v, world: int, group, plan: GatherPlan, rank: int):
    """The shared documents' rows of every rank's ``k`` and ``v``, in stream order (None, None
    without shared documents: nothing is gathered)."""
    if not plan.width:
        return None, None

    def gather(x):
        flat = all_gather_flat(_send_block(x, plan, rank), world, group)
        return in_order(flat.view(world * plan.width, *x.shape[1:]), plan)

    return gather(k), gather(v)


def gathered_fwd(backend, q, k, v, kf, vf, plan: GatherPlan, scale, softcap):
    """This rank's attention over its own and the gathered keys: ``(out [T_local, H, Dv], lse
    [H, T_local] float32)``.

    When every local row belongs to one call's sequence at most (``plan.write_once``; the calls'
    spacer sequences write nothing), each call writes its rows in q's dtype: no float32 state, no
    merge, no cast; rows that no call writes (no key visible) are zeros with an LSE of -inf.
    Otherwise (stripe, or a document in two pieces on one rank under a window) the calls merge
    into a float32 state.
    """
    shape, lse_shape = q.shape[:-1] + (v.shape[-1],), (q.shape[1], q.shape[0])
    dtype = q.dtype if plan.write_once else torch.float32
    if plan.covers_all:
        out = torch.empty(shape, dtype=dtype, device=q.device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros(shape, dtype=dtype, device=q.device)
        lse = torch.full(lse_shape, -math.inf, dtype=torch.float32, device=q.device)
    merge = not plan.write_once
    for pc in plan.local:
        fwd_piece(backend, q, k, v, out, lse, pc, scale, softcap, True, merge=merge)
    for pc in plan.shared:
        fwd_piece(backend, q, kf, vf, out, lse, pc, scale, softcap, True, merge=merge)
    return out, lse


def gathered_bwd(backend, dout, q, k, v, kf, vf, out, lse, plan: GatherPlan, scale, softcap, dlse=None):
    """Gradients of ``gathered_fwd``: ``dq``, float32 ``dk``/``dv`` of the local documents, and the
    float32 dK/dV of the shared keys in rank-block order ``[W * width, H, D]`` (ready to
    reduce-scatter; None without shared documents). ``dlse``: the gradient into the LSE, or None."""
    delta = backend.attn_bwd_delta(dout, out, packed=True)
    if dlse is not None:
        delta = (delta - dlse).contiguous()

    def zeros(x):
        return torch.zeros(x.shape, dtype=torch.float32, device=q.device)

    dq, dk, dv = zeros(q), zeros(k), zeros(v)
    for pc in plan.local:
        bwd_piece(backend, dout, q, k, v, out, lse, delta, dq, dk, dv, pc, scale, softcap, True)
    if kf is None:
        return dq, dk, dv, None, None
    dkf, dvf = zeros(kf), zeros(vf)
    for pc in plan.shared:
        bwd_piece(backend, dout, q, kf, vf, out, lse, delta, dq, dkf, dvf, pc, scale, softcap, True)
    if plan.src is not None:  # back to rank-block order, each block to its owner
        world = len(plan.rows)
        if plan.inverse is not None:  # no padding: a permutation, gathered in one pass
            inverse = plan.on(plan.inverse, q.device)
            return dq, dk, dv, dkf.index_select(0, inverse), dvf.index_select(0, inverse)
        s = plan.on(plan.src, q.device)
        blocks = [
            torch.zeros((world * plan.width, *x.shape[1:]), dtype=torch.float32, device=q.device)
            for x in (k, v)
        ]
        dkf, dvf = blocks[0].index_copy_(0, s, dkf), blocks[1].index_copy_(0, s, dvf)
    return dq, dk, dv, dkf, dvf


def _add_home(dk, dv, mine_k, mine_v, plan: GatherPlan, rank: int) -> None:
    """Add the reduced dK/dV of this rank's shared rows (``[width, ...]`` each) into ``dk``/``dv``."""
    rows = plan.rows[rank]
    if plan.src is None:
        dk.add_(mine_k)
        dv.add_(mine_v)
    elif len(rows):
        r = plan.on(rows, dk.device)
        dk.index_add_(0, r, mine_k[: len(rows)])
        dv.index_add_(0, r, mine_v[: len(rows)])


class AllGatherAttention(torch.autograd.Function):
    """Autograd for the all-gather method: gather, attend, and in the backward reduce-scatter."""

    @staticmethod
    def forward(ctx, q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world):
        plan = gather_plan(layout, cu, rank, world, causal, window)
        kf, vf = _gathered(k, v, world, group, plan, rank)
        out, lse = gathered_fwd(backend_for(q), q, k, v, kf, vf, plan, scale, softcap)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, cu, scale, softcap, causal, window, group, rank, world)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, cu, scale, softcap, causal, window, group, rank, world = ctx.args
        plan = gather_plan(layout, cu, rank, world, causal, window)
        kf, vf = _gathered(k, v, world, group, plan, rank)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv, dkf, dvf = gathered_bwd(
            backend_for(q), dout, q, k, v, kf, vf, out, lse, plan, scale, softcap, dlse
        )
        if dkf is not None:
            both = torch.cat([dkf.view(world, -1), dvf.view(world, -1)], 1)
            mine = reduce_scatter_flat(both, world, rank, group)
            n = dkf.numel() // world
            shape = (plan.width, *k.shape[1:])
            _add_home(dk, dv, mine[:n].view(shape), mine[n:].view(shape), plan, rank)
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
    zigzag, balanced); stripe gains nothing in calls and stays on the ring. When no block travels
    at all (every document whole on its rank) the all-gather method gathers nothing and its calls
    write their rows once, without the ring's float32 state: it is taken then too.
    """
    if world == 1 or layout == "stripe":
        return "ring"
    reach = sum(plan_reach)
    return "allgather" if reach == 0 or 2 * reach >= world * (world - 1) else "ring"


def allgather_attention(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world):
    """Attention of this rank's packed queries over the whole stream's gathered K/V:
    ``(out [T_local, Hq, D], lse [Hq, T_local])``."""
    return AllGatherAttention.apply(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world)


# ----------------------------------------------- the same method over ring messages (simulation)


def _gather_by_posts(x_pair, plan: GatherPlan, rank, world):
    """Generator: every rank's shared rows of ``(k, v)`` through ``W - 1`` ring posts, in the
    gathered keys' order (None, None without shared documents)."""
    if not plan.width:
        return None, None
    mine = [_send_block(x, plan, rank) for x in x_pair]
    handles = []
    for s in range(1, world):
        handles.append((yield Post(mine, s, TAG_KV)))
    blocks = [None] * world
    blocks[rank] = mine
    for s, h in zip(range(1, world), handles, strict=True):
        blocks[(rank - s) % world] = yield Wait(h)
    return tuple(in_order(torch.cat([b[i] for b in blocks]), plan) for i in range(len(x_pair)))


def allgather_fwd_loop(backend, q, k, v, layout, cu, rank, world, causal, window, scale, softcap):
    """Generator (``ringflash.comm.ring``'s protocol): the all-gather method's forward for one rank,
    its gather made of ring posts, for ``ringflash.parallel.simulate``. Returns ``gathered_fwd``'s
    ``(out, lse)``."""
    plan = gather_plan(layout, cu, rank, world, causal, window)
    kf, vf = yield from _gather_by_posts((k, v), plan, rank, world)
    return gathered_fwd(backend, q, k, v, kf, vf, plan, scale, softcap)


def allgather_bwd_loop(
    backend, dout, q, k, v, out, lse, layout, cu, rank, world, causal, window, scale, softcap
):
    """Generator: the backward of ``allgather_fwd_loop``; the reduce-scatter sends each block's
    float32 dK/dV to its owner. Returns float32 ``(dq, dk, dv)``."""
    plan = gather_plan(layout, cu, rank, world, causal, window)
    kf, vf = yield from _gather_by_posts((k, v), plan, rank, world)
    dq, dk, dv, dkf, dvf = gathered_bwd(backend, dout, q, k, v, kf, vf, out, lse, plan, scale, softcap)
    if dkf is None:
        return dq, dk, dv
    n = plan.width
    mine_k, mine_v = dkf[rank * n : (rank + 1) * n].clone(), dvf[rank * n : (rank + 1) * n].clone()
    handles = []
    for s in range(1, world):  # block of rank r + s goes s ranks ahead; the sum for mine comes from r - s
        b = (rank + s) % world
        handles.append((yield Post([dkf[b * n : (b + 1) * n], dvf[b * n : (b + 1) * n]], s, TAG_DKV)))
    for h in handles:
        dk_in, dv_in = yield Wait(h)
        mine_k.add_(dk_in)
        mine_v.add_(dv_in)
    _add_home(dk, dv, mine_k, mine_v, plan, rank)
    return dq, dk, dv


__all__ = ["allgather_attention", "allgather_bwd_loop", "allgather_fwd_loop", "choose_method", "gather_plan"]
