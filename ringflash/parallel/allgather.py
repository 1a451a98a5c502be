"""All-gather context parallelism for packed documents (the document-masked recipe of Llama 3).

Every rank gathers the K/V of the documents that span several ranks (*shared* documents; GQA makes
K/V a fraction of Q's size), then attends its local queries to the keys they need in a few packed
(varlen) calls, with no further communication; documents that lie whole on one rank attend their
local K/V and never travel. The backward computes float32 dK/dV for the shared documents and
reduce-scatters them to their owners. Against the ring it trades memory (the shared documents' K/V
on every rank, and their float32 dK/dV in the backward) for fewer, larger kernel calls and two
collectives instead of ``W - 1`` transfers per direction.

Each rank keeps, in stream order, the gathered keys of the shared documents it holds queries of
(the rest of the collective's output is not copied), so for ``contiguous``,
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
from ..comm.gather import reduce_scatter_flat, start_all_gather_flat
from ..comm.ring import Post, Wait
from .doc_layouts import _calls, _coalesce_full, _pairs, doc_segments
from .layouts import Piece, _band, _mask_args
from .ring_loop import TAG_DKV, TAG_KV, bwd_piece, fwd_piece


@dataclass(frozen=True)
class GatherPlan:
    """One rank's all-gather plan.

    ``local``: calls on the rank's own K/V (documents whole on this rank). ``shared``: calls on the
    gathered K/V. ``rows[r]``: rank ``r``'s local rows of shared documents, which it sends (padded
    to ``width`` rows). ``src``: for every row of the gathered keys (the shared documents that this
    rank holds queries of, in stream order), its row in the rank-block buffer ``[W * width]``
    (None: that buffer is used as it is). ``write_once``: no local row is in two calls' sequences;
    ``covers_all``: moreover every local row is in one.
    """

    local: tuple[Piece, ...]
    shared: tuple[Piece, ...]
    rows: tuple[torch.Tensor, ...]
    width: int
    src: torch.Tensor | None
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
    segs = doc_segments(layout, cu, rank, world)
    mine = {s.local0 for s in segs if s.count and not shared[s.doc]}
    own = [p for p in _pairs(layout, cu, rank, rank, world, causal, window) if p[0] in mine]
    local = _calls(_coalesce_full(own))
    needed = {s.doc for s in segs if s.count and shared[s.doc]}  # the gathered docs this rank reads
    start, at = [], 0  # each needed document's first row in the gathered keys
    for d, (a, b) in enumerate(itertools.pairwise(cu)):
        start.append(at)
        at += (b - a) if d in needed else 0
    runs = []  # (rank, local0, count, doc, pos0) of every shared segment
    for r in range(world):
        runs += [
            (r, s.local0, s.count, s.doc, s.pos0)
            for s in doc_segments(layout, cu, r, world)
            if s.count and shared[s.doc]
        ]
    sent = [0] * world
    for r, _, count, _, _ in runs:
        sent[r] += count
    width = max(sent)
    rows = [[] for _ in range(world)]
    src_rows, at_rank = torch.empty(at, dtype=torch.int64), [0] * world
    for r, local0, count, doc, pos0 in runs:
        rows[r].append(torch.arange(local0, local0 + count))
        if doc in needed:
            dest = start[doc] + pos0
            src_rows[dest : dest + count] = torch.arange(count) + (r * width + at_rank[r])
        at_rank[r] += count
    rows = [torch.cat(x) if x else torch.zeros(0, dtype=torch.int64) for x in rows]
    pairs = []
    for sq in segs:
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
    q_runs = sorted((p[0], p[0] + p[1]) for p in [*pairs, *own])
    once = all(a[1] <= b[0] for a, b in itertools.pairwise(q_runs))  # no row in two calls
    covers = once and sum(b - a for a, b in q_runs) == n_local
    calls = tuple(_calls(pairs))
    return GatherPlan(tuple(local), calls, tuple(rows), width, src_rows, once, covers)


def _send_pair(k: torch.Tensor, v: torch.Tensor, plan: GatherPlan, rank: int) -> torch.Tensor:
    """This rank's rows of shared documents of ``k`` and then of ``v`` ``[2 * width, Hk, D]``, each
    padded with zeros to ``width`` rows: what it gathers out, in one collective."""
    mine, width = plan.rows[rank], plan.width
    every = plan.src is None or len(mine) == k.shape[0]  # every local row is shared, in local order
    make = torch.empty if every or len(mine) == width else torch.zeros
    buf = make((2 * width, *k.shape[1:]), dtype=k.dtype, device=k.device)
    if every:
        buf[:width].copy_(k)
        buf[width:].copy_(v)
    else:
        rows = plan.on(mine, k.device)
        torch.index_select(k, 0, rows, out=buf[: len(mine)])
        torch.index_select(v, 0, rows, out=buf[width : width + len(mine)])
    return buf


def _joint_rows(plan: GatherPlan, device) -> torch.Tensor:
    """For every gathered key (stream order): its row in the gathered buffers viewed as rows
    ``[W * 2 * width, Hk, D]`` (rank ``r``'s K rows from ``2 r width``, its V rows ``width``
    further); device copy made once per plan."""
    key = ("joint", str(device))
    if key not in plan.copies:
        src = plan.src
        plan.copies[key] = (src + src // max(plan.width, 1) * plan.width).to(device)
    return plan.copies[key]


def _in_stream_order(rows: torch.Tensor, plan: GatherPlan):
    """``(kf, vf)``: the gathered keys in stream order from the gathered buffers' rows
    ``[W * 2 * width, Hk, D]``."""
    if plan.src is None:  # the rank blocks in order are the gathered keys
        blocks = rows.view(len(plan.rows), 2, plan.width, *rows.shape[1:])
        return blocks[:, 0].reshape(-1, *rows.shape[1:]), blocks[:, 1].reshape(-1, *rows.shape[1:])
    at = _joint_rows(plan, rows.device)
    return rows.index_select(0, at), rows.index_select(0, at + plan.width)


def _start_gather(k, v, world: int, group, plan: GatherPlan, rank: int):
    """Start gathering the shared documents' rows of every rank's ``k`` and ``v`` (one collective);
    returns the function that waits for them and returns them in stream order, of the shared
    documents this rank reads (``(None, None)`` without shared documents: nothing is gathered)."""
    if not plan.width:
        return lambda: (None, None)
    wait = start_all_gather_flat(_send_pair(k, v, plan, rank), world, group)
    return lambda: _in_stream_order(wait().view(-1, *k.shape[1:]), plan)


def gathered_fwd(backend, q, k, v, gathered, plan: GatherPlan, scale, softcap):
    """This rank's attention over its own and the gathered keys: ``(out [T_local, H, Dv], lse
    [H, T_local] float32)``. ``gathered()`` returns the gathered ``(kf, vf)``; it is called after
    the calls on the local documents, which thus overlap the gather.

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
    kf, vf = gathered()
    for pc in plan.shared:
        fwd_piece(backend, q, kf, vf, out, lse, pc, scale, softcap, True, merge=merge)
    return out, lse


