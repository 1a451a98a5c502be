"""All-gather context parallelism for packed documents (the document-masked recipe of Llama 3).

Every rank gathers the K/V of the documents that span several ranks (*shared* documents; GQA makes
K/V a fraction of Q's size), then attends its local queries to the keys they need in a few packed
(varlen) calls, with no further communication; documents that lie whole on one rank attend their
local K/V and never travel. The backward computes float32 dK/dV for the shared documents and sends
each key's partial back to the rank that holds the key, which sums them. Against the ring it
trades memory (the shared documents' K/V on every rank that reads them, and their float32 dK/dV in
the backward) for fewer, larger kernel calls and two collectives instead of ``W - 1`` transfers
per direction.

The gather is an uneven all-to-all: a rank sends another only the rows of the documents that rank
holds queries of, and of each only the keys those queries can see (``_reach``: under a causal mask
none past the rank's last query in the document), and keeps the keys it receives in stream
order, so for ``contiguous``, ``zigzag`` and ``balanced`` every local query run of a document meets
the document's keys in ONE sequence of a packed call (with its own causal diagonal): contiguous
runs one call, zigzag and balanced one where a rank's two pieces of a document are tile multiples
(one sequence with a two-part diagonal, ``doc_layouts._two_part``) and two otherwise (the first
and the second piece of every document). ``stripe`` queries sit every ``W``-th position, which no
single diagonal describes: they attend the whole gathered stream in rank-block order with
the ring's own per-step pieces (``W`` calls).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch

from ..backends import backend_for, device_throughput
from ..comm.gather import start_exchange
from .doc_layouts import DocSegment, _calls, _coalesce_full, _pairs, _two_part, doc_segments
from .layouts import Piece, _band, _mask_args
from .ring_loop import bwd_piece, fwd_piece


@dataclass(frozen=True)
class GatherPlan:
    """One rank's all-gather plan.

    ``local``: calls on the rank's own K/V (documents whole on this rank). ``shared``: calls on the
    gathered K/V. ``send[d]``: this rank's local rows that rank ``d`` reads (rows of documents held
    by several ranks; ``send[rank]``: those it reads itself), in the order ``d`` places them;
    ``recv[s]``: how many rows it receives from rank ``s``. The exchange's blocks are a
    destination's K rows then its V rows. ``own``: the local rows of shared documents (the union
    of ``send``); ``home[d]``: the position in ``own`` of each row of ``send[d]``, where its
    gradient comes back. ``moves``: some rank sends a row (the same on every rank, so every rank
    joins the collective or none does). ``src``: ``[2, n]``, for every gathered key (the shared
    documents that this rank holds queries of, in stream order), its K row and its V row in the
    received blocks (None: stripe, whose received blocks in rank order are the gathered keys).
    ``write_once``: no local row is in two calls' sequences; ``covers_all``: moreover every local
    row is in one; ``keys_once``: no gathered key is in two sequences (a document's two runs on
    this rank are one sequence), so the backward writes the gathered keys' dK/dV instead of adding;
    ``keys_covered``: moreover every gathered key is in one (causal masks: a rank gathers each
    document's keys up to its last query only), so no gathered key's dK/dV needs a zero fill.
    """

    local: tuple[Piece, ...]
    shared: tuple[Piece, ...]
    send: tuple[torch.Tensor, ...]
    recv: tuple[int, ...]
    own: torch.Tensor
    home: tuple[torch.Tensor, ...]
    moves: bool
    src: torch.Tensor | None
    write_once: bool = False
    covers_all: bool = False
    keys_once: bool = False
    keys_covered: bool = False
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, key, device: torch.device, make) -> torch.Tensor:
        """The index tensor ``make()`` (derived from the plan) on ``device``, made and copied there
        once under ``key``: a copy from the host on every call would wait for the device."""
        key = (key, str(device))
        if key not in self.copies:
            self.copies[key] = make().to(device)
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
    """This rank's calls on its own and on the gathered keys, and the rows it exchanges."""
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
        every = torch.arange(n_local)
        return GatherPlan(
            (), tuple(pieces), (every,) * world, (n_local,) * world, every, (every,) * world, True, None
        )
    shared = [n > 1 for n in _spans(layout, cu, world)]
    segs_of = [[s for s in doc_segments(layout, cu, r, world) if s.count] for r in range(world)]
    # The keys each rank reads of each shared document it holds queries of: ``reach[d][doc]``,
    # positions [k0, k1) in the document (causal: up to its last query; a window: from its first
    # query's reach), so a rank receives no key that none of its queries sees past its reach.
    reach = [_reach(segs, shared, cu, causal, window) for segs in segs_of]
    segs = segs_of[rank]
    mine = {s.local0 for s in segs if not shared[s.doc]}
    own_pairs = [p for p in _pairs(layout, cu, rank, rank, world, causal, window) if p[0] in mine]
    local = _calls(_coalesce_full(own_pairs))
    start, at = {}, 0  # each read document's first gathered row (its key k0 of reach)
    for d, (k0, k1) in sorted(reach[rank].items()):
        start[d] = at - k0
        at += k1 - k0

    def rows_for(r: int, d: int) -> list[DocSegment]:  # rank r's rows that rank d reads
        return [x for s in segs_of[r] if s.doc in reach[d] for x in _clip(s, *reach[d][s.doc])]

    send = tuple(_rows(rows_for(rank, d)) for d in range(world))
    recv = tuple(sum(s.count for s in rows_for(r, rank)) for r in range(world))
    own = _rows([s for s in segs if shared[s.doc]])
    where = torch.full((n_local,), -1, dtype=torch.int64)
    where[own] = torch.arange(len(own))
    home = tuple(where[x] for x in send)
    src, block = torch.empty((2, at), dtype=torch.int64), 0
    for r in range(world):  # rank r's block: its K rows for this rank, then its V rows
        i = 0
        for s in rows_for(r, rank):
            dest = start[s.doc] + s.pos0
            src[0, dest : dest + s.count] = torch.arange(block + i, block + i + s.count)
            src[1, dest : dest + s.count] = src[0, dest : dest + s.count] + recv[r]
            i += s.count
        block += 2 * recv[r]
    pairs = []
    for sq in segs:
        if not shared[sq.doc]:
            continue
        k0, k1 = _keys_seen(sq, cu[sq.doc + 1] - cu[sq.doc], causal, window)
        if k0 >= k1:
            continue
        args = _mask_args(*_band(sq.pos0, k0, 1, causal, window), sq.count, k1 - k0)
        if args is not None:
            pairs.append((sq.local0, sq.count, start[sq.doc] + k0, k1 - k0, args))
    pairs = _two_part(pairs)  # a document's two runs on this rank: one sequence
    q_runs = sorted((p[0], p[0] + p[1]) for p in [*pairs, *own_pairs])
    once = all(a[1] <= b[0] for a, b in itertools.pairwise(q_runs))  # no row in two calls
    covers = once and sum(b - a for a, b in q_runs) == n_local
    k_runs = sorted((p[2], p[2] + p[3]) for p in pairs)
    keys_once = all(a[1] <= b[0] for a, b in itertools.pairwise(k_runs))
    keys_covered = keys_once and sum(b - a for a, b in k_runs) == at
    return GatherPlan(
        tuple(local),
        tuple(_calls(pairs)),
        send,
        recv,
        own,
        home,
        any(shared),
        src,
        once,
        covers,
        keys_once,
        keys_covered,
    )


def _keys_seen(sq: DocSegment, n_doc: int, causal: bool, window) -> tuple[int, int]:
    """Positions ``[k0, k1)`` in its document of the keys that the queries of ``sq`` (stride 1)
    can see."""
    lo, hi = _band(sq.pos0, 0, 1, causal, window)  # keys at their positions in the document
    k0 = 0 if lo == -math.inf else max(0, int(lo))
    k1 = n_doc if hi == math.inf else min(n_doc, sq.count + int(hi))
    return k0, k1


def _reach(segs, shared, cu, causal, window) -> dict[int, tuple[int, int]]:
    """``{doc: (k0, k1)}``: for every shared document a rank holds queries of, the positions of
    the keys they can see (the hull over its segments of the document)."""
    reach = {}
    for s in segs:
        if shared[s.doc]:
            k0, k1 = _keys_seen(s, cu[s.doc + 1] - cu[s.doc], causal, window)
            a, b = reach.get(s.doc, (k0, k1))
            reach[s.doc] = (min(a, k0), max(b, k1))
    return reach


def _clip(s: DocSegment, k0: int, k1: int) -> list[DocSegment]:
    """The part of segment ``s`` (stride 1) at positions ``[k0, k1)`` of its document."""
    a, b = max(k0 - s.pos0, 0), min(k1 - s.pos0, s.count)
    return [DocSegment(s.doc, s.local0 + a, b - a, s.pos0 + a, 1)] if a < b else []


def _rows(segs) -> torch.Tensor:
    """The local rows of ``segs``, in their order."""
    if not segs:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(s.local0, s.local0 + s.count) for s in segs])


