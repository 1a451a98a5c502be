"""The ring loop: forward and backward of exact attention with K/V travelling around the ranks.

One loop serves every layout; the ``Plan`` (``layouts.py``) says which local attention calls each
step makes and with which masks. Rank ``r`` at step ``t`` holds the K/V block of rank
``(r - t) mod W``.

Forward, per step: post the send of the current K/V to rank r+1 (and the receive of the next
block from r-1) *before* computing, run the step's pieces in accumulate mode into the float32
``(out, lse)`` state (exact LSE merging, ``ringflash.merge``), then wait for the next block. The
final cast to the input dtype happens once, outside this loop.

Backward, per step: K/V travel the same way again; the float32 dK/dV of the block being visited
travel *with* it: from the first rank after the block's owner, each rank adds its contribution and
passes the sum on, and after the last step every block's sum is sent straight back to its owner
(one hop when all ``W`` steps ran, ``n-1`` hops back when a sliding window cut the ring short),
which adds it to its own block's part (that part never travels). dQ stays local. Communication is
posted before each step's compute so that it overlaps with it.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..comm.ring import Post, Wait
from .layouts import Piece, Plan, seq_order

TAG_KV, TAG_DKV, TAG_HOME = 0, 1, 2
MAX_PREFETCH = 31  # K/V blocks held at once: one message of 2 * 31 tensors fits the gloo tags


def _tok(x: torch.Tensor, packed: bool, a: int, b: int) -> torch.Tensor:
    """Tokens ``a:b`` of a padded ``[B, S, ...]`` or packed ``[T, ...]`` tensor (a view)."""
    return x.narrow(0 if packed else 1, a, b - a)


def _lse(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x.narrow(-1, a, b - a)


def _diag_rows(pc: Piece) -> list:
    """A packed piece's diagonals: one per sequence, or ``(diag, split, diag2)`` rows for every
    sequence when one of them is two-part (the others then split past their last row)."""
    if not any(isinstance(d, tuple) for d in pc.diag):
        return pc.diag
    lens = [b - a for a, b in itertools.pairwise(pc.cu_q)]
    return [d if isinstance(d, tuple) else (d, n, d) for d, n in zip(pc.diag, lens, strict=True)]


def _mask_kwargs(pc: Piece, packed: bool, device: torch.device) -> dict:
    kw = {"causal": pc.causal, "window_size": pc.window}
    if not packed:
        kw["diag_offset"] = pc.diag
        return kw
    key = str(device)
    if key not in pc.tensors:
        as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
        order = seq_order(pc)
        pc.tensors[key] = dict(
            cu_seqlens_q=as_i32(pc.cu_q),
            cu_seqlens_k=as_i32(pc.cu_k),
            max_seqlen_q=max(b - a for a, b in itertools.pairwise(pc.cu_q)),
            max_seqlen_k=max(b - a for a, b in itertools.pairwise(pc.cu_k)),
            diag_offset=as_i32(_diag_rows(pc)),
            **({} if order is None else {"seq_order": as_i32(order)}),
        )
    kw.update(pc.tensors[key])
    return kw


def fwd_piece(
    backend, q, k, v, out, lse, pc: Piece, scale: float, softcap: float, packed: bool, merge: bool = True
) -> None:
    """Merge the attention of one piece into the float32 state ``(out, lse)`` (``merge=False``:
    write it there, for a piece that is the first to touch every one of its rows).

    Both backends take strided views, so a piece that covers part of the local tokens (a zigzag
    half) reads and merges in place: no copies and no separate merge.
    """
    qp, kp, vp = _tok(q, packed, pc.q0, pc.q1), _tok(k, packed, pc.k0, pc.k1), _tok(v, packed, pc.k0, pc.k1)
    op, lp = _tok(out, packed, pc.q0, pc.q1), _lse(lse, pc.q0, pc.q1)
    kw = _mask_kwargs(pc, packed, q.device)
    backend.attn_fwd(qp, kp, vp, softmax_scale=scale, softcap=softcap, out=op, lse=lp, merge=merge, **kw)


def bwd_piece(
    backend,
    dout,
    q,
    k,
    v,
    out,
    lse,
    delta,
    dq,
    dk,
    dv,
    pc: Piece,
    scale,
    softcap,
    packed,
    accumulate=(True, True),
    dkv_rows=None,
) -> None:
    """Add the gradients of one piece into the float32 ``dq`` (local) and ``dk``/``dv`` (travelling),
    or write them there (``accumulate``, as for the backends' ``attn_bwd``). ``dkv_rows`` (packed):
    for every row of ``k``, the row of ``dk`` and of ``dv`` where its gradient goes (the backends'
    ``dkv_rows``); None: the same row."""
    qa, qb, ka, kb = pc.q0, pc.q1, pc.k0, pc.k1
    kw = _mask_kwargs(pc, packed, q.device)
    kw.update(softmax_scale=scale, softcap=softcap, delta=_lse(delta, qa, qb))
    if dkv_rows is not None:
        kw["dkv_rows"] = (dkv_rows[0][ka:kb], dkv_rows[1][ka:kb])
    else:
        dk, dv = _tok(dk, packed, ka, kb), _tok(dv, packed, ka, kb)
    backend.attn_bwd(
        _tok(dout, packed, qa, qb),
        _tok(q, packed, qa, qb),
        _tok(k, packed, ka, kb),
        _tok(v, packed, ka, kb),
        _tok(out, packed, qa, qb),
        _lse(lse, qa, qb),
        dq=_tok(dq, packed, qa, qb),
        dk=dk,
        dv=dv,
        accumulate=accumulate,
        **kw,
    )


def lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, ...]:
    """Shape of the LSE of ``q``: ``[B, H, S]`` padded, ``[H, T]`` packed."""
    return (q.shape[1], q.shape[0]) if packed else (q.shape[0], q.shape[2], q.shape[1])


def _fused_calls(steps: list[list[Piece]], blocks: list[list[torch.Tensor]], packed: bool):
    """The local calls of several ring steps held at once: ``(piece, k, v)`` per call.

    Fully visible pieces of different steps over the same query rows become ONE call over their
    keys laid end to end (a softmax over a union of keys does not depend on the keys' order): one
    launch and one pass over the float32 state instead of one per step. Masked and packed pieces
    keep their own calls.
    """
    calls, runs = [], {}
    for pieces, (k, v) in zip(steps, blocks, strict=True):
        for pc in pieces:
            if pc.full and not packed:
                runs.setdefault((pc.q0, pc.q1), []).append((pc, k, v))
            else:
                calls.append((pc, k, v))
    for (q0, q1), run in runs.items():
        if len(run) == 1:
            calls.append(run[0])
            continue
        ks = torch.cat([_tok(k, packed, pc.k0, pc.k1) for pc, k, _ in run], dim=1)
        vs = torch.cat([_tok(v, packed, pc.k0, pc.k1) for pc, _, v in run], dim=1)
        pc = run[0][0]
        calls.append((Piece(q0, q1, 0, ks.shape[1], pc.causal, pc.diag, pc.window, True), ks, vs))
    return calls


def _pass_on(plan: Plan, t: int, held: list, like: list):
    """The step-``t`` post of K/V: the block held at step ``t`` goes on to the next rank and the
    block of step ``t + 1`` comes in, each only where the plan's reach says (None: neither)."""
    send = held if plan.sends(t) else []
    recv = like if plan.holds(t + 1) else []
    if not send and not recv:
        return None
    return Post(send, 1, TAG_KV, recv=None if send and recv else recv)


def ring_fwd_loop(
    backend, q, k, v, plan: Plan, scale: float, softcap: float, packed: bool, prefetch: int = 1
):
    """Generator: this rank's forward ring; returns float32 ``(out, lse)``.

    ``prefetch`` (``p``): after its own block, a rank holds the K/V blocks of ``p`` ring steps at
    once and computes them together (``_fused_calls``), while the next ``p`` blocks travel: each
    rank sends the blocks it holds ``p`` ranks ahead (the first ``p`` blocks: its own, to ranks
    ``r+1 .. r+p``). ``p = 1`` is the plain ring. Every rank must pass the same ``p``. A plan whose
    blocks travel different distances (``Plan.reach``) runs the plain ring, each block going only
    as far as it is needed.
    """
    n = plan.n_steps
    # When the first step is one call over every local query (a rank's own block), it writes the
    # state instead of merging into an initialised one: no fill of the float32 buffers and no read
    # of them in that call. (Packed calls leave rows outside every sequence unwritten.)
    first = plan.steps[0] if n else []
    rows = q.shape[0 if packed else 1]
    write_first = not packed and len(first) == 1 and first[0].q0 == 0 and first[0].q1 == rows
    out_shape = q.shape[:-1] + (v.shape[-1],)
    if write_first:
        out = torch.empty(out_shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(lse_shape(q, packed), dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros(out_shape, dtype=torch.float32, device=q.device)
        lse = torch.full(lse_shape(q, packed), -math.inf, dtype=torch.float32, device=q.device)
    g = max(1, min(int(prefetch), n - 1, MAX_PREFETCH)) if plan.regular else 1
    if g == 1:
        post = _pass_on(plan, 0, [k, v], [k, v])
        handles = [(yield post)] if post is not None else []
    else:
        handles = []
        for shift in range(1, g + 1):
            handles.append((yield Post([k, v], shift, TAG_KV)))
    for pc in first:
        fwd_piece(backend, q, k, v, out, lse, pc, scale, softcap, packed, not write_first)
    held: list[torch.Tensor] = []
    for h in handles:
        held += yield Wait(h)
    t = 1
    while t < n:
        size = min(g, n - t)  # held: the blocks of steps t .. t + size - 1
        if g == 1:
            post = _pass_on(plan, t, held, [k, v])
        else:
            need = min(g, n - t - size)  # blocks of the next steps, held now by rank r - g
            post = Post(held[: 2 * need], g, TAG_KV) if need else None
        handle = (yield post) if post is not None else None
        if size == 1:
            calls = [(pc, held[0], held[1]) for pc in plan.steps[t]]
        else:
            blocks = [held[2 * i : 2 * i + 2] for i in range(size)]
            calls = _fused_calls(plan.steps[t : t + size], blocks, packed)
        for pc, kb, vb in calls:
            fwd_piece(backend, q, kb, vb, out, lse, pc, scale, softcap, packed)
        held = (yield Wait(handle)) if handle is not None else []
        t += size
    return out, lse


def ring_bwd_loop(
    backend, dout, q, k, v, out, lse, plan: Plan, scale: float, softcap: float, packed: bool, dlse=None
):
    """Generator: this rank's backward ring; returns float32 ``(dq, dk, dv)`` of its own shard.

    K/V travel as in the forward (``Plan.reach``). The dK/dV sum of a block starts at the first
    rank that visits it after its owner (step 1), travels with the block, and from the last rank
    it reaches goes straight home, where the owner adds it to its own block's part: that part
    never travels. The own block runs after the remote steps, while the last sum travels home.
    ``dlse``: the gradient flowing into the returned LSE, or None.
    """
    delta = backend.attn_bwd_delta(dout, out, packed=packed)
    if dlse is not None:  # d lse / d s = p: a gradient into the LSE folds into delta
        delta = (delta - dlse).contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    n, world = plan.n_steps, plan.world

    def zeros_like(x):
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    def run(pieces, kb, vb, dk_acc, dv_acc):
        for pc in pieces:
            bwd_piece(
                backend, dout, q, kb, vb, out, lse, delta, dq, dk_acc, dv_acc, pc, scale, softcap, packed
            )

    # Shapes of the float32 dK/dV sums that arrive (the communicator allocates the buffers).
    dkv_like = [torch.empty((), device=x.device).expand(x.shape) for x in (k, v)]
    post = _pass_on(plan, 0, [k, v], [k, v])
    kv_handle = (yield post) if post is not None else None
    dkv_handle = None  # brings the sum of the ranks before this one for the block of the next step
    sent = []  # sums sent without a receive in the same post: waited for at the end
    for t in range(1, n):
        kv = (yield Wait(kv_handle)) if kv_handle is not None else []
        post = _pass_on(plan, t, kv, [k, v])
        kv_handle = (yield post) if post is not None else None
        dk_t = dv_t = None
        if plan.steps[t]:
            dk_t, dv_t = zeros_like(k), zeros_like(v)
            run(plan.steps[t], kv[0], kv[1], dk_t, dv_t)
        if dkv_handle is not None:
            dk_in, dv_in = yield Wait(dkv_handle)
            if dk_t is None:
                dk_t, dv_t = dk_in, dv_in
            else:
                dk_t.add_(dk_in)
                dv_t.add_(dv_in)
        elif dk_t is None and plan.holds(t):
            dk_t, dv_t = zeros_like(k), zeros_like(v)
        # The block's sum goes on with it, or home from the last rank it reaches (W - t ahead);
        # the sum for the next step's block comes from the rank before.
        recv = dkv_like if plan.holds(t + 1) else []
        dkv_handle = None
        if dk_t is not None and plan.sends(t) and recv:  # the regular ring: pass on and receive
            dkv_handle = yield Post([dk_t, dv_t], 1, TAG_DKV)
        else:
            if dk_t is not None:
                shift, tag = (1, TAG_DKV) if plan.sends(t) else (world - t, TAG_HOME)
                sent.append((yield Post([dk_t, dv_t], shift, tag, recv=[])))
            if recv:
                dkv_handle = yield Post([], 1, TAG_DKV, recv=recv)
    hops = plan.reach[plan.rank] if n > 1 else 0
    home = None
    if hops:
        home = yield Post([], 1, TAG_HOME, recv=dkv_like, recv_shift=world - hops)
    dk, dv = zeros_like(k), zeros_like(v)
    run(plan.steps[0], k, v, dk, dv)
    if home is not None:
        dk_home, dv_home = yield Wait(home)
        dk.add_(dk_home)
        dv.add_(dv_home)
    for h in sent:
        yield Wait(h)
    return dq, dk, dv
