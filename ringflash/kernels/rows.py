"""Rows summed from several sources into a gradient, in one pass: the all-gather's return of dK/dV.

Each rank of the all-gather method gets back, from every rank that read its keys, float32
partial dK/dV rows (``ringflash.parallel.allgather``). Summed with one ``index_add_`` per source
into a float32 buffer, cast, and copied into the gradient's rows, they cost four passes and the
atomics of the adds. Here one program reads a tile of the rows' partials from each source in
source order, sums them in float32 (0 + p0 + p1 + ..., the same operations in the same order as
those adds, so the same bits), and stores the sum, cast, into the gradient's rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device


@triton.jit
def _sum_rows_kernel(
    PARTS, SOURCES, ROWS, OUT_K, OUT_V, n_rows, n_sources, width, head_dim,
    stride_src, stride_kr, stride_kh, stride_vr, stride_vh,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Rows [0, n_rows) go to OUT_K, rows [n_rows, 2 n_rows) to OUT_V, each at ROWS[row % n_rows].
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_r = r < 2 * n_rows
    live_c = c < width
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for s in range(n_sources):
        at = tl.load(SOURCES + s * stride_src + r, mask=live_r, other=-1)
        seen = (at >= 0)[:, None] & live_c[None, :]
        acc += tl.load(PARTS + at.to(tl.int64)[:, None] * width + c[None, :], mask=seen, other=0.0)
    is_k = r < n_rows
    row = tl.load(ROWS + tl.where(is_k, r, r - n_rows), mask=live_r, other=0).to(tl.int64)
    h, d = c // head_dim, c % head_dim
    k_ptrs = OUT_K + row[:, None] * stride_kr + (h * stride_kh + d)[None, :]
    v_ptrs = OUT_V + row[:, None] * stride_vr + (h * stride_vh + d)[None, :]
    tl.store(k_ptrs, acc.to(OUT_K.dtype.element_ty), mask=(live_r & is_k)[:, None] & live_c[None, :])
    tl.store(v_ptrs, acc.to(OUT_V.dtype.element_ty), mask=(live_r & ~is_k)[:, None] & live_c[None, :])


@on_tensor_device
def sum_rows_into(
    parts: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor, sources: torch.Tensor, rows: torch.Tensor
) -> None:
    """``out_k[rows[i]] = sum over s of parts[sources[s, i]]`` and ``out_v[rows[i]] = sum over s of
    parts[sources[s, n + i]]`` (``n = len(rows)``), summed in float32 in source order from 0 and
    cast to the outputs' dtype; a source index of -1 adds nothing.

    Args:
        parts: float32 ``[N, H, D]``, contiguous.
        out_k, out_v: ``[T, H, D]`` with a unit stride in D (e.g. a head slice of the gradient).
        sources: int32 or int64 ``[S, 2 n]``, contiguous. rows: int32 or int64 ``[n]``.
    """
    n = rows.shape[0]
    if n == 0:
        return
    heads, head_dim = parts.shape[1], parts.shape[2]
    assert parts.is_contiguous() and sources.is_contiguous() and out_k.stride(2) == out_v.stride(2) == 1
    width = heads * head_dim
    block_c = min(triton.next_power_of_2(width), 1024)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(2 * n, block_r), triton.cdiv(width, block_c))
    _sum_rows_kernel[grid](
        parts, sources, rows, out_k, out_v, n, sources.shape[0], width, head_dim,
        sources.stride(0), out_k.stride(0), out_k.stride(1), out_v.stride(0), out_v.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip


__all__ = ["sum_rows_into"]
