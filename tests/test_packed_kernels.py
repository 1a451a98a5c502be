"""Packed calls of the local kernels as the ring and the all-gather method make them: spacer
sequences (no keys, or no queries) that leave given buffers as they are, gradients written into
given buffers, and two-part diagonals (a rank's two runs of one document in one sequence); through
the blockwise backend, the Triton kernels under the interpreter, and on a GPU.
"""

from __future__ import annotations

import math
import sys

import background
import pytest
import torch
from test_kernels import REPO, _interp_env

import ringflash as rf

_TRITON_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import torch
import ringflash as rf
from test_packed import _sim_case
from test_packed_kernels import _mapped_case, _ordered_case, _two_part_case, _written_gradients_case
with rf.use_backend("triton"):
    for layout, method, world, mask in (
        ("zigzag", "ring", 3, dict(causal=True)),
        ("zigzag", "allgather", 2, dict(causal=True, window_size=(5, 0))),
        ("stripe", "ring", 2, dict()),
        ("contiguous", "allgather", 3, dict(causal=True)),
        ("balanced", "allgather", 2, dict(causal=True)),
    ):
        _sim_case(world, 8, layout, method, mask, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        _written_gradients_case(rf.backends.get_backend("triton"), dtype)
    err = _two_part_case(rf.backends.get_backend("triton"))
    assert err < 1e-4, err
    assert _ordered_case(rf.backends.get_backend("triton")) == []
    assert _mapped_case(rf.backends.get_backend("triton")) == []
print("ok")
"""
TRITON_JOB = background.job(
    "packed-interp",
    [sys.executable, "-c", _TRITON_SCRIPT],
    cwd=REPO,
    env=_interp_env(),
    timeout=600,
)


def _written_gradients_case(backend, dtype, device="cpu"):
    """``attn_bwd`` with given buffers and ``accumulate=(False, True)``: dQ written in the buffer's
    dtype, dK/dV added; the spacer sequences' rows (no keys / no queries) keep what they held."""
    torch.manual_seed(0)
    cu_q, cu_k = [0, 5, 9, 9, 16], [0, 7, 7, 12, 20]  # sequence 1: no keys; sequence 2: no queries
    q, k, v = (torch.randn(n, h, 8, dtype=dtype, device=device) for n, h in ((16, 4), (20, 2), (20, 2)))
    dout = torch.randn(16, 4, 8, dtype=dtype, device=device)
    kw = dict(
        softmax_scale=8**-0.5,
        causal=True,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=7,
        max_seqlen_k=8,
    )
    out, lse = backend.attn_fwd(q, k, v, **kw)
    want = backend.attn_bwd(dout, q, k, v, out, lse, **kw)
    dq = torch.full(q.shape, 7.0, dtype=dtype, device=device)
    dk, dv = torch.ones(k.shape, device=device), torch.ones(v.shape, device=device)
    backend.attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, accumulate=(False, True), **kw)
    assert (dq[5:9] == 7).all(), "rows of a sequence with no keys are left as they are"
    assert (dk[7:12] == 1).all() and (dv[7:12] == 1).all(), "keys of a sequence with no queries too"
    rows, keys = [*range(5), *range(9, 16)], [*range(7), *range(12, 20)]
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dq[rows].float(), want[0][rows].float(), **tol)
    torch.testing.assert_close(dk[keys] - 1, want[1][keys].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dv[keys] - 1, want[2][keys].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gradients_written_into_given_buffers(dtype):
    _written_gradients_case(rf.backends.get_backend("torch"), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_gradients_written_into_given_buffers_cuda():
    for dtype in (torch.float32, torch.bfloat16):
        _written_gradients_case(rf.backends.get_backend("triton"), dtype, "cuda")


@pytest.mark.background(TRITON_JOB)
def test_packed_calls_through_the_triton_kernels_under_the_interpreter():
    """The packed calls' spacer sequences (no keys, or no queries) and a two-part sequence (a
    rank's two runs of a document in one sequence) through the Triton kernels. Which runs the
    all-gather makes two-part is the plan's, the same on every backend (``test_packed``'s long
    documents, on the blockwise backend): the interpreter takes minutes over tile-multiple runs."""
    pytest.importorskip("triton")
    r, _ = background.result(TRITON_JOB)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def _ordered_case(backend, device="cpu", dtype=torch.float32) -> list[str]:
    """Packed calls given ``seq_order`` (the order in which the programs take the sequences) give
    bit for bit the results of the same calls without it: causal, windowed and full masks, GQA, a
    one-token sequence, a spacer, a sequence longer than a tile, sequence orders that differ for
    query and key tiles, gradients written and added. Returns what differed."""
    g = torch.Generator().manual_seed(3)
    cu_q, cu_k = [0, 40, 41, 41, 170, 200], [0, 40, 141, 150, 279, 309]
    shapes = ((200, 4), (309, 2), (309, 2))
    q, k, v = (torch.randn(n, h, 16, generator=g).to(device, dtype) for n, h in shapes)
    dout = torch.randn(200, 4, 16, generator=g).to(device, dtype)
    order = torch.stack([torch.randperm(5, generator=g) for _ in range(2)]).to(device, torch.int32)
    base = dict(
        softmax_scale=0.25,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=129,
        max_seqlen_k=129,
    )
    bad = []
    for mask in (dict(causal=True), dict(causal=True, window_size=(17, 0)), dict()):
        kw = dict(base, **mask)
        results = []
        for extra in ({}, {"seq_order": order}):
            out, lse = backend.attn_fwd(q, k, v, **kw, **extra)
            grads = backend.attn_bwd(dout, q, k, v, out, lse, **kw, **extra)
            bufs = [torch.ones(x.shape, device=device) for x in (q, k, v)]
            backend.attn_bwd(dout, q, k, v, out, lse, dq=bufs[0], dk=bufs[1], dv=bufs[2], **kw, **extra)
            results.append([out, lse, *grads, *bufs])
        names = ["out", "lse", "dq", "dk", "dv", "dq added", "dk added", "dv added"]
        for name, a, b in zip(names, *results, strict=True):
            if not torch.equal(a, b):
                bad.append(f"{mask}: {name}")
    return bad


def _mapped_case(backend, device="cpu", dtype=torch.float32) -> list[str]:
    """``attn_bwd`` with ``dkv_rows`` (each key row's dK and dV go to rows of their own, here of one
    shared buffer, as the all-gather's exchange lays them out) gives bit for bit the dK/dV of the
    same call in place, moved to those rows, gradients written and added, causal and full masks,
    GQA, a spacer sequence whose keys have no queries (their rows keep what they hold); dQ is
    unchanged. Returns what differed."""
    g = torch.Generator().manual_seed(5)
    cu_q, cu_k = [0, 40, 41, 41, 170], [0, 40, 141, 150, 279]
    q, k, v = (
        torch.randn(n, h, 16, generator=g).to(device, dtype) for n, h in ((170, 4), (279, 2), (279, 2))
    )
    dout = torch.randn(170, 4, 16, generator=g).to(device, dtype)
    place = torch.randperm(2 * 279, generator=g)
    rows = (place[:279].to(device), place[279:].to(device))
    kw = dict(
        softmax_scale=0.25,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=129,
        max_seqlen_k=129,
    )
    bad = []
    for mask in (dict(causal=True), dict()):
        out, lse = backend.attn_fwd(q, k, v, **kw, **mask)
        for add in (False, True):
            start = torch.randn(2 * 279, 2, 16, generator=g).to(device)
            dq_in, dk_in, dv_in = (torch.zeros(x.shape, device=device) for x in (q, k, v))
            dk_in.copy_(start[rows[0].cpu()]), dv_in.copy_(start[rows[1].cpu()])
            acc = (False, add)
            backend.attn_bwd(
                dout, q, k, v, out, lse, dq=dq_in, dk=dk_in, dv=dv_in, accumulate=acc, **kw, **mask
            )
            want = start.cpu().clone()
            want[rows[0].cpu()], want[rows[1].cpu()] = dk_in.cpu(), dv_in.cpu()
            dq_map, dkv = torch.zeros(q.shape, device=device), start.clone()
            backend.attn_bwd(
                dout,
                q,
                k,
                v,
                out,
                lse,
                dq=dq_map,
                dk=dkv,
                dv=dkv,
                accumulate=acc,
                dkv_rows=rows,
                **kw,
                **mask,
            )
            if not torch.equal(dkv.cpu(), want):
                bad.append(f"{mask}, added {add}: dk/dv")
            if not torch.equal(dq_map, dq_in):
                bad.append(f"{mask}, added {add}: dq")
    return bad


def test_mapped_key_rows_give_the_same_gradients():
    assert _mapped_case(rf.backends.get_backend("torch")) == []


def _on_gpu(case) -> list[str]:
    """``case(backend, "cuda", dtype)`` on the Triton kernels in float32 and bfloat16, with one tile
    config per kernel (the cases do not depend on it) so that they compile once instead of
    autotuning each: ``SMALL_HEAD_TILES``, which compile at head dim 16 in both dtypes. Returns
    what differed."""
    from dist_utils import SMALL_HEAD_TILES, one_triton_config, restore_triton_configs

    saved = one_triton_config(tiles=SMALL_HEAD_TILES)
    try:
        return [
            f"{dtype}: {x}"
            for dtype in (torch.float32, torch.bfloat16)
            for x in case(rf.backends.get_backend("triton"), "cuda", dtype)
        ]
    finally:
        restore_triton_configs(saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mapped_key_rows_give_the_same_gradients_cuda():
    assert _on_gpu(_mapped_case) == []


def test_ordered_sequences_change_no_result():
    """The blockwise backend takes ``seq_order`` and ignores it (it schedules no programs)."""
    assert _ordered_case(rf.backends.get_backend("torch")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ordered_sequences_change_no_result_cuda():
    """On a GPU, where programs run concurrently."""
    assert _on_gpu(_ordered_case) == []


def test_seq_order_ranks_sequences_by_their_heaviest_tile():
    """``seq_order`` of a packed piece: permutations, heaviest tile first on each side (the end of
    a long document before short documents; key tiles by the queries that see them), None when
    stream order already is that order."""
    from ringflash.parallel.layouts import Piece, seq_order

    # Sequences: 100 rows, all keys; 10 rows at the end of a 1000-key document; 300 rows, causal.
    cu_q, cu_k = [0, 100, 110, 410], [0, 100, 1100, 1400]
    pc = Piece(0, 410, 0, 1400, True, [0, 990, 0], (-1, 0), cu_q=cu_q, cu_k=cu_k)
    q_order, k_order = seq_order(pc)
    assert q_order == [1, 2, 0], "the most keys a query tile sees: 1000, 300, 100"
    assert k_order == [2, 0, 1], "the most queries a key tile is seen by: 300, 100, 10"
    short_first = Piece(0, 10, 0, 30, True, [15, 5], (-1, 0), cu_q=[0, 5, 10], cu_k=[0, 20, 30])
    assert seq_order(short_first) is None, "20 then 10 keys, 5 and 5 queries: already in order"
    assert seq_order(Piece(0, 10, 0, 10, True, [0], (-1, 0), cu_q=[0, 10], cu_k=[0, 10])) is None


def _two_part_case(backend, device="cpu", dtype=torch.float32):
    """A packed call with a two-part sequence (a rank's head and tail runs of one document against
    the document's keys, ``diag_offset`` rows ``(diag, split, diag2)``), an ordinary causal sequence
    and a spacer, through ``backend``: output, LSE and gradients against the float64 oracle of the
    same masks. Returns the largest error relative to the oracle's largest value."""
    torch.manual_seed(0)
    # Sequence 0: head rows at positions 128..255, tail rows at 384..483, keys 0..483 of the
    # document. Sequence 1: 50 rows at positions 30..79 of a 80-key document. Sequence 2: a spacer.
    cu_q, cu_k = [0, 228, 278, 278], [0, 484, 564, 570]
    diag = torch.tensor([[128, 128, 256], [30, 50, 30], [0, 0, 0]], dtype=torch.int32, device=device)
    T, Tk = cu_q[-1], cu_k[-1]
    q, k, v = (torch.randn(n, h, 16, device=device).to(dtype) for n, h in ((T, 4), (Tk, 2), (Tk, 2)))
    dout = torch.randn(T, 4, 16, device=device).to(dtype)
    kw = dict(
        softmax_scale=0.25,
        causal=True,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=228,
        max_seqlen_k=484,
        diag_offset=diag,
    )
    out, lse = backend.attn_fwd(q, k, v, **kw)
    dq, dk, dv = backend.attn_bwd(dout, q, k, v, out, lse, **kw)
    leaves = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    outs, lses = [], []
    for b in range(2):
        d, split, d2 = diag[b].tolist()
        rows = torch.arange(cu_q[b + 1] - cu_q[b])
        reach = torch.where(rows < split, rows + d, rows + d2)
        seen = torch.arange(cu_k[b + 1] - cu_k[b])[None, :] <= reach[:, None]
        qb = leaves[0][cu_q[b] : cu_q[b + 1]]
        kb, vb = (x[cu_k[b] : cu_k[b + 1]].repeat_interleave(2, 1) for x in leaves[1:])
        s = torch.einsum("qhd,khd->hqk", qb, kb) * 0.25
        s = s.masked_fill(~seen, -math.inf)
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vb))
    want = torch.cat(outs)
    grads = torch.autograd.grad(want, leaves, dout.double().cpu())
    want, lses = want.detach(), [x.detach() for x in lses]
    errs = [
        (out.double().cpu() - want).abs().max() / want.abs().max(),
        (lse.cpu()[:, :278] - torch.cat(lses, 1)).abs().max(),
    ]
    for got, w in zip((dq, dk, dv), grads, strict=True):
        errs.append((got.double().cpu()[: w.shape[0]] - w).abs().max() / w.abs().max())
    return max(float(e) for e in errs)


def test_two_part_sequences_match_the_oracle():
    """The blockwise backend's two-part diagonals (``varlen_diag``) against the float64 oracle."""
    assert _two_part_case(rf.backends.get_backend("torch")) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_part_sequences_through_the_triton_kernels_cuda():
    assert _two_part_case(rf.backends.get_backend("triton"), "cuda", torch.bfloat16) < 2e-2
