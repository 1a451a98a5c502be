"""Appending new keys/values to a KV cache in place (contiguous, ``cache_batch_idx`` or paged).

One program per new token; positions are read on the device (``cache_seqlens``), so the append is
CUDA-graph safe. The fused decode kernel (``split.py``) does the same write itself; this launch
serves the unfused path and the sharded cache, which appends only on the rank owning the ends.
Positions are clamped into the cache as in the split kernel: nothing outside it is ever written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..device import on_tensor_device
from ..launch_args import next_pow2, pad_dim, stride_names, strides


@triton.jit(do_not_specialize=["n_new", "page_size", "capacity", "n_rows"])
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
    capacity,
    n_rows,
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
    # Clamped into the cache as in the decode kernel (a no-op for checked inputs).
    pos = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), capacity - n_new) + s
    if PAGED:
        row = tl.load(BT + b.to(tl.int64) * stride_btb + pos // page_size)
        row = tl.minimum(tl.maximum(row, 0), n_rows - 1).to(tl.int64)
        slot = (pos % page_size).to(tl.int64)
    else:
        if HAS_CBI:
            row = tl.minimum(tl.maximum(tl.load(CBI + b), 0), n_rows - 1).to(tl.int64)
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


_NEW_K, _NEW_V = stride_names("n", "bsh"), stride_names("vn", "bsh")
_CACHE_K, _CACHE_V = stride_names("k", "bsh"), stride_names("v", "bsh")


@on_tensor_device
def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, cache_batch_idx=None):
    """Write ``k``/``v`` into the cache at ``cache_seqlens[b] + [0, Snew)`` in place.

    One launch, positions read on the device (CUDA-graph safe). The public function has checked
    that every slot lies inside the cache; unchecked values are clamped into it.

    Args:
        k_cache, v_cache: ``[B_cache, S_cache, Hk, D]``, or paged ``[num_pages, page_size, Hk, D]``
            with ``block_table``; last dim contiguous. Written in place.
        k, v: ``[B, Snew, Hk, D]``, last dim contiguous.
        cache_seqlens: int32 ``[B]``, tokens already in each row's cache.
        block_table: int32 ``[B, max_pages]`` (paged cache) or None.
        cache_batch_idx: int32 ``[B]``, the cache row of each batch row (contiguous cache) or None.
    """
    B, n_new, Hk, D = k.shape
    if B * n_new == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    paged = block_table is not None
    launch = {} if k.device.type == "cpu" else dict(num_warps=4)
    _append_kv_kernel[(B * n_new,)](
        K_NEW=k,
        V_NEW=v,
        K=k_cache,
        V=v_cache,
        SEQLENS=cache_seqlens,
        BT=block_table,
        CBI=cache_batch_idx,
        **strides(k, _NEW_K),
        **strides(v, _NEW_V),
        **strides(k_cache, _CACHE_K),
        **strides(v_cache, _CACHE_V),
        stride_btb=block_table.stride(0) if paged else 0,
        n_new=n_new,
        page_size=k_cache.shape[1],
        capacity=block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1],
        n_rows=k_cache.shape[0],
        n_kv_heads=Hk,
        HEAD_DIM=D,
        D_PAD=pad_dim(D),
        H_PAD=next_pow2(Hk),
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        **launch,
    )
