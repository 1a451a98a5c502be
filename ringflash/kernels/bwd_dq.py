"""dQ kernel of the backward pass (launched by ``bwd.attn_bwd``).

One program owns ``BLOCK_M`` rows of one query head (Q, dO, LSE, delta and dQ in registers) and
streams the key blocks of its KV head in the forward's three runs (masked head, mask-free middle,
masked tail), recomputing ``p`` and ``dS`` as the dK/dV kernel does.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _attn_prologue, _block_ranges, _dot, _run_bounds, _scores, _tile_src, _visible


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, k_src, v_src, stride_ks, stride_vs, offs_m, offs_n, offs_d, offs_dv,
    start, full_start, full_end, end, seqlen_q, seqlen_k, lo, hi, sm_scale, softcap,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # k_src / v_src: TMA descriptors of the sequence's K/V (zero-filled past its end and past the
    # head dim), else pointer tiles at its first key. The forward's three runs of key blocks in
    # order, MASKED a constexpr of each.
    for RUN in tl.static_range(3):
        MASKED = RUN != 1
        j_start, j_end = _run_bounds(RUN, start, full_start, full_end, end)
        for j0 in range(j_start, j_end, BLOCK_N):
            offs_j = j0 + offs_n
            kv_row = offs_j[:, None] < seqlen_k
            if TMA:
                k = k_src.load([j0, 0])
                v = v_src.load([j0, 0])
            elif MASKED or D_PAD != HEAD_DIM or DV_PAD != HEAD_DIM_V:
                k = tl.load(
                    k_src + j0 * stride_ks,
                    mask=kv_row & (offs_d[None, :] < HEAD_DIM),
                    other=0.0,
                )
                v = tl.load(
                    v_src + j0 * stride_vs,
                    mask=kv_row & (offs_dv[None, :] < HEAD_DIM_V),
                    other=0.0,
                )
            else:
                k = tl.load(k_src + j0 * stride_ks)
                v = tl.load(v_src + j0 * stride_vs)
            s, t = _scores(q, k, sm_scale, softcap, SOFTCAP, DOT_PREC, DOT_F32)
            p = tl.exp2(s - lse2[:, None])
            if MASKED:
                p = tl.where(_visible(offs_m, offs_j, seqlen_q, seqlen_k, lo, hi, HAS_LO, HAS_HI), p, 0.0)
            dp = _dot(do, tl.trans(v), None, DOT_PREC, DOT_F32)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC, DOT_F32)
    return dq


@triton.jit(
    do_not_specialize=["seqlen_q", "seqlen_k", "diag", "window_left", "window_right", "total_q", "total_k"]
)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, DIAG_PTR, SEQ_ORDER, FLAG,
    stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd, stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    stride_lb, stride_lh, stride_ls, stride_eb, stride_eh, stride_es,
    seqlen_q, seqlen_k, diag, window_left, window_right, n_heads_q, group,
    sm_scale, softcap, sched_width, SEQ_BUCKET, total_q, total_k,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr, TWO_PART: tl.constexpr, ORDERED: tl.constexpr,
    ADD: tl.constexpr, WIDE: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, KEEP_UNSEEN: tl.constexpr, CHECK_CU: tl.constexpr,
):  # fmt: skip
    # Causal: the longest row blocks first, in groups of heads (``_tile_order``).
    b, h, i0, q_start, k_start, seqlen_q, seqlen_k, lo, hi, offs_m, q_row0, rows, ks, vs = _attn_prologue(
        CU_Q, CU_K, DIAG_PTR, SEQ_ORDER, seqlen_q, seqlen_k, diag, window_left, window_right, n_heads_q,
        sched_width, stride_ks, stride_vs, FLAG, total_q, total_k, HAS_HI, IS_VARLEN, DIAG_FROM_PTR,
        TWO_PART, ORDERED, WIDE, False, CHECK_CU, BLOCK_M,
    )  # fmt: skip
    if i0 >= seqlen_q:
        return
    if KEEP_UNSEEN and seqlen_k == 0:
        # Rows of a sequence with no keys, in given buffers: their dQ rows keep what they
        # hold (a packed call's spacer sequences). Otherwise they are stored as zeros.
        return
    hk = h // group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    row = offs_m < seqlen_q
    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + q_row0.to(tl.int64) * stride_qs
        + h * stride_qh
        + rows[:, None] * stride_qs
        + offs_d[None, :] * stride_qd,
        mask=row[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    do = tl.load(
        DO
        + b.to(tl.int64) * stride_dob
        + q_row0.to(tl.int64) * stride_dos
        + h * stride_doh
        + rows[:, None] * stride_dos
        + offs_dv[None, :] * stride_dod,
        mask=row[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    lse = tl.load(
        LSE + b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls, mask=row, other=0.0
    )
    delta = tl.load(
        DELTA + b.to(tl.int64) * stride_eb + h * stride_eh + (q_start + offs_m) * stride_es,
        mask=row,
        other=0.0,
    )
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_seq = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh
    v_seq = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh
    k_src = _tile_src(k_seq, seqlen_k, stride_ks, stride_kd, offs_n, offs_d, HEAD_DIM, BLOCK_N, D_PAD, TMA)
    v_src = _tile_src(
        v_seq, seqlen_k, stride_vs, stride_vd, offs_n, offs_dv, HEAD_DIM_V, BLOCK_N, DV_PAD, TMA
    )
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    start, full_start, full_end, end = _block_ranges(i0, seqlen_k, lo, hi, HAS_LO, HAS_HI, BLOCK_M, BLOCK_N)
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_src, v_src, ks, vs, offs_m, offs_n, offs_d, offs_dv,
        start, full_start, full_end, end, seqlen_q, seqlen_k, lo, hi, sm_scale, softcap,
        HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, DOT_PREC, DOT_F32, TMA, BLOCK_N,
    )  # fmt: skip
    dq = dq * sm_scale

    dq_ptrs = (
        DQ
        + b.to(tl.int64) * stride_dqb
        + q_row0.to(tl.int64) * stride_dqs
        + h * stride_dqh
        + rows[:, None] * stride_dqs
        + offs_d[None, :] * stride_dqd
    )
    dq_mask = row[:, None] & (offs_d[None, :] < HEAD_DIM)
    if ADD:
        dq += tl.load(dq_ptrs, mask=dq_mask, other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)
