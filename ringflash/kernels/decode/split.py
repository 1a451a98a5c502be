"""The split-KV decoding kernel: a few query tokens against a long (optionally paged) KV cache.

Grid ``(num_splits, B * Hk, m_blocks)``. One program owns one KV head of one batch row and the
rows ``r = t * G + g`` (query token ``t``, query head ``hk * G + g``; ``G = Hq // Hk``) of its head
group, so K/V are read from memory once per KV head, not once per query head. The visible key
range of the row (``[0, seqlen_k)`` cut by the causal/window band) is divided into ``num_splits``
equal runs of ``BLOCK_N`` blocks; program ``split`` streams its run with an online softmax and
writes a float32 partial ``(out, lse)``. A program whose run is empty (a short or empty sequence)
writes ``lse = -inf`` and ``out = 0``. The partials of each row merge exactly (``lse = log sum exp
lse_s``, ``out = sum exp(lse_s - lse) out_s``; ``-inf`` safe, a row with no key ends as ``out = 0``,
``lse = -inf``): with ``FUSE_COMBINE`` the last program of the row to finish merges them (an int32
counter per row, see ``counters.py``), else the combine kernel of ``combine.py`` does. New tokens
(``FUSE_APPEND``) are written to the cache by the same launch (split 0 of each KV head) and read
from the ``KN``/``VN`` arguments by every program, so one step (append, attend, merge) is one
launch.

Mask convention (``ringflash.masking``): query token ``t`` sees key ``j`` iff ``lo <= j - t <= hi``
with ``diag = seqlen_k - seqlen_q`` (bottom-right; or one value per row from ``DIAG``), ``lo =
diag - window_left`` and ``hi = diag + window_right`` (``diag`` when causal). Lengths, rows and
pages read on the device are clamped into the cache, so nothing outside it is ever read or written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common import _dot, _rows_desc, _tanh
from .check import kv_value_bits, or_into_flag
from .combine import _combine_rows

# Literal constants: 1.4426950408889634 = log2(e), 0.6931471805599453 = ln(2) (see common.py).


@triton.jit
def _attend_block(
    q, k, v, offs_j, j_ok, offs_t, row_ok, m_i, l_i, acc, lo, hi, qk_scale, cap_scale, cap_out,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: returns the updated ``(m_i, l_i, acc)`` (base 2)."""
    s = _dot(q, tl.trans(k), None, DOT_PREC, DOT_F32)
    if SOFTCAP:
        s = _tanh(s * cap_scale) * cap_out
    else:
        s = s * qk_scale
    vis = j_ok[None, :] & row_ok[:, None]
    if HAS_HI:
        vis = vis & (offs_j[None, :] - offs_t[:, None] <= hi)
    if HAS_LO:
        vis = vis & (offs_j[None, :] - offs_t[:, None] >= lo)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible yet keep m = -inf: subtract 0 so exp2(-inf - -inf) is no NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines at ``ptrs`` (no registers written; nothing waits for them)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit(
    do_not_specialize=[
        "seqlen_q",
        "n_new",
        "page_size",
        "window_left",
        "window_right",
        "capacity",
        "n_rows",
        "batch",
    ]
)
def _decode_split_kernel(
    Q, K, V, KN, VN, OP, LSEP, O, LSE, SEM, SEQLENS, BT, CBI, DIAG, LEFTPAD,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_btb,
    stride_opb, stride_ops, stride_oph, stride_opn,
    stride_lpb, stride_lps, stride_lph,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, n_new, page_size, capacity, n_rows, window_left, window_right, n_kv_heads,
    sm_scale, softcap, FLAG, batch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, PAGED: tl.constexpr, HAS_CBI: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr, HAS_LEFTPAD: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
    FUSE_APPEND: tl.constexpr, FUSE_COMBINE: tl.constexpr, EVICT: tl.constexpr, TMA: tl.constexpr,
    COMBINE_M: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREFETCH_ROWS: tl.constexpr, PREFETCH_LINES: tl.constexpr, PREFETCH_STEP: tl.constexpr,
    CHECK: tl.constexpr, CHECK_BLOCK_B: tl.constexpr, CHECK_BLOCK_P: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    r0 = pid_m * BLOCK_M
    if CHECK:  # the call's value checks (``check.py``), in one program beside its own work
        if (split == 0) & (pid_bh == 0) & (pid_m == 0):
            bits = kv_value_bits(
                SEQLENS, LEFTPAD, BT, CBI, batch, capacity, n_new, n_rows, page_size,
                capacity // page_size, stride_btb, HAS_LEFTPAD, PAGED, HAS_CBI, FUSE_APPEND,
                CHECK_BLOCK_B, CHECK_BLOCK_P,
            )  # fmt: skip
            or_into_flag(FLAG, bits)
    if PREFETCH_ROWS > 0:
        # Split 0 of a contiguous cache with no lower window starts at key 0 whatever the length:
        # ask L2 for its first rows now, so the loop's first loads, issued once the length has
        # arrived, do not wait a second DRAM round trip. A hint only: nothing is read into
        # registers, and rows are clamped into the cache. PREFETCH_LINES is the row's 128-byte
        # lines rounded up to a power of two (an arange's length): lines past the row's last are
        # clamped onto it (no mask is needed for a repeated hint).
        if split == 0:
            pf_rows = tl.minimum(tl.arange(0, PREFETCH_ROWS), capacity - 1).to(tl.int64)
            pf_cols = tl.arange(0, PREFETCH_LINES) * PREFETCH_STEP
            if PREFETCH_LINES * PREFETCH_STEP >= HEAD_DIM + PREFETCH_STEP:
                pf_cols = tl.minimum(pf_cols, HEAD_DIM - 1)
            pf_k = K + hk * stride_kh + b.to(tl.int64) * stride_kb + pf_rows[:, None] * stride_ks
            pf_v = V + hk * stride_vh + b.to(tl.int64) * stride_vb + pf_rows[:, None] * stride_vs
            _prefetch_l2(pf_k + pf_cols[None, :])
            _prefetch_l2(pf_v + pf_cols[None, :])

    # Lengths, rows and pages are clamped into the cache: a no-op for checked inputs, and with
    # value checks skipped (or a captured graph replayed past its cache) nothing outside the cache
    # is read or written.
    n_old = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), capacity - n_new)
    seqlen_k = n_old + n_new
    if DIAG_FROM_PTR:
        diag = tl.load(DIAG + b)
    else:
        diag = seqlen_k - seqlen_q
    lo = diag - window_left
    hi = diag + window_right

    offs_r = r0 + tl.arange(0, BLOCK_M)
    offs_t = offs_r // GROUP  # query token of each row
    offs_h = hk * GROUP + offs_r % GROUP  # query head of each row
    row_ok = offs_t < seqlen_q
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    # Keys any row of this program can see: [vis_start, vis_end).
    t_first = r0 // GROUP
    t_last = tl.minimum((r0 + BLOCK_M - 1) // GROUP, seqlen_q - 1)
    vis_start = 0
    vis_end = seqlen_k
    if HAS_LO:
        vis_start = tl.maximum(t_first + lo, 0)
    if HAS_LEFTPAD:  # the row's cache starts at cache_leftpad[b]: earlier slots hold no key
        vis_start = tl.maximum(vis_start, tl.load(LEFTPAD + b))
    if HAS_HI:
        vis_end = tl.minimum(vis_end, t_last + hi + 1)
    vis_end = tl.maximum(vis_end, vis_start)
    n_blocks = tl.cdiv(vis_end - vis_start, BLOCK_N)
    per_split = tl.cdiv(n_blocks, n_splits)
    j_start = vis_start + split * per_split * BLOCK_N
    j_end = tl.minimum(j_start + per_split * BLOCK_N, vis_end)

    q_ptrs = (
        Q
        + b.to(tl.int64) * stride_qb
        + offs_t[:, None] * stride_qs
        + offs_h[:, None] * stride_qh
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if HAS_CBI:
        cache_row = tl.minimum(tl.maximum(tl.load(CBI + b), 0), n_rows - 1).to(tl.int64)
    else:
        cache_row = b.to(tl.int64)
    k_head = K + hk * stride_kh
    v_head = V + hk * stride_vh

    qk_scale = sm_scale * 1.4426950408889634
    cap_scale = 0.0
    cap_out = 0.0
    if SOFTCAP:
        cap_scale = sm_scale / softcap
        cap_out = softcap * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # FUSE_APPEND: keys [n_old, seqlen_k) are the new tokens; they are read from KN/VN (never from
    # the cache, which split 0 writes below), so no program depends on another's write.
    cache_end = j_end
    cache_rows = seqlen_k  # keys held in the cache itself
    if FUSE_APPEND:
        cache_end = tl.minimum(j_end, n_old)
        cache_rows = n_old
    if TMA:
        # Contiguous cache only: descriptors over this row's cached keys of this KV head; rows
        # past them (stale or unwritten slots) read as 0, so masked keys never meet NaN.
        k_desc = _rows_desc(k_head + cache_row * stride_kb, cache_rows, stride_ks, HEAD_DIM, BLOCK_N, D_PAD)
        v_desc = _rows_desc(v_head + cache_row * stride_vb, cache_rows, stride_vs, HEAD_DIM, BLOCK_N, D_PAD)
    for j0 in range(j_start, cache_end, BLOCK_N):
        offs_j = j0 + offs_n
        j_ok = offs_j < cache_end
        if TMA:
            k = k_desc.load([j0, 0])
            v = v_desc.load([j0, 0])
        elif PAGED:
            page = tl.load(BT + b.to(tl.int64) * stride_btb + offs_j // page_size, mask=j_ok, other=0)
            page = tl.minimum(tl.maximum(page, 0), n_rows - 1)
            k_rows = page.to(tl.int64) * stride_kb + (offs_j % page_size).to(tl.int64) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (offs_j % page_size).to(tl.int64) * stride_vs
        else:
            k_rows = cache_row * stride_kb + offs_j.to(tl.int64) * stride_ks
            v_rows = cache_row * stride_vb + offs_j.to(tl.int64) * stride_vs
        if not TMA:
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(
                k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0, eviction_policy=EVICT
            )
            v = tl.load(
                v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0, eviction_policy=EVICT
            )
        m_i, l_i, acc = _attend_block(
            q, k, v, offs_j, j_ok, offs_t, row_ok, m_i, l_i, acc, lo, hi, qk_scale, cap_scale, cap_out,
            HAS_LO, HAS_HI, SOFTCAP, DOT_PREC, DOT_F32,
        )  # fmt: skip
    if FUSE_APPEND:
        kn_head = KN + b.to(tl.int64) * stride_knb + hk * stride_knh
        vn_head = VN + b.to(tl.int64) * stride_vnb + hk * stride_vnh
        for j0 in range(tl.maximum(j_start, n_old), j_end, BLOCK_N):
            offs_j = j0 + offs_n
            j_ok = offs_j < j_end
            src = (offs_j - n_old).to(tl.int64)
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(kn_head + src[:, None] * stride_kns + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(vn_head + src[:, None] * stride_vns + offs_d[None, :], mask=kv_mask, other=0.0)
            m_i, l_i, acc = _attend_block(
                q, k, v, offs_j, j_ok, offs_t, row_ok, m_i, l_i, acc, lo, hi, qk_scale, cap_scale,
                cap_out, HAS_LO, HAS_HI, SOFTCAP, DOT_PREC, DOT_F32,
            )  # fmt: skip
        if (split == 0) & (pid_m == 0):
            # The append: this KV head's n_new tokens into cache slots n_old + [0, n_new).
            for i0 in range(0, n_new, BLOCK_N):
                offs_i = i0 + offs_n
                i_ok = offs_i < n_new
                pos = n_old + offs_i
                if PAGED:
                    page = tl.load(BT + b.to(tl.int64) * stride_btb + pos // page_size, mask=i_ok, other=0)
                    page = tl.minimum(tl.maximum(page, 0), n_rows - 1)
                    k_rows = page.to(tl.int64) * stride_kb + (pos % page_size).to(tl.int64) * stride_ks
                    v_rows = page.to(tl.int64) * stride_vb + (pos % page_size).to(tl.int64) * stride_vs
                else:
                    k_rows = cache_row * stride_kb + pos.to(tl.int64) * stride_ks
                    v_rows = cache_row * stride_vb + pos.to(tl.int64) * stride_vs
                n_mask = i_ok[:, None] & d_ok[None, :]
                src = offs_i.to(tl.int64)
                kn = tl.load(kn_head + src[:, None] * stride_kns + offs_d[None, :], mask=n_mask)
                vn = tl.load(vn_head + src[:, None] * stride_vns + offs_d[None, :], mask=n_mask)
                tl.store(k_head + k_rows[:, None] + offs_d[None, :], kn, mask=n_mask)
                tl.store(v_head + v_rows[:, None] + offs_d[None, :], vn, mask=n_mask)

    # No key: l == 0. A NaN in the inputs makes l NaN, and its LSE stays NaN, so that every merge
    # of this partial carries the NaN instead of weighing the partial as empty.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    out_ok = row_ok[:, None] & d_ok[None, :]
    write_final = False
    if FUSE_COMBINE:
        write_final = n_splits == 1
    if write_final:
        # One split: this program's result is final.
        out_ptrs = O + b.to(tl.int64) * stride_ob + offs_t[:, None] * stride_os + offs_h[:, None] * stride_oh
        tl.store(out_ptrs + offs_d[None, :], o.to(O.dtype.element_ty), mask=out_ok)
        tl.store(LSE + b.to(tl.int64) * stride_lb + offs_h * stride_lh + offs_t * stride_ls, lse, mask=row_ok)
    else:
        o_ptrs = (
            OP
            + b.to(tl.int64) * stride_opb
            + offs_t[:, None] * stride_ops
            + offs_h[:, None] * stride_oph
            + split * stride_opn
            + offs_d[None, :]
        )
        tl.store(o_ptrs, o, mask=out_ok)
        l_ptrs = LSEP + b.to(tl.int64) * stride_lpb + offs_t * stride_lps + offs_h * stride_lph + split
        tl.store(l_ptrs, lse, mask=row_ok)
        if FUSE_COMBINE:
            # The last program of this (b, hk, m-block) row to finish merges every split. All
            # threads' partial stores happen before the barrier; the acq_rel atomic (one per
            # program) publishes them at GPU scope and, for the last one, acquires the others'.
            # That program resets the counter to 0, so the buffer is ready for the next call
            # (CUDA-graph replays included) with no memset.
            tl.debug_barrier()
            sem = SEM + pid_bh * tl.num_programs(2) + pid_m
            done = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
            if done == n_splits - 1:
                r_end = tl.minimum(r0 + BLOCK_M, GROUP * seqlen_q)
                _combine_rows(
                    OP, LSEP, O, LSE, b, hk, r0, r_end, n_splits,
                    stride_opb, stride_ops, stride_oph, stride_opn, stride_lpb, stride_lps, stride_lph,
                    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
                    GROUP, HEAD_DIM, D_PAD, COMBINE_M, SPLIT_BLOCK,
                )  # fmt: skip
                tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")
