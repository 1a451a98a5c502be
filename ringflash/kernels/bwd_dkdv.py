"""dK/dV kernel of the backward pass (launched by ``bwd.attn_bwd``).

One program owns ``BLOCK_N`` keys of one KV head, keeps K, V, dK and dV in registers, and streams
the query blocks of every query head of its GQA group that can see those keys (the forward band
transposed: query ``i`` sees key ``j`` iff ``-hi <= i - j <= -lo``). ``p = exp(s - lse)`` is
recomputed from the saved LSE; ``dS = p * (dP - delta)``. No atomics: each program owns its rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _attn_prologue, _block_ranges, _dot, _run_bounds, _scores, _tile_src, _visible


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_src, do_src, lse_ptrs, delta_ptrs, stride_qs, stride_dos, stride_ls, stride_es,
    offs_m, offs_n, offs_d, offs_dv, start, full_start, full_end, end, seqlen_q, seqlen_k, lo, hi,
    sm_scale, softcap,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # q_src / do_src: TMA descriptors of this query head's rows (zero-filled past the sequence and
    # the head dim), else pointer tiles at its first row. ``start``..``end``: the runs of query
    # blocks that see this key block. Blocks run last to first, so the runs do too (masked tail,
    # mask-free middle, masked head; MASKED a constexpr of each): under a causal mask every
    # program ends its rows at the sequence's end, so programs that start together read the same
    # query blocks at the same time (shared through L2), where first-to-last order starts each at
    # its own diagonal and no two read the same block at once.
    for R in tl.static_range(3):
        RUN = 2 - R
        MASKED = RUN != 1
        i_start, i_end = _run_bounds(RUN, start, full_start, full_end, end)
        n_blocks = tl.cdiv(i_end - i_start, BLOCK_M)
        for it in range(0, n_blocks):
            i0 = i_start + (n_blocks - 1 - it) * BLOCK_M
            offs_i = i0 + offs_m
            row = offs_i < seqlen_q
            if TMA:
                q = q_src.load([i0, 0])
                do = do_src.load([i0, 0])
            elif MASKED or D_PAD != HEAD_DIM or DV_PAD != HEAD_DIM_V:
                q = tl.load(
                    q_src + i0 * stride_qs,
                    mask=row[:, None] & (offs_d[None, :] < HEAD_DIM),
                    other=0.0,
                )
                do = tl.load(
                    do_src + i0 * stride_dos,
                    mask=row[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
                    other=0.0,
                )
            else:
                q = tl.load(q_src + i0 * stride_qs)
                do = tl.load(do_src + i0 * stride_dos)
            lse = tl.load(lse_ptrs + i0 * stride_ls, mask=row, other=0.0)
            delta = tl.load(delta_ptrs + i0 * stride_es, mask=row, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            sT, tT = _scores(k, q, sm_scale, softcap, SOFTCAP, DOT_PREC, DOT_F32)  # [BLOCK_N, BLOCK_M]
            pT = tl.exp2(sT - lse2[None, :])
            if MASKED:
                # Rows are keys here: key j sees query i iff -hi <= i - j <= -lo.
                pT = tl.where(_visible(offs_n, offs_i, seqlen_k, seqlen_q, -hi, -lo, HAS_HI, HAS_LO), pT, 0.0)
            dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC, DOT_F32)
            dpT = _dot(v, tl.trans(do), None, DOT_PREC, DOT_F32)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC, DOT_F32)
    return dk, dv


@triton.jit(
    do_not_specialize=["seqlen_q", "seqlen_k", "diag", "window_left", "window_right", "total_q", "total_k"]
)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, DIAG_PTR, SEQ_ORDER, FLAG, DK_ROWS, DV_ROWS,
    stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd, stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh, stride_dkd, stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_lb, stride_lh, stride_ls, stride_eb, stride_eh, stride_es,
    seqlen_q, seqlen_k, diag, window_left, window_right, n_heads_k, group,
    sm_scale, softcap, sched_width, SEQ_BUCKET, total_q, total_k,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr, TWO_PART: tl.constexpr, ORDERED: tl.constexpr,
    ADD: tl.constexpr, WIDE: tl.constexpr, MAPPED: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, KEEP_UNSEEN: tl.constexpr, CHECK_CU: tl.constexpr,
):  # fmt: skip
    # Causal: key block 0 sees the most query rows; the longest first, in groups of heads
    # (``_tile_order``).
    b, hk, j0, q_start, k_start, seqlen_q, seqlen_k, lo, hi, offs_n, k_row0, cols, qs, dos = _attn_prologue(
        CU_Q, CU_K, DIAG_PTR, SEQ_ORDER, seqlen_q, seqlen_k, diag, window_left, window_right, n_heads_k,
        sched_width, stride_qs, stride_dos, FLAG, total_q, total_k, HAS_HI, IS_VARLEN, DIAG_FROM_PTR,
        TWO_PART, ORDERED, WIDE, True, CHECK_CU, BLOCK_N,
    )  # fmt: skip
    if j0 >= seqlen_k:
        return
    if KEEP_UNSEEN and seqlen_q == 0:
        # Keys of a sequence with no queries, in given buffers: their dK/dV rows keep what they
        # hold (a packed call's spacer sequences). Otherwise they are stored as zeros.
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    kv_row = offs_n[:, None] < seqlen_k
    k_off = b.to(tl.int64) * stride_kb + k_row0.to(tl.int64) * stride_ks + hk * stride_kh
    v_off = b.to(tl.int64) * stride_vb + k_row0.to(tl.int64) * stride_vs + hk * stride_vh
    k = tl.load(
        K + k_off + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
        mask=kv_row & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    v = tl.load(
        V + v_off + cols[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
        mask=kv_row & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)

    # Query rows that see this key block: -hi <= i - j <= -lo (the forward band, transposed).
    start, full_start, full_end, end = _block_ranges(j0, seqlen_q, -hi, -lo, HAS_HI, HAS_LO, BLOCK_N, BLOCK_M)
    if TWO_PART:  # keys past the first part's reach: its rows see none of them
        split = tl.load(DIAG_PTR + 3 * b + 1)
        floor = tl.where(j0 >= split + tl.load(DIAG_PTR + 3 * b), split, 0)
        start = tl.minimum(tl.maximum(start, floor), end)
        full_start = tl.minimum(tl.maximum(full_start, start), end)
        full_end = tl.maximum(full_end, full_start)
    for g in range(0, group):
        h = hk * group + g
        q_seq = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
        do_seq = DO + b.to(tl.int64) * stride_dob + q_start.to(tl.int64) * stride_dos + h * stride_doh
        q_src = _tile_src(
            q_seq, seqlen_q, stride_qs, stride_qd, offs_m, offs_d, HEAD_DIM, BLOCK_M, D_PAD, TMA
        )
        do_src = _tile_src(
            do_seq, seqlen_q, stride_dos, stride_dod, offs_m, offs_dv, HEAD_DIM_V, BLOCK_M, DV_PAD, TMA
        )
        lse_ptrs = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls
        delta_ptrs = DELTA + b.to(tl.int64) * stride_eb + h * stride_eh + (q_start + offs_m) * stride_es
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_src, do_src, lse_ptrs, delta_ptrs, qs, dos, stride_ls, stride_es,
            offs_m, offs_n, offs_d, offs_dv, start, full_start, full_end, end, seqlen_q, seqlen_k,
            lo, hi, sm_scale, softcap,
            HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, DOT_PREC, DOT_F32, TMA, BLOCK_M,
        )  # fmt: skip
    dk = dk * sm_scale

    if MAPPED:
        # Packed keys whose gradients go to rows of their own (``DK_ROWS``/``DV_ROWS``, one per key
        # row of the call): the all-gather's dK/dV land in the exchange's layout, not the keys'.
        seen = offs_n < seqlen_k
        dk_rows = tl.load(DK_ROWS + k_start + offs_n, mask=seen, other=0).to(tl.int64)
        dv_rows = tl.load(DV_ROWS + k_start + offs_n, mask=seen, other=0).to(tl.int64)
        dk_ptrs = DK + dk_rows[:, None] * stride_dks + hk * stride_dkh + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + dv_rows[:, None] * stride_dvs + hk * stride_dvh + offs_dv[None, :] * stride_dvd
    else:
        dk_ptrs = (
            DK
            + b.to(tl.int64) * stride_dkb
            + k_row0.to(tl.int64) * stride_dks
            + hk * stride_dkh
            + cols[:, None] * stride_dks
            + offs_d[None, :] * stride_dkd
        )
        dv_ptrs = (
            DV
            + b.to(tl.int64) * stride_dvb
            + k_row0.to(tl.int64) * stride_dvs
            + hk * stride_dvh
            + cols[:, None] * stride_dvs
            + offs_dv[None, :] * stride_dvd
        )
    dk_mask = kv_row & (offs_d[None, :] < HEAD_DIM)
    dv_mask = kv_row & (offs_dv[None, :] < HEAD_DIM_V)
    if ADD:
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0)
        dv += tl.load(dv_ptrs, mask=dv_mask, other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=dv_mask)
