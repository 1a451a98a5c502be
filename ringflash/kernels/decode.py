"""Split-KV flash decoding: a few query tokens against a long (optionally paged) KV cache.

Grid ``(num_splits, B * Hk, m_blocks)``. One program owns one KV head of one batch row and the
rows ``r = t * G + g`` (query token ``t``, query head ``hk * G + g``; ``G = Hq // Hk``) of its head
group, so K/V are read from memory once per KV head, not once per query head. The visible key
range of the row (``[0, seqlen_k)`` cut by the causal/window band) is divided into ``num_splits``
equal runs of ``BLOCK_N`` blocks; program ``split`` streams its run with an online softmax and
writes a float32 partial ``(out, lse)``. A program whose run is empty (a short or empty sequence)
writes ``lse = -inf`` and ``out = 0``. The partials of each row merge exactly (``lse = log sum exp
lse_s``, ``out = sum exp(lse_s - lse) out_s``; ``-inf`` safe, a row with no key ends as ``out = 0``,
``lse = -inf``): by default the last program of the row to finish merges them (an int32 counter
per row, see ``decode_counters.py``), else the combine kernel of ``decode_combine.py`` does. New
tokens are written to the cache by the same launch (split 0 of each KV head) and read from the
``k``/``v`` arguments by every program, so one step (append, attend, merge) is one launch.

CUDA graphs: lengths are read on the device (``SEQLENS``), the partial buffers are sized from the
shapes and ``num_splits`` only, and nothing syncs with the host, so a step can be captured once
and replayed for any cache lengths.

Mask convention (``ringflash.masking``): query token ``t`` sees key ``j`` iff ``lo <= j - t <= hi``
with ``diag = seqlen_k - seqlen_q`` (bottom-right; or one value per row from ``DIAG``), ``lo =
diag - window_left`` and ``hi = diag + window_right`` (``diag`` when causal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import tma_mode
from .common import (
    _dot,
    _rows_desc,
    _tanh,
    bandwidth_per_sm,
    cdiv,
    dot_f32,
    dot_precision,
    mask_flags,
    next_pow2,
    on_tensor_device,
    pad_dim,
    pdl_supported,
    ptx_device,
    sm_count,
    tma_applies,
)
from .decode_append import append_kv
from .decode_combine import _combine_rows, combine_partials
from .decode_counters import semaphore_buffer

__all__ = [
    "append_kv",
    "combine_partials",
    "decode_fwd",
    "pick_block_n",
    "pick_num_splits",
    "semaphore_buffer",
]

# Literal constants: 1.4426950408889634 = log2(e), 0.6931471805599453 = ln(2) (see common.py).


@triton.jit
def _attend_block(
    q,
    k,
    v,
    offs_j,
    j_ok,
    offs_t,
    row_ok,
    m_i,
    l_i,
    acc,
    lo,
    hi,
    qk_scale,
    cap_scale,
    cap_out,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
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
    do_not_specialize=["seqlen_q", "n_new", "page_size", "window_left", "window_right", "capacity", "n_rows"]
)
def _decode_split_kernel(
    Q,
    K,
    V,
    KN,
    VN,
    OP,
    LSEP,
    O,
    LSE,
    SEM,
    SEQLENS,
    BT,
    CBI,
    DIAG,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_btb,
    stride_opb,
    stride_ops,
    stride_oph,
    stride_opn,
    stride_lpb,
    stride_lps,
    stride_lph,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_ls,
    seqlen_q,
    n_new,
    page_size,
    capacity,
    n_rows,
    window_left,
    window_right,
    n_kv_heads,
    sm_scale,
    softcap,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_CBI: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
    FUSE_APPEND: tl.constexpr,
    FUSE_COMBINE: tl.constexpr,
    EVICT: tl.constexpr,
    COMBINE_M: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA: tl.constexpr = False,
    PDL: tl.constexpr = False,
    PREFETCH_ROWS: tl.constexpr = 0,
    PREFETCH_LINES: tl.constexpr = 1,
    PREFETCH_STEP: tl.constexpr = 64,
):
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    r0 = pid_m * BLOCK_M
    if PDL:
        # Launched while the previous kernel of the stream finishes: nothing is read before it
        # has. The next kernel, if launched the same way, may then start: its own wait still
        # holds it until this grid is complete.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    if PREFETCH_ROWS > 0:
        # Split 0 of a contiguous cache with no lower window starts at key 0 whatever the length:
        # ask L2 for its first rows now, so the loop's first loads, issued once the length has
        # arrived, do not wait a second DRAM round trip. A hint only: nothing is read into
        # registers, and rows are clamped into the cache.
        if split == 0:
            pf_rows = tl.minimum(tl.arange(0, PREFETCH_ROWS), capacity - 1).to(tl.int64)
            pf_cols = tl.arange(0, PREFETCH_LINES) * PREFETCH_STEP
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
            q,
            k,
            v,
            offs_j,
            j_ok,
            offs_t,
            row_ok,
            m_i,
            l_i,
            acc,
            lo,
            hi,
            qk_scale,
            cap_scale,
            cap_out,
            HAS_LO,
            HAS_HI,
            SOFTCAP,
            DOT_PREC,
            DOT_F32,
        )
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
                q,
                k,
                v,
                offs_j,
                j_ok,
                offs_t,
                row_ok,
                m_i,
                l_i,
                acc,
                lo,
                hi,
                qk_scale,
                cap_scale,
                cap_out,
                HAS_LO,
                HAS_HI,
                SOFTCAP,
                DOT_PREC,
                DOT_F32,
            )
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

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
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
                    OP,
                    LSEP,
                    O,
                    LSE,
                    b,
                    hk,
                    r0,
                    r_end,
                    n_splits,
                    stride_opb,
                    stride_ops,
                    stride_oph,
                    stride_opn,
                    stride_lpb,
                    stride_lps,
                    stride_lph,
                    stride_ob,
                    stride_os,
                    stride_oh,
                    stride_lb,
                    stride_lh,
                    stride_ls,
                    GROUP,
                    HEAD_DIM,
                    D_PAD,
                    COMBINE_M,
                    SPLIT_BLOCK,
                )
                tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")


# ------------------------------------------------------------------------------------ launcher

# Tiles: 16 rows is the smallest tensor-core dot. GPU tiles were measured on H100 (see
# benchmarks/bench_decode.py); the interpreter gets one small shape that crosses block edges.
_GPU_BLOCK_N = 64
_GPU_WARPS = 4
_GPU_STAGES = 3
_CPU_BLOCK_N = 16
_MAX_BLOCK_M = 64
_GPU_EVICT = ""  # L2 policy of the K/V cache loads ("evict_first" measured no different, RESULTS.md)
_COMBINE_TILE = 8192  # fused combine: rows x splits x D_PAD floats loaded at once
# Split heuristic: one wave, about one program per SM (H100, graph-timed, 2026-11-26: B=1 and 8
# KV heads -> 16 splits, 128 programs, 94-98% of copy bandwidth from 128k; B=16 -> 1 split, 99-104%
# from 16k; 3 pipeline stages beat 2 by up to 25%), at least MIN_KEYS_PER_SPLIT keys of cache
# capacity per split, at most MAX_SPLITS splits.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 256
# Wide tiles: 128-key tiles (twice the bytes in flight per program) where every program has its
# own SM, memory is fast per SM, and each split has at least WIDE_MIN_KEYS keys of capacity.
# H200 (about 37 GB/s per SM, 2026-11-27): 1.01-1.15x faster than 64-key tiles from batch 1 at
# 16k to batch 16 (batch 16 from 0.87-0.92x cuDNN to 0.99-1.00x). H100 (about 25 GB/s per SM):
# mixed, 2% slower to 2% faster by shape, so 64-key tiles stay there (benchmarks/RESULTS.md).
# Devices between the two (H100 NVL, GH200: about 30 GB/s per SM) are not measured.
WIDE_BLOCK_N = 128
WIDE_MIN_GBPS_PER_SM = 30.0
WIDE_MIN_KEYS = 1024
# Programmatic dependent launch of the split kernel (CUDA, compute capability >= 9.0). Off: it
# saves time only where one split kernel follows another (0.6-0.7 us a call at batch 1, 4k, on an
# H100 and an H200; 0.0-0.7 us elsewhere on the H100), as a model's other kernels do not let the
# next launch early; and with the H200's 128-key tiles it costs 0.3-1% from batch 1 at 128k and
# at batch 16 from 16k (benchmarks/RESULTS.md, 2026-11-27).
USE_PDL = False
# Key rows of split 0 prefetched into L2 before the cache length is read (0: none). One 64-key
# tile on an H100 (2026-11-27): 0.3-1.9 us faster at batches 4-16 (batch 16 at 4k from 0.99x
# cuDNN to 1.00x), no change at batch 1 and 32; 128 or 256 rows no better (benchmarks/RESULTS.md).
PREFETCH_ROWS = 64


def block_m(group: int, seqlen_q: int) -> int:
    """Rows per program: the whole head group times the query tokens, 16..64, a power of two."""
    return min(_MAX_BLOCK_M, max(16, next_pow2(group * seqlen_q)))


def pick_num_splits(batch: int, n_kv_heads: int, group: int, seqlen_q: int, capacity: int, device) -> int:
    """Splits per (batch row, KV head) from the shapes and the SM count only (no cache lengths).

    ``capacity`` is the most keys a row can hold (cache length, or pages per row * page size).
    """
    m_blocks = cdiv(group * seqlen_q, block_m(group, seqlen_q))
    programs = batch * n_kv_heads * m_blocks
    want = sm_count(device) // max(programs, 1)
    cap = max(1, cdiv(max(capacity, 1), MIN_KEYS_PER_SPLIT))
    return int(max(1, min(want, cap, MAX_SPLITS)))


def pick_block_n(programs: int, keys_per_split: int, row_bytes: int, device) -> int:
    """Keys per K/V tile on a GPU: ``WIDE_BLOCK_N`` where one wave of ``programs`` fits the SMs,
    memory is fast per SM and the split is long (see above), else the measured default."""
    wide = (
        programs <= sm_count(device)
        and keys_per_split >= WIDE_MIN_KEYS
        and row_bytes <= 256  # a 128-key K tile <= 32 KiB: three stages of K and V fit
        and bandwidth_per_sm(device) >= WIDE_MIN_GBPS_PER_SM
    )
    return WIDE_BLOCK_N if wide else _GPU_BLOCK_N


@on_tensor_device
def decode_fwd(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    n_new=0,
    k_new=None,
    v_new=None,
    block_table=None,
    cache_batch_idx=None,
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    diag_offset=None,
    out_dtype=None,
    fuse_combine=True,
    block_n=None,
    num_warps=None,
    num_stages=None,
    evict=None,
):
    """Split-KV decode attention; with ``k_new``/``v_new`` it also appends them to the cache.

    Args:
        q: ``[B, Sq, Hq, D]`` (last dim contiguous).
        k_cache, v_cache: ``[B_cache, S_cache, Hk, D]``, or paged ``[num_pages, page_size, Hk, D]``
            with ``block_table``; last dim contiguous.
        cache_seqlens: int32 ``[B]`` on q's device.
        n_new: without ``k_new``: the cache already holds ``n_new`` new tokens after
            ``cache_seqlens[b]`` and row ``b`` attends to ``cache_seqlens[b] + n_new`` keys.
        k_new, v_new: ``[B, Snew, Hk, D]`` (last dim contiguous) or None. Fused append: the kernel
            writes them to cache slots ``cache_seqlens[b] + [0, Snew)`` and attends to them read
            from ``k_new``/``v_new`` (the same keys the unfused append + attend sees).
        block_table: int32 ``[B, max_pages]`` (paged cache) or None.
        cache_batch_idx: int32 ``[B]``, the cache row of each batch row (contiguous cache) or None.
        diag_offset: int32 ``[B]``, the key index aligned with query token 0 per row (sharded
            caches), or None for bottom-right alignment.
        num_splits: 0 picks it from the shapes and the SM count (:func:`pick_num_splits`).
        out_dtype: dtype of ``out`` (default q's; float32 for partials that are merged again).
        fuse_combine: the last split program of each row merges the partials (one launch, with
            the counters of :func:`semaphore_buffer`); False launches the combine kernel after the
            split kernel.
        block_n, num_warps, num_stages, evict: tile / load-policy overrides (benchmarks; the
            default tile is :func:`pick_block_n`'s).

    Returns:
        ``(out [B, Sq, Hq, D] in out_dtype, lse [B, Hq, Sq] float32)``. Nothing syncs with the host
        and every buffer is sized from shapes, so the call can be captured in a CUDA graph.
    """
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    Hk = k_cache.shape[2]
    group = Hq // Hk
    assert Hq % Hk == 0 and k_cache.shape[-1] == D and D <= 256
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (B,)
    dev = q.device
    out = torch.empty((B, Sq, Hq, D), dtype=out_dtype or q.dtype, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    fuse_append = k_new is not None and k_new.shape[1] > 0
    if fuse_append:
        assert v_new is not None and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
        n_new = k_new.shape[1]
        if out.numel() == 0:  # no program runs: append on its own
            append_kv(
                k_cache,
                v_cache,
                k_new,
                v_new,
                cache_seqlens,
                block_table=block_table,
                cache_batch_idx=cache_batch_idx,
            )
    if out.numel() == 0:
        return out, lse
    has_lo, has_hi, wl, wr = mask_flags(causal, window_size)
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    bm = block_m(group, Sq)
    m_blocks = cdiv(group * Sq, bm)
    n_splits = int(num_splits) or pick_num_splits(B, Hk, group, Sq, capacity, dev)
    sem = semaphore_buffer(dev, B * Hk * m_blocks) if fuse_combine and n_splits > 1 else None
    fused = bool(fuse_combine)
    # Partials [B, Sq, Hq, n_splits, D]: each (b, t, h) row's splits are contiguous for the combine.
    if fused and n_splits == 1:
        o_part = lse_part = out  # unused: the one split writes out / lse directly
        part_strides = (0,) * 7
    else:
        o_part = torch.empty((B, Sq, Hq, n_splits, D), dtype=torch.float32, device=dev)
        lse_part = torch.empty((B, Sq, Hq, n_splits), dtype=torch.float32, device=dev)
        part_strides = (*o_part.stride()[:4], *lse_part.stride()[:3])
    diag_t = diag_offset
    if diag_t is not None:
        assert diag_t.dtype == torch.int32 and diag_t.shape == (B,)
    dummy = cache_seqlens  # pointer arguments a variant does not use
    kn = k_new if fuse_append else q
    vn = v_new if fuse_append else q
    cpu = dev.type == "cpu"
    d_pad = pad_dim(D)
    if block_n:
        bn = block_n
    elif cpu:
        bn = _CPU_BLOCK_N
    else:
        programs = n_splits * B * Hk * m_blocks
        bn = pick_block_n(programs, capacity // n_splits, d_pad * q.element_size(), dev)
    launch = {} if cpu else dict(num_warps=num_warps or _GPU_WARPS, num_stages=num_stages or _GPU_STAGES)
    pdl = USE_PDL and pdl_supported(dev)
    if pdl:
        launch["launch_pdl"] = True
    combine_m = min(bm, next_pow2(group * Sq))
    split_block = max(1, min(next_pow2(n_splits), _COMBINE_TILE // (combine_m * d_pad)))
    # TMA descriptors for the cache's K/V tiles: contiguous caches, and only under
    # use_tma("on") (3-16% slower than pointer loads on an H100, benchmarks/RESULTS.md).
    tma = not paged and tma_mode() == "on" and tma_applies(k_cache, v_cache, seqlen=capacity)
    # L2 prefetch (an inline PTX hint, so CUDA only) where split 0's first keys are known early.
    prefetch = ptx_device(dev) and not paged and not tma and cache_batch_idx is None and not has_lo
    prefetch_rows = next_pow2(min(PREFETCH_ROWS, capacity)) if prefetch else 0  # 0 for an empty cache
    _decode_split_kernel[(n_splits, B * Hk, m_blocks)](
        q,
        k_cache,
        v_cache,
        kn,
        vn,
        o_part,
        lse_part,
        out,
        lse,
        sem if sem is not None else dummy,
        cache_seqlens,
        block_table if paged else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        diag_t if diag_t is not None else dummy,
        *q.stride()[:3],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *kn.stride()[:3],
        *vn.stride()[:3],
        block_table.stride(0) if paged else 0,
        *part_strides,
        *out.stride()[:3],
        *lse.stride()[:3],
        Sq,
        int(n_new),
        page_size,
        capacity,
        k_cache.shape[0],
        wl,
        wr,
        Hk,
        float(softmax_scale),
        float(softcap),
        GROUP=group,
        HEAD_DIM=D,
        D_PAD=d_pad,
        HAS_LO=has_lo,
        HAS_HI=has_hi,
        SOFTCAP=softcap > 0,
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        DIAG_FROM_PTR=diag_t is not None,
        DOT_PREC=dot_precision(q.dtype),
        DOT_F32=dot_f32(q),
        FUSE_APPEND=fuse_append,
        FUSE_COMBINE=fused,
        EVICT=(evict if evict is not None else ("" if cpu else _GPU_EVICT)),
        COMBINE_M=combine_m,
        SPLIT_BLOCK=split_block,
        BLOCK_M=bm,
        BLOCK_N=bn,
        TMA=tma,
        PDL=pdl,
        PREFETCH_ROWS=prefetch_rows,
        PREFETCH_LINES=cdiv(D * k_cache.element_size(), 128),
        PREFETCH_STEP=128 // k_cache.element_size(),  # elements per 128-byte line
        **launch,
    )
    if not fused:
        combine_partials(o_part, lse_part, out, lse)
    return out, lse