def gathered_bwd(backend, dout, q, k, v, gathered, out, lse, plan: GatherPlan, scale, softcap, dlse=None):
    """Gradients of ``gathered_fwd``: ``dq``, ``dk``/``dv`` of the local documents, and the float32
    dK/dV of the shared keys laid out as the gathered keys were, ``[W, 2 * width * Hk * D]``: rank
    ``r``'s rows of dK, then of dV (ready to reduce-scatter; None without shared documents).
    ``gathered`` and ``dlse`` (the gradient into the LSE, or None) as for ``gathered_fwd``.

    With ``plan.write_once`` each call writes its rows of ``dq`` and of the local ``dk``/``dv`` in
    the inputs' dtypes (zeros elsewhere); otherwise they are float32 sums. The shared keys' dK/dV
    are float32 sums either way: every piece of a document reads them.
    """
    delta = backend.attn_bwd_delta(dout, out, packed=True)
    if dlse is not None:
        delta = (delta - dlse).contiguous()
    once = plan.write_once
    add_local, add_gathered = (not once, not once), (not once, True)

    def zeros(x, dtype=torch.float32):
        return torch.zeros(x.shape, dtype=dtype, device=q.device)

    if once:
        dq = torch.empty_like(q) if plan.covers_all else zeros(q, q.dtype)
        dk, dv = zeros(k, k.dtype), zeros(v, v.dtype)
    else:
        dq, dk, dv = zeros(q), zeros(k), zeros(v)
    for pc in plan.local:
        bwd_piece(backend, dout, q, k, v, out, lse, delta, dq, dk, dv, pc, scale, softcap, True, add_local)
    kf, vf = gathered()
    if kf is None:
        return dq, dk, dv, None
    n = kf.shape[0]  # dK rows, a zero row, dV rows, a zero row: the padding's source
    dkv = torch.zeros((2 * (n + 1), *kf.shape[1:]), dtype=torch.float32, device=q.device)
    dkf, dvf = dkv[:n], dkv[n + 1 : 2 * n + 1]
    for pc in plan.shared:
        bwd_piece(
            backend, dout, q, kf, vf, out, lse, delta, dq, dkf, dvf, pc, scale, softcap, True, add_gathered
        )
    return dq, dk, dv, _rank_blocks(dkv, plan)


