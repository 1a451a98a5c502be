"""Pieces shared by the decode kernels: one key block of the online softmax, one K/V tile's load."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _dot, _tanh

# Literal constants: 1.4426950408889634 = log2(e) (see common.py).


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
def _load_kv_tile(
    k_head,
    v_head,
    BT,
    b,
    cache_row,
    offs_j,
    j_ok,
    offs_d,
    d_ok,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_btb,
    page_size,
    n_rows,
    PAGED: tl.constexpr,
    EVICT: tl.constexpr,
):
    """K and V of keys ``offs_j`` (rows with ``j_ok`` false read as 0) of one KV head of a cache row,
    contiguous or paged (pages clamped into the pool)."""
    if PAGED:
        page = tl.load(BT + b.to(tl.int64) * stride_btb + offs_j // page_size, mask=j_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), n_rows - 1)
        k_rows = page.to(tl.int64) * stride_kb + (offs_j % page_size).to(tl.int64) * stride_ks
        v_rows = page.to(tl.int64) * stride_vb + (offs_j % page_size).to(tl.int64) * stride_vs
    else:
        k_rows = cache_row * stride_kb + offs_j.to(tl.int64) * stride_ks
        v_rows = cache_row * stride_vb + offs_j.to(tl.int64) * stride_vs
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0, eviction_policy=EVICT)
    v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0, eviction_policy=EVICT)
    return k, v


@triton.jit
def _append_tokens(
    k_head,
    v_head,
    kn_head,
    vn_head,
    BT,
    b,
    cache_row,
    n_old,
    n_new,
    offs_n,
    offs_d,
    d_ok,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_kns,
    stride_vns,
    stride_btb,
    page_size,
    n_rows,
    PAGED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The append: one KV head's ``n_new`` tokens (``kn_head``/``vn_head``) into cache slots
    ``n_old + [0, n_new)`` of a cache row, contiguous or paged."""
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


@triton.jit
def _store_rows(
    O,
    LSE,
    b,
    offs_t,
    offs_h,
    offs_d,
    o,
    lse,
    row_ok,
    d_ok,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_ls,
):
    """Final ``out`` (in O's dtype) and ``lse`` of the rows ``(offs_t, offs_h)`` of batch row ``b``."""
    base = O + b.to(tl.int64) * stride_ob
    out_ptrs = base + offs_t[:, None] * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b.to(tl.int64) * stride_lb + offs_h * stride_lh + offs_t * stride_ls, lse, mask=row_ok)
