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
holds queries of, and of each only the keys those queries can see (``gather_plan``: under a causal
mask none past the rank's last query in the document), and keeps the keys it receives in stream
order, so for ``contiguous``, ``zigzag`` and ``balanced`` every local query run of a document meets
the document's keys in ONE sequence of a packed call (with its own causal diagonal): contiguous
runs one call, zigzag and balanced one where a rank's two pieces of a document are tile multiples
(one sequence with a two-part diagonal, ``doc_layouts._two_part``) and two otherwise (the first
and the second piece of every document). ``stripe`` queries sit every ``W``-th position, which no
single diagonal describes: they attend the whole gathered stream in rank-block order with
the ring's own per-step pieces (``W`` calls). On a GPU the calls on a rank's own documents run on a
second stream beside those on the gathered keys (``_beside``), so that neither call's last wave of
programs leaves SMs idle.
"""

from __future__ import annotations

import math

import torch

from ..backends import backend_for, beside, device_throughput
from ..comm.gather import start_exchange
from .gather_plan import GatherPlan, _sizes, gather_plan
from .ring_loop import bwd_piece, fwd_piece


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


def _two_streams(plan: GatherPlan) -> bool:
    """Whether this rank's calls on its own documents may run on a second stream beside those on
    the gathered keys (``_beside``): both kinds of calls exist and they write different rows
    (``plan.write_once``; calls that merge into a shared float32 state would write the same)."""
    return bool(plan.write_once and plan.local and plan.shared)


def _beside(q: torch.Tensor, plan: GatherPlan):
    """Yields the context that the local documents' calls run in: a second CUDA stream that starts
    after the work queued so far and that the current stream waits for when the block ends
    (``backends.beside``), or a no-op (``_two_streams`` False, CPU tensors, a graph capture before
    the stream exists). The two kinds of calls write different rows (and the gathered keys'
    dK/dV a buffer of their own), so running them side by side changes no bit; each call's last
    wave of programs then overlaps the other's instead of idling SMs."""
    return beside(q.device, "local documents", _two_streams(plan))


def heads_fwd(backend, q, k, v, piece, gathered, plan: GatherPlan, scale, softcap, state) -> None:
    """This rank's attention over its own and the gathered keys for one piece's heads (``piece``:
    its KV and query heads), written into their heads of ``state`` (``fwd_state``): the kernels
    read and write those heads in place, strided. ``gathered()`` returns the piece's gathered
    ``(kf, vf)``; it is called after the calls on the local documents, which thus overlap the
    gather.

    With ``plan.write_once`` (every local row belongs to one call's sequence at most; the calls'
    spacer sequences write nothing) each call writes its rows: no merge, and on a GPU the local
    calls run on a second stream beside the others (``_beside``). Otherwise (stripe, or a
    document in two pieces on one rank under a window) the calls merge into the float32 state.
    """
    kh, qh = piece
    q, k, v, out, lse = q[:, qh], k[:, kh], v[:, kh], state[0][:, qh], state[1][qh]
    merge = not plan.write_once
    with _beside(q, plan) as local_stream:
        with local_stream:
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
    with _beside(q, plan) as local_stream:
        with local_stream:
            for pc in plan.local:
                bwd_piece(
                    backend, dout, q, k, v, out, lse, delta, dq, dk, dv, pc, scale, softcap, True, add_local
                )
        kf, vf = gathered()
        if kf is None:
            return None
        n = kf.shape[0]  # keys in no call's sequences get zeros
        alloc = torch.empty if plan.keys_covered else torch.zeros
        dkv = alloc((2 * n, *kf.shape[1:]), dtype=torch.float32, device=q.device)
        if plan.src is None:  # stripe: stream order, then in blocks (``_returning``)
            dkf, dvf, rows = dkv[:n], dkv[n:], None
        else:  # each key's dK and dV written straight into the received blocks' rows it came in
            dkf = dvf = dkv
            rows = plan.on("src", q.device, lambda: plan.src.reshape(-1))
            rows = (rows[:n], rows[n:])
        for pc in plan.shared:
            bwd_piece(
                backend,
                dout,
                q,
                kf,
                vf,
                out,
                lse,
                delta,
                dq,
                dkf,
                dvf,
                pc,
                scale,
                softcap,
                True,
                add_gathered,
                rows,
            )
    return dkv if rows is not None else _returning(dkv, plan)


def _returning(dkv: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """Stripe's float32 dK/dV of the gathered keys (``dkv``: dK rows in stream order, which is the
    blocks' rank order, then dV rows) in the received blocks' layout, for the reverse exchange that
    takes them to their owners."""
    n, world = dkv.shape[0] // 2, len(plan.recv)
    return torch.stack([dkv[:n].view(world, -1), dkv[n:].view(world, -1)], 1).view(dkv.shape)


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
    """``(piece, gathered)`` for each piece: its KV heads' exchange (``_start_gather``), started by
    the first piece's ``gathered()`` and by each one for the next piece (``_pipelined``)."""

    def start(piece):
        return _start_gather(backend, k[:, piece[0]], v[:, piece[0]], group, plan)

    return _pipelined(pieces, start)


def _pipelined(pieces, start):
    """``(piece, gathered)`` for each piece: ``gathered()`` starts the piece's transfer if it has
    not started (``start(piece)``, which returns the function that waits for it), starts the next
    piece's, and waits for its own. ``heads_fwd`` and ``heads_bwd`` call it after queueing the
    calls on the rank's own documents, so those calls overlap the first piece's outgoing rows
    being gathered as well as its transfer; each later piece travels during the calls of the one
    before. Every rank starts the transfers in the same order."""
    started = {}

    def gathered(i):
        if i not in started:
            started[i] = start(pieces[i])
        if i + 1 < len(pieces) and i + 1 not in started:
            started[i + 1] = start(pieces[i + 1])
        return started.pop(i)()

    for i, piece in enumerate(pieces):
        yield piece, lambda i=i: gathered(i)


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
    "head_pieces",
    "pieces_for",
]