def _sizes(plan: GatherPlan) -> tuple[list[int], list[int]]:
    """Rows this rank sends to and receives from each rank in the exchange of K and V (a block is
    K rows, then as many V rows)."""
    return [2 * len(x) for x in plan.send], [2 * n for n in plan.recv]


def _outgoing(backend, k: torch.Tensor, v: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """The exchange's input ``[sum(sends), Hk, D]``: for every rank ``d`` in order, this rank's K
    rows that ``d`` reads, then their V rows (one pass on backends that gather from both)."""
    n = k.shape[0]
    rows = plan.on(("out", n), k.device, lambda: torch.cat([torch.cat([x, x + n]) for x in plan.send]))
    return backend.gather_rows(k, v, rows)


def _in_stream_order(got: torch.Tensor, plan: GatherPlan):
    """``(kf, vf)``: the gathered keys in stream order from the received blocks ``got``."""
    if plan.src is None:  # stripe: the blocks in rank order are the gathered keys
        blocks = got.view(len(plan.recv), 2, plan.recv[0], *got.shape[1:])
        return blocks[:, 0].reshape(-1, *got.shape[1:]), blocks[:, 1].reshape(-1, *got.shape[1:])
    both = got.index_select(0, plan.on("src", got.device, lambda: plan.src.reshape(-1)))
    n = plan.src.shape[1]
    return both[:n], both[n:]


def _start_gather(backend, k, v, group, plan: GatherPlan):
    """Start exchanging the shared documents' rows of ``k`` and ``v`` (one collective); returns the
    function that waits for them and returns the gathered keys in stream order (``(None, None)``
    when no row moves: nothing is exchanged)."""
    if not plan.moves:
        return lambda: (None, None)
    sends, recvs = _sizes(plan)
    wait = start_exchange(_outgoing(backend, k, v, plan), sends, recvs, group)
    return lambda: _in_stream_order(wait(), plan)


def fwd_state(q, v, plan: GatherPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's results for every head, ``(out [T_local, H, Dv], lse [H, T_local] float32)``,
    which each piece's calls write their heads of: in q's dtype when every local row is written by
    one call at most (``plan.write_once``), else a float32 state the calls merge into; rows that
    no call writes (no key visible) are zeros with an LSE of -inf."""
    shape, lse_shape = q.shape[:-1] + (v.shape[-1],), (q.shape[1], q.shape[0])
    dtype = q.dtype if plan.write_once else torch.float32
    if plan.covers_all:
        return (
            torch.empty(shape, dtype=dtype, device=q.device),
            torch.empty(lse_shape, dtype=torch.float32, device=q.device),
        )
    return (
        torch.zeros(shape, dtype=dtype, device=q.device),
        torch.full(lse_shape, -math.inf, dtype=torch.float32, device=q.device),
    )


def heads_fwd(backend, q, k, v, piece, gathered, plan: GatherPlan, scale, softcap, state) -> None:
    """This rank's attention over its own and the gathered keys for one piece's heads (``piece``:
    its KV and query heads), written into their heads of ``state`` (``fwd_state``): the kernels
    read and write those heads in place, strided. ``gathered()`` returns the piece's gathered
    ``(kf, vf)``; it is called after the calls on the local documents, which thus overlap the
    gather.

    With ``plan.write_once`` (every local row belongs to one call's sequence at most; the calls'
    spacer sequences write nothing) each call writes its rows: no merge. Otherwise (stripe, or a
    document in two pieces on one rank under a window) the calls merge into the float32 state.
    """
    kh, qh = piece
    q, k, v, out, lse = q[:, qh], k[:, kh], v[:, kh], state[0][:, qh], state[1][qh]
    merge = not plan.write_once
    for pc in plan.local:
        fwd_piece(backend, q, k, v, out, lse, pc, scale, softcap, True, merge=merge)
    kf, vf = gathered()
    for pc in plan.shared:
        fwd_piece(backend, q, kf, vf, out, lse, pc, scale, softcap, True, merge=merge)


def bwd_state(q, k, v, plan: GatherPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's ``dq``, ``dk``, ``dv`` for every head, which each piece's calls write or add
    their heads of: in the inputs' dtypes when each call writes its rows (``plan.write_once``;
    zeros where no call writes), else float32 sums. The shared keys' partials that come back are
    added into ``dk``/``dv``."""
    if plan.write_once:
        dq = torch.empty_like(q) if plan.covers_all else torch.zeros_like(q)
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    return tuple(torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))


def heads_bwd(
    backend, dout, q, k, v, out, lse, delta, piece, gathered, plan: GatherPlan, scale, softcap, grads
):
    """Gradients of ``heads_fwd`` for one piece's heads, into their heads of ``grads``
    (``bwd_state``: ``dq``, and ``dk``/``dv`` of the local documents); returns the float32 dK/dV of
    the piece's gathered keys in the received blocks' layout, ready to go back to their owners
    (``_returning``; None when nothing was gathered). ``delta``: ``rowsum(dout * out)`` minus the
    gradient into the LSE, float32 ``[H, T_local]`` (every head). The shared keys' dK/dV are
    written when no gathered key is in two sequences (``plan.keys_once``), else summed.
    """
    kh, qh = piece
    dout, q, k, v, out, lse, delta = dout[:, qh], q[:, qh], k[:, kh], v[:, kh], out[:, qh], lse[qh], delta[qh]
    dq, dk, dv = grads[0][:, qh], grads[1][:, kh], grads[2][:, kh]
    once = plan.write_once
    add_local, add_gathered = (not once, not once), (not once, not plan.keys_once)
    for pc in plan.local:
        bwd_piece(backend, dout, q, k, v, out, lse, delta, dq, dk, dv, pc, scale, softcap, True, add_local)
    kf, vf = gathered()
    if kf is None:
        return None
    n = kf.shape[0]  # keys in no call's sequences get zeros
    alloc = torch.empty if plan.keys_covered else torch.zeros
    dkv = alloc((2 * n, *kf.shape[1:]), dtype=torch.float32, device=q.device)
    dkf, dvf = dkv[:n], dkv[n:]
    for pc in plan.shared:
        bwd_piece(
            backend, dout, q, kf, vf, out, lse, delta, dq, dkf, dvf, pc, scale, softcap, True, add_gathered
        )
    return _returning(dkv, plan)


def _returning(dkv: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """The shared keys' float32 dK/dV (``dkv``: their dK rows in stream order, then their dV rows)
    in the received blocks' layout, for the reverse exchange that takes them to their owners."""
    n = dkv.shape[0] // 2
    if plan.src is None:  # stripe: stream order is the blocks' rank order
        world = len(plan.recv)
        return torch.stack([dkv[:n].view(world, -1), dkv[n:].view(world, -1)], 1).view(dkv.shape)

    def inverse():  # src is a permutation of the received rows: every one is a gathered key
        inv = torch.empty(2 * n, dtype=torch.int64)
        inv[plan.src.reshape(-1)] = torch.arange(2 * n)
        return inv

    return dkv.index_select(0, plan.on("inverse", dkv.device, inverse))


def _add_home(backend, dk, dv, back: torch.Tensor, plan: GatherPlan) -> None:
    """Set the shared documents' rows of ``dk``/``dv`` (no call on this rank writes them) to the
    partials that came back (``back``: from every rank ``d`` in order, float32 dK then dV of the
    rows of ``send[d]``), summed in float32 in rank order, so the sum is the same on a simulated
    and a real group."""
    if not len(plan.own):
        return
    sources = plan.on("sources", back.device, lambda: _sources(plan))
    backend.sum_rows_into(back, dk, dv, sources, plan.on("own", dk.device, lambda: plan.own))


def _sources(plan: GatherPlan) -> torch.Tensor:
    """``[W, 2 * len(own)]``: for each rank in order, the row of ``back`` (``_add_home``) holding
    the dK (first half) and dV (second half) partial of each own row, -1 where it sent none."""
    n_own = len(plan.own)
    sources = torch.full((len(plan.send), 2 * n_own), -1, dtype=torch.int64)
    at = 0
    for d, home in enumerate(plan.home):
        m = len(home)
        sources[d, home] = torch.arange(at, at + m)
        sources[d, home + n_own] = torch.arange(at + m, at + 2 * m)
        at += 2 * m
    return sources


_TILE_ROWS = 128  # query rows per program of the attention kernels
_MIN_WAVES = 4  # programs per piece's call, in waves of the device's SMs


def pieces_for(hq: int, hk: int, n_local: int, sms: int | None) -> int:
    """How many pieces of KV heads the exchange goes in by default: one without a GPU (``sms``
    None: nothing runs beside the calls); on a GPU with ``sms`` multiprocessors, the most of 4 and
    2 that divides ``hk`` and leaves each piece's forward call ``_MIN_WAVES`` waves of query-tile
    programs (``ceil(n_local / 128) * hq / pieces``), so that splitting the heads does not leave
    the GPU part idle."""
    if sms is None:
        return 1
    tiles = -(-n_local // _TILE_ROWS)
    for n in (4, 2):
        if hk % n == 0 and tiles * (hq // n) >= _MIN_WAVES * sms:
            return n
    return 1


def default_heads_k_stride(q: torch.Tensor, k: torch.Tensor) -> int:
    """KV heads per piece of the exchange when the caller names none, for packed ``q [T, Hq, D]``
    and ``k [T, Hk, D]`` (``pieces_for`` on q's device)."""
    got = device_throughput(q.device)
    return k.shape[-2] // pieces_for(q.shape[-2], k.shape[-2], q.shape[0], None if got is None else got[0])


def check_heads_k_stride(stride, hk: int) -> None:
    """Raise ``ValueError`` unless ``stride`` is None or a positive divisor of ``hk``."""
    if stride is not None and (
        isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or hk % stride
    ):
        raise ValueError(
            f"heads_k_stride must be None or a positive divisor of the KV heads ({hk}): got {stride!r}"
        )


def head_pieces(hq: int, hk: int, stride: int) -> list[tuple[slice, slice]]:
    """``(KV heads, query heads)`` of each piece of ``stride`` KV heads (with their GQA query heads:
    query head ``i`` reads KV head ``i // (hq // hk)``)."""
    g = hq // hk
    return [(slice(h, h + stride), slice(h * g, (h + stride) * g)) for h in range(0, hk, stride)]


def _gathers(backend, k, v, group, plan: GatherPlan, pieces):
    """``(piece, gathered)`` for each piece: its KV heads' exchange (``_start_gather``), the next
    piece's started before the current one is handed out (``_pipelined``)."""

    def start(piece):
        return _start_gather(backend, k[:, piece[0]], v[:, piece[0]], group, plan)

    return _pipelined(pieces, start)


def _pipelined(pieces, start):
    """``(piece, wait)`` for each piece, the next piece's transfer started (``start(piece)``) before
    the current one is handed out: its calls run while the next piece travels."""
    ahead = start(pieces[0])
    for i, piece in enumerate(pieces):
        current = ahead
        if i + 1 < len(pieces):
            ahead = start(pieces[i + 1])
        yield piece, current


def bwd_delta(backend, dout, out, dlse) -> torch.Tensor:
    """``rowsum(dout * out)`` for every head, minus the gradient into the LSE (``dlse`` or None)."""
    delta = backend.attn_bwd_delta(dout, out, packed=True)
    return delta if dlse is None else (delta - dlse).contiguous()


class AllGatherAttention(torch.autograd.Function):
    """Autograd for the all-gather method: gather, attend, and in the backward send dK/dV back.
    The exchange goes in pieces of ``stride`` KV heads; a piece's calls overlap the next piece's
    transfer (and, in the backward, the previous piece's dK/dV on their way back)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world, stride):
        plan = gather_plan(layout, cu, rank, world, causal, window)
        backend, state = backend_for(q), fwd_state(q, v, plan)
        for piece, gathered in _gathers(
            backend, k, v, group, plan, head_pieces(q.shape[1], k.shape[1], stride)
        ):
            heads_fwd(backend, q, k, v, piece, gathered, plan, scale, softcap, state)
        out, lse = state[0].to(q.dtype), state[1]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, cu, scale, softcap, causal, window, group, rank, world, stride)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        layout, cu, scale, softcap, causal, window, group, rank, world, stride = ctx.args
        plan = gather_plan(layout, cu, rank, world, causal, window)
        backend = backend_for(q)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta, grads = bwd_delta(backend, dout, out, dlse), bwd_state(q, k, v, plan)
        sends, recvs = _sizes(plan)

        def add_home(kh, wait):
            if wait is not None:
                _add_home(backend, grads[1][:, kh], grads[2][:, kh], wait(), plan)

        returning = None
        for piece, gathered in _gathers(
            backend, k, v, group, plan, head_pieces(q.shape[1], k.shape[1], stride)
        ):
            back = heads_bwd(
                backend, dout, q, k, v, out, lse, delta, piece, gathered, plan, scale, softcap, grads
            )
            # the reverse exchange: each partial to the rank that sent the row (None on every rank
            # when no row moves); the previous piece's partials are added while these travel
            travelling = None if back is None else start_exchange(back, recvs, sends, group)
            if returning is not None:
                add_home(*returning)
            returning = (piece[0], travelling)
        add_home(*returning)
        dq, dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 10)


METHODS = ("ring", "allgather", "auto")


def allgather_attention(q, k, v, layout, cu, scale, softcap, causal, window, group, rank, world, stride=None):
    """Attention of this rank's packed queries over the whole stream's gathered K/V:
    ``(out [T_local, Hq, D], lse [Hq, T_local])``. ``stride``: KV heads per piece of the exchange
    (a divisor of ``Hk``; None: ``default_heads_k_stride``)."""
    if stride is None:
        stride = default_heads_k_stride(q, k)
    args = (layout, cu, scale, softcap, causal, window, group, rank, world, stride)
    return AllGatherAttention.apply(q, k, v, *args)


__all__ = [
    "allgather_attention",
    "check_heads_k_stride",
    "default_heads_k_stride",
    "gather_plan",
    "head_pieces",
    "pieces_for",
]