def _rank_blocks(dkv: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """The shared keys' float32 dK/dV (``gathered_bwd``'s ``dkv``: ``n`` dK rows in stream order,
    a zero row, the dV rows, a zero row) laid out for the reduce-scatter as the gathered keys were:
    ``[W, 2 * width * Hk * D]``, zeros in the padding and in other ranks' documents this rank does
    not read. One row gather, no fill of the large buffer."""
    world, width = len(plan.rows), plan.width
    n = dkv.shape[0] // 2 - 1
    if plan.src is None:  # stripe: the gathered keys are the rank blocks in order
        dk, dv = dkv[:n].view(world, width, -1), dkv[n + 1 : 2 * n + 1].view(world, width, -1)
        return torch.stack([dk, dv], 1).view(world, -1)
    key = ("inverse", str(dkv.device))
    if key not in plan.copies:  # the dkv row of every joint row (see _joint_rows)
        j = torch.arange(world * 2 * width)
        inverse = torch.where((j // max(width, 1)) % 2 == 1, 2 * n + 1, n)
        at = _joint_rows(plan, torch.device("cpu"))
        inverse[at] = torch.arange(n)
        inverse[at + width] = torch.arange(n) + n + 1
        plan.copies[key] = inverse.to(dkv.device)
    return dkv.index_select(0, plan.copies[key]).view(world, -1)


def _add_home(dk, dv, mine: torch.Tensor, plan: GatherPlan, rank: int) -> None:
    """Add this rank's reduced dK/dV (its row of the reduce-scatter: ``width`` dK rows, then
    ``width`` dV rows) into ``dk``/``dv``."""
    rows, width = plan.rows[rank], plan.width
    mine = mine.view(2 * width, *dk.shape[1:])
    if plan.src is None:
        dk.add_(mine[:width])
        dv.add_(mine[width:])
    elif len(rows):
        r = plan.on(rows, dk.device)
        dk.index_add_(0, r, mine[: len(rows)].to(dk.dtype))
        dv.index_add_(0, r, mine[width : width + len(rows)].to(dv.dtype))


class AllGatherAttention(torch.autograd.Function):
    """Autograd for the all-gather method: gather, attend, and in the backward reduce-scatter."""

    @staticmethod
    def forward(ctx, q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world):
        plan = gather_plan(layout, cu, rank, world, causal, window)
        gathered = _start_gather(k, v, world, group, plan, rank)
        out, lse = gathered_fwd(backend_for(q), q, k, v, gathered, plan, scale, softcap)
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
        gathered = _start_gather(k, v, world, group, plan, rank)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv, both = gathered_bwd(
            backend_for(q), dout, q, k, v, gathered, out, lse, plan, scale, softcap, dlse
        )
        if both is not None:
            _add_home(dk, dv, reduce_scatter_flat(both, world, rank, group), plan, rank)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 9)


METHODS = ("ring", "allgather", "auto")


def choose_method(plan_reach: tuple[int, ...], layout: str, world: int, backward: bool = True) -> str:
    """``method="auto"``: the all-gather when no block travels, or, for a forward alone, when the
    ring would carry most blocks most of the way.

    When no block travels (every document whole on its rank) the all-gather method gathers nothing
    and its calls write their rows once, without the ring's float32 state: it is taken. When
    blocks travel, the ring overlaps each transfer with a step's compute but runs one call per
    step; the all-gather moves the same bytes in one collective (not overlapped) and runs one or
    two calls. For a forward alone (``backward=False``) its fewer, larger calls won on packed
    streams whose blocks travel at least half the ring on average (``2 * sum(reach) >= W (W - 1)``;
    docs/ring.md); with a backward, which adds float32 dK/dV for every shared key and their
    reduce-scatter, the ring measured as fast or faster, so it stays on the ring. Stripe gains
    nothing in calls and always stays on the ring.
    """
    if world == 1 or layout == "stripe":
        return "ring"
    reach = sum(plan_reach)
    if reach == 0:
        return "allgather"
    return "allgather" if not backward and 2 * reach >= world * (world - 1) else "ring"


def allgather_attention(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world):
    """Attention of this rank's packed queries over the whole stream's gathered K/V:
    ``(out [T_local, Hq, D], lse [Hq, T_local])``."""
    return AllGatherAttention.apply(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world)


# ----------------------------------------------- the same method over ring messages (simulation)


def _gather_by_posts(k, v, plan: GatherPlan, rank, world):
    """Generator: every rank's shared rows of ``k`` and ``v`` through ``W - 1`` ring posts, in the
    gathered keys' order (None, None without shared documents)."""
    if not plan.width:
        return None, None
    mine = _send_pair(k, v, plan, rank)
    handles = []
    for s in range(1, world):
        handles.append((yield Post([mine], s, TAG_KV)))
    blocks = [None] * world
    blocks[rank] = mine
    for s, h in zip(range(1, world), handles, strict=True):
        (blocks[(rank - s) % world],) = yield Wait(h)
    return _in_stream_order(torch.cat(blocks), plan)


def allgather_fwd_loop(backend, q, k, v, layout, cu, rank, world, causal, window, scale, softcap):
    """Generator (``ringflash.comm.ring``'s protocol): the all-gather method's forward for one rank,
    its gather made of ring posts, for ``ringflash.parallel.simulate``. Returns ``gathered_fwd``'s
    ``(out, lse)``."""
    plan = gather_plan(layout, cu, rank, world, causal, window)
    kf, vf = yield from _gather_by_posts(k, v, plan, rank, world)
    return gathered_fwd(backend, q, k, v, lambda: (kf, vf), plan, scale, softcap)


def allgather_bwd_loop(
    backend, dout, q, k, v, out, lse, layout, cu, rank, world, causal, window, scale, softcap
):
    """Generator: the backward of ``allgather_fwd_loop``; the reduce-scatter sends each block's
    float32 dK/dV to its owner. Returns ``gathered_bwd``'s ``(dq, dk, dv)``."""
    plan = gather_plan(layout, cu, rank, world, causal, window)
    kf, vf = yield from _gather_by_posts(k, v, plan, rank, world)
    dq, dk, dv, both = gathered_bwd(backend, dout, q, k, v, lambda: (kf, vf), out, lse, plan, scale, softcap)
    if both is None:
        return dq, dk, dv
    mine = both[rank].clone()
    handles = []
    for s in range(1, world):  # block of rank r + s goes s ranks ahead; the sum for mine comes from r - s
        handles.append((yield Post([both[(rank + s) % world]], s, TAG_DKV)))
    for h in handles:
        (got,) = yield Wait(h)
        mine.add_(got)
    _add_home(dk, dv, mine, plan, rank)
    return dq, dk, dv


__all__ = ["allgather_attention", "allgather_bwd_loop", "allgather_fwd_loop", "choose_method", "gather_plan"]
