"""Row gathers and sums of the all-gather method, each in one pass.

``gather_rows``: the rows a rank sends, taken from K and V into one exchange buffer. Concatenating
K and V first and selecting from the result reads and writes the whole of both once more.

``sum_rows_into``: the return of dK/dV. Each rank of the all-gather method gets back, from every
rank that read its keys, float32 partial dK/dV rows (``ringflash.parallel.allgather``). Summed with
one ``index_add_`` per source into a float32 buffer, cast, and copied into the gradient's rows, they
cost four passes and the atomics of the adds. Here one program reads a tile of the rows' partials
from each source in source order, sums them in float32 (0 + p0 + p1 + ..., the same operations in
the same order as those adds, so the same bits), and stores the sum, cast, into the gradient's rows.
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


@triton.jit
def _gather_rows_kernel(
    K, V, ROWS, OUT, n_out, n_k, width, head_dim, stride_kr, stride_kh, stride_vr, stride_vh,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Output row i is row ROWS[i] of [K; V]: K's row when below n_k, else V's row ROWS[i] - n_k.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_r = r < n_out
    live_c = c < width
    at = tl.load(ROWS + r, mask=live_r, other=0).to(tl.int64)
    is_k = at < n_k
    h, d = c // head_dim, c % head_dim
    live = live_r[:, None] & live_c[None, :]
    from_k = tl.load(
        K + at[:, None] * stride_kr + (h * stride_kh + d)[None, :], mask=live & is_k[:, None], other=0.0
    )
    from_v = tl.load(
        V + (at - n_k)[:, None] * stride_vr + (h * stride_vh + d)[None, :],
        mask=live & ~is_k[:, None],
        other=0.0,
    )
    tl.store(
        OUT + r.to(tl.int64)[:, None] * width + c[None, :], tl.where(is_k[:, None], from_k, from_v), mask=live
    )


def _tiles(width: int) -> tuple[int, int]:
    """``(rows, columns)`` of a program's tile over rows of ``width`` elements: whole rows up to
    1024 elements, 4096 elements a program."""
    block_c = min(triton.next_power_of_2(width), 1024)
    return max(1, 4096 // block_c), block_c


@on_tensor_device
def gather_rows(k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``torch.cat([k, v]).index_select(0, rows)`` without the concatenation: one pass.

    Args:
        k, v: ``[T, H, D]`` of one dtype, with a unit stride in D (e.g. a head slice).
        rows: int32 or int64 ``[n]``, each in ``[0, 2 T)``.

    Returns:
        A contiguous ``[n, H, D]`` tensor in k's dtype.
    """
    n_k, heads, head_dim = k.shape
    out = torch.empty((rows.shape[0], heads, head_dim), dtype=k.dtype, device=k.device)
    if out.numel() == 0:
        return out
    assert v.shape == k.shape and v.dtype == k.dtype and k.stride(2) == v.stride(2) == 1
    width = heads * head_dim
    block_r, block_c = _tiles(width)
    grid = (triton.cdiv(rows.shape[0], block_r), triton.cdiv(width, block_c))
    _gather_rows_kernel[grid](
        k, v, rows, out, rows.shape[0], n_k, width, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip
    return out


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
    block_r, block_c = _tiles(width)
    grid = (triton.cdiv(2 * n, block_r), triton.cdiv(width, block_c))
    _sum_rows_kernel[grid](
        parts, sources, rows, out_k, out_v, n, sources.shape[0], width, head_dim,
        sources.stride(0), out_k.stride(0), out_k.stride(1), out_v.stride(0), out_v.stride(1),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip


__all__ = ["gather_rows", "sum_rows_into"]
