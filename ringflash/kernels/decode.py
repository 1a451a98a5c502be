"""Split-KV flash decoding: a few query tokens against a long (optionally paged) KV cache.

Grid ``(num_splits, B * Hk, m_blocks)``. One program owns one KV head of one batch row and the
rows ``r = t * G + g`` (query token ``t``, query head ``hk * G + g``; ``G = Hq // Hk``) of its head
group, so K/V are read from memory once per KV head, not once per query head. The visible key
range of the row (``[0, seqlen_k)`` cut by the causal/window band) is divided into ``num_splits``
equal runs of ``BLOCK_N`` blocks; program ``split`` streams its run with an online softmax and
writes a float32 partial ``(out, lse)``. A program whose run is empty (a short or empty sequence)
writes ``lse = -inf`` and ``out = 0``. The combine kernel merges the partials of each row exactly
(``lse = log sum exp lse_s``, ``out = sum exp(lse_s - lse) out_s``; ``-inf`` safe, a row with no
key ends as ``out = 0``, ``lse = -inf``).

CUDA graphs: lengths are read on the device (``SEQLENS``), the partial buffers are sized from the
shapes and ``num_splits`` only, and nothing syncs with the host, so a step can be captured once
and replayed for any cache lengths.

Mask convention (``ringflash.masking``): query token ``t`` sees key ``j`` iff ``lo <= j - t <= hi``
with ``diag = seqlen_k - seqlen_q`` (bottom-right; or one value per row from ``DIAG``), ``lo =
diag - window_left`` and ``hi = diag + window_right`` (``diag`` when causal).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import _dot, _tanh, dot_f32, dot_precision, mask_flags, pad_dim

# Literal constants: 1.4426950408889634 = log2(e), 0.6931471805599453 = ln(2) (see common.py).


@triton.jit(do_not_specialize=["seqlen_q", "n_new", "page_size", "window_left", "window_right"])
def _decode_split_kernel(
    Q,
    K,
    V,
    OP,
    LSEP,
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
    stride_btb,
    stride_opb,
    stride_ops,
    stride_oph,
    stride_opn,
    stride_lpb,
    stride_lps,
    stride_lph,
    seqlen_q,
    n_new,
    page_size,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    r0 = tl.program_id(2) * BLOCK_M

    seqlen_k = tl.load(SEQLENS + b) + n_new
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
        cache_row = tl.load(CBI + b).to(tl.int64)
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

    for j0 in range(j_start, j_end, BLOCK_N):
        offs_j = j0 + offs_n
        j_ok = offs_j < j_end
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * stride_btb + offs_j // page_size, mask=j_ok, other=0)
            k_rows = page.to(tl.int64) * stride_kb + (offs_j % page_size).to(tl.int64) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (offs_j % page_size).to(tl.int64) * stride_vs
        else:
            k_rows = cache_row * stride_kb + offs_j.to(tl.int64) * stride_ks
            v_rows = cache_row * stride_vb + offs_j.to(tl.int64) * stride_vs
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
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
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = (
        OP
        + b.to(tl.int64) * stride_opb
        + offs_t[:, None] * stride_ops
        + offs_h[:, None] * stride_oph
        + split * stride_opn
        + offs_d[None, :]
    )
    tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
    l_ptrs = LSEP + b.to(tl.int64) * stride_lpb + offs_t * stride_lps + offs_h * stride_lph + split
    tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    OP,
    LSEP,
    O,
    LSE,
    n_splits,
    seqlen_q,
    n_heads,
    stride_opr,
    stride_opn,
    stride_lpr,
    stride_lpn,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_ls,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    # One program per (b, t, h) row; row r's split s sits at OP + r * stride_opr + s * stride_opn
    # (and likewise in LSEP), so both [B, Sq, H, N, D] partials and N stacked [B, Sq, H, D] fit.
    row = tl.program_id(0)
    h = row % n_heads
    t = (row // n_heads) % seqlen_q
    b = row // (n_heads * seqlen_q)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    lse_row = LSEP + row.to(tl.int64) * stride_lpr
    op_row = OP + row.to(tl.int64) * stride_opr

    m = float("-inf")
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        ls = tl.load(lse_row + (s0 + offs_s) * stride_lpn, mask=s0 + offs_s < n_splits, other=float("-inf"))
        m = tl.maximum(m, tl.max(ls, 0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = 0.0
    acc = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        s_ok = s0 + offs_s < n_splits
        ls = tl.load(lse_row + (s0 + offs_s) * stride_lpn, mask=s_ok, other=float("-inf"))
        w = tl.exp(ls - m_safe)  # exactly 0 for -inf partials
        o = tl.load(
            op_row + (s0 + offs_s)[:, None] * stride_opn + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        tot += tl.sum(w, 0)
        acc += tl.sum(o * w[:, None], 0)
    inv = tl.where(tot > 0.0, 1.0 / tot, 0.0)
    lse = tl.where(tot > 0.0, m_safe + tl.log(tot), float("-inf"))
    o_ptrs = O + b.to(tl.int64) * stride_ob + t * stride_os + h * stride_oh + offs_d
    tl.store(o_ptrs, (acc * inv).to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + t * stride_ls, lse)


@triton.jit(do_not_specialize=["n_new", "page_size"])
def _append_kv_kernel(
    K_NEW,
    V_NEW,
    K,
    V,
    SEQLENS,
    BT,
    CBI,
    stride_nb,
    stride_ns,
    stride_nh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_btb,
    n_new,
    page_size,
    n_kv_heads,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_CBI: tl.constexpr,
):
    # One program per new token (b, s): copies its [Hk, D] keys and values to cache slot
    # cache_seqlens[b] + s of row cache_batch_idx[b] (or through the block table).
    pid = tl.program_id(0)
    b = pid // n_new
    s = pid % n_new
    pos = tl.load(SEQLENS + b) + s
    if PAGED:
        row = tl.load(BT + b.to(tl.int64) * stride_btb + pos // page_size).to(tl.int64)
        slot = (pos % page_size).to(tl.int64)
    else:
        if HAS_CBI:
            row = tl.load(CBI + b).to(tl.int64)
        else:
            row = b.to(tl.int64)
        slot = pos.to(tl.int64)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h[:, None] < n_kv_heads) & (offs_d[None, :] < HEAD_DIM)
    src = b.to(tl.int64) * stride_nb + s * stride_ns + offs_h[:, None] * stride_nh + offs_d[None, :]
    srcv = b.to(tl.int64) * stride_vnb + s * stride_vns + offs_h[:, None] * stride_vnh + offs_d[None, :]
    dst_k = row * stride_kb + slot * stride_ks + offs_h[:, None] * stride_kh + offs_d[None, :]
    dst_v = row * stride_vb + slot * stride_vs + offs_h[:, None] * stride_vh + offs_d[None, :]
    tl.store(K + dst_k, tl.load(K_NEW + src, mask=mask), mask=mask)
    tl.store(V + dst_v, tl.load(V_NEW + srcv, mask=mask), mask=mask)


# ------------------------------------------------------------------------------------ launcher

# Tiles: 16 rows is the smallest tensor-core dot. GPU tiles were measured on H100 (see
# benchmarks/bench_decode.py); the interpreter gets one small shape that crosses block edges.
_GPU_BLOCK_N = 64
_GPU_WARPS = 4
_GPU_STAGES = 3
_CPU_BLOCK_N = 16
_MAX_BLOCK_M = 64
# Split heuristic: one wave, about one program per SM (H100, graph-timed, 2026-11-26: B=1 and 8
# KV heads -> 16 splits, 128 programs, 94-98% of copy bandwidth from 128k; B=16 -> 1 split, 99-104%
# from 16k; 3 pipeline stages beat 2 by up to 25%), at least MIN_KEYS_PER_SPLIT keys of cache
# capacity per split, at most MAX_SPLITS splits.
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 256


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (cached); 8 for other devices (the interpreter)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def block_m(group: int, seqlen_q: int) -> int:
    """Rows per program: the whole head group times the query tokens, 16..64, a power of two."""
    return min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(group * seqlen_q)))


def pick_num_splits(batch: int, n_kv_heads: int, group: int, seqlen_q: int, capacity: int, device) -> int:
    """Splits per (batch row, KV head) from the shapes and the SM count only (no cache lengths).

    ``capacity`` is the most keys a row can hold (cache length, or pages per row * page size).
    """
    m_blocks = triton.cdiv(group * seqlen_q, block_m(group, seqlen_q))
    programs = batch * n_kv_heads * m_blocks
    want = sm_count(device) // max(programs, 1)
    cap = max(1, triton.cdiv(max(capacity, 1), MIN_KEYS_PER_SPLIT))
    return int(max(1, min(want, cap, MAX_SPLITS)))


def decode_fwd(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    n_new=0,
    block_table=None,
    cache_batch_idx=None,
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    diag_offset=None,
    out_dtype=None,
    block_n=None,
    num_warps=None,
    num_stages=None,
):
    """Split-KV decode attention over a KV cache that already holds the new tokens.

    Args:
        q: ``[B, Sq, Hq, D]`` (last dim contiguous).
        k_cache, v_cache: ``[B_cache, S_cache, Hk, D]``, or paged ``[num_pages, page_size, Hk, D]``
            with ``block_table``; last dim contiguous.
        cache_seqlens: int32 ``[B]`` on q's device; row ``b`` attends to ``cache_seqlens[b] + n_new``
            keys.
        block_table: int32 ``[B, max_pages]`` (paged cache) or None.
        cache_batch_idx: int32 ``[B]``, the cache row of each batch row (contiguous cache) or None.
        diag_offset: int32 ``[B]``, the key index aligned with query token 0 per row (sharded
            caches), or None for bottom-right alignment.
        num_splits: 0 picks it from the shapes and the SM count (:func:`pick_num_splits`).
        out_dtype: dtype of ``out`` (default q's; float32 for partials that are merged again).
        block_n, num_warps, num_stages: tile overrides (benchmarks).

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
    has_lo, has_hi, wl, wr = mask_flags(causal, window_size)
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    bm = block_m(group, Sq)
    m_blocks = triton.cdiv(group * Sq, bm)
    n_splits = int(num_splits) or pick_num_splits(B, Hk, group, Sq, capacity, q.device)
    dev = q.device
    out = torch.empty((B, Sq, Hq, D), dtype=out_dtype or q.dtype, device=dev)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out, lse
    # Partials [B, Sq, Hq, n_splits, D]: each (b, t, h) row's splits are contiguous for the combine.
    o_part = torch.empty((B, Sq, Hq, n_splits, D), dtype=torch.float32, device=dev)
    lse_part = torch.empty((B, Sq, Hq, n_splits), dtype=torch.float32, device=dev)
    diag_t = diag_offset
    if diag_t is not None:
        assert diag_t.dtype == torch.int32 and diag_t.shape == (B,)
    bt = block_table if paged else cache_seqlens  # dummy pointers when unused
    cbi = cache_batch_idx if cache_batch_idx is not None else cache_seqlens
    cpu = dev.type == "cpu"
    bn = block_n or (_CPU_BLOCK_N if cpu else _GPU_BLOCK_N)
    launch = {} if cpu else dict(num_warps=num_warps or _GPU_WARPS, num_stages=num_stages or _GPU_STAGES)
    _decode_split_kernel[(n_splits, B * Hk, m_blocks)](
        q,
        k_cache,
        v_cache,
        o_part,
        lse_part,
        cache_seqlens,
        bt,
        cbi,
        diag_t if diag_t is not None else cache_seqlens,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        o_part.stride(3),
        lse_part.stride(0),
        lse_part.stride(1),
        lse_part.stride(2),
        Sq,
        int(n_new),
        page_size,
        wl,
        wr,
        Hk,
        float(softmax_scale),
        float(softcap),
        GROUP=group,
        HEAD_DIM=D,
        D_PAD=pad_dim(D),
        HAS_LO=has_lo,
        HAS_HI=has_hi,
        SOFTCAP=softcap > 0,
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        DIAG_FROM_PTR=diag_t is not None,
        DOT_PREC=dot_precision(q.dtype),
        DOT_F32=dot_f32(q),
        BLOCK_M=bm,
        BLOCK_N=bn,
        **launch,
    )
    combine_partials(o_part, lse_part, out, lse)
    return out, lse


def combine_partials(o_part, lse_part, out, lse, split_dim=3):
    """Merge float32 partials exactly into ``out [B, Sq, H, D]`` (any float dtype) and ``lse
    [B, H, Sq]`` (float32), in place; returns ``(out, lse)``.

    ``split_dim=3``: ``o_part [B, Sq, H, N, D]``, ``lse_part [B, Sq, H, N]`` (the decode kernel's
    layout). ``split_dim=0``: ``o_part [N, B, Sq, H, D]``, ``lse_part [N, B, Sq, H]`` (N stacked
    partials, e.g. gathered from N ranks). ``-inf`` safe: rows with no key end as 0 / ``-inf``.
    """
    if split_dim == 0:
        N, B, Sq, H, D = o_part.shape
        rows = (o_part.stride(3), o_part.stride(0), lse_part.stride(3), lse_part.stride(0))
        assert o_part[0].is_contiguous() and lse_part[0].is_contiguous()
    else:
        B, Sq, H, N, D = o_part.shape
        rows = (o_part.stride(2), o_part.stride(3), lse_part.stride(2), lse_part.stride(3))
        assert o_part.is_contiguous() and lse_part.is_contiguous()
    assert out.stride(-1) == 1 and o_part.stride(-1) == 1
    if out.numel() == 0:
        return out, lse
    launch = {} if o_part.device.type == "cpu" else dict(num_warps=4)
    _decode_combine_kernel[(B * Sq * H,)](
        o_part,
        lse_part,
        out,
        lse,
        N,
        Sq,
        H,
        *rows,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        HEAD_DIM=D,
        D_PAD=pad_dim(D),
        SPLIT_BLOCK=min(16, triton.next_power_of_2(N)),
        **launch,
    )
    return out, lse


def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, cache_batch_idx=None):
    """Write ``k``/``v`` ``[B, Snew, Hk, D]`` into the cache at ``cache_seqlens[b] + [0, Snew)`` in place.

    One launch, positions read on the device (CUDA-graph safe). Inputs are trusted: the public
    function has checked that every slot lies inside the cache.
    """
    B, n_new, Hk, D = k.shape
    if B * n_new == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    paged = block_table is not None
    dummy = cache_seqlens
    launch = {} if k.device.type == "cpu" else dict(num_warps=4)
    _append_kv_kernel[(B * n_new,)](
        k,
        v,
        k_cache,
        v_cache,
        cache_seqlens,
        block_table if paged else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0) if paged else 0,
        n_new,
        k_cache.shape[1],
        Hk,
        HEAD_DIM=D,
        D_PAD=pad_dim(D),
        H_PAD=triton.next_power_of_2(Hk),
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        **launch,
    )
