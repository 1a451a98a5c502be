"""Packed sequences' bounds checked and clamped on the device, in one program: no host sync.

The attention kernels trust ``cu_seqlens``: a sequence's rows are ``cu[b]:cu[b + 1]``, read and
written without bounds. Reading the values on the host to check them first costs a device sync
per call. Instead this kernel writes a bounded copy, ``min(cummax(max(cu, 0)), total)``: equal to
``cu`` when ``cu`` is valid, and otherwise still non-decreasing inside ``[0, total]``, so that
every row a kernel touches exists. It ORs the failed checks into the device's error flag
(``ringflash.device_errors``: bit 64 for a ``cu_seqlens`` that does not start at 0, decreases or
does not end at the tensor's rows; bit 128 for a sequence longer than ``max_seqlen``), which the
host reads later.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import next_pow2
from .decode.check import or_into_flag
from .device import on_tensor_device
from .launch import SignatureTable, launch_cached


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _bounded(CU, SAFE, n, total, max_len, BLOCK: tl.constexpr):
    """Write ``CU``'s bounded copy to ``SAFE``; return the bits of its failed checks."""
    bits = tl.full((), 0, tl.int32)
    carry = tl.full((), 0, tl.int32)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        live = i < n
        x = tl.load(CU + i, mask=live, other=0)
        prev = tl.load(CU + i - 1, mask=live & (i > 0), other=0)
        run = tl.maximum(tl.associative_scan(tl.maximum(x, 0), 0, _larger), carry)
        tl.store(SAFE + i, tl.minimum(run, total), mask=live)
        carry = tl.max(tl.where(live, run, 0), 0)
        bad = ((i == 0) & (x != 0)) | ((i > 0) & (x < prev)) | ((i == n - 1) & (x != total))
        bits |= tl.max((bad & live).to(tl.int32), 0) * 64
        bits |= tl.max(((i > 0) & (x - prev > max_len) & live).to(tl.int32), 0) * 128
    return bits


@triton.jit(do_not_specialize=["n", "total_q", "total_k", "max_q", "max_k"])
def _cu_bounds_kernel(
    CU_Q, CU_K, SAFE_Q, SAFE_K, FLAG, n, total_q, total_k, max_q, max_k,
    SAME: tl.constexpr, REPORT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bits = _bounded(CU_Q, SAFE_Q, n, total_q, max_q, BLOCK)
    if not SAME:
        bits |= _bounded(CU_K, SAFE_K, n, total_k, max_k, BLOCK)
    if REPORT:
        or_into_flag(FLAG, bits)


_LAUNCHES = SignatureTable()


def _bounds_args(cu_q, cu_k, totals, max_lens, flag):
    same = cu_k is cu_q and totals[0] == totals[1] and max_lens[0] == max_lens[1]
    n = cu_q.numel()
    static = dict(SAME=same, REPORT=flag is not None, BLOCK=min(1024, next_pow2(n)))
    key = tuple(static.values())
    slot = _LAUNCHES.get(key) or _LAUNCHES.keep(key, {})
    values = dict(n=n, total_q=totals[0], total_k=totals[1], max_q=max_lens[0], max_k=max_lens[1])
    return same, static, slot, values


@on_tensor_device
def _launch_bounds(cu_q, cu_k, flag, launch) -> tuple[torch.Tensor, torch.Tensor]:
    same, static, slot, values = launch
    safe_q = torch.empty_like(cu_q)
    safe_k = safe_q if same else torch.empty_like(cu_k)
    per_call = dict(CU_Q=cu_q, CU_K=cu_k, SAFE_Q=safe_q, SAFE_K=safe_k, FLAG=cu_q if flag is None else flag)
    launch_cached(_cu_bounds_kernel, (1,), static, per_call, slot, values)
    return safe_q, safe_k


def bounded_cu_seqlens(
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    totals: tuple[int, int],
    max_lens: tuple[int, int],
    flag: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu_q, cu_k)`` bounded to ``totals`` rows (module docstring), one launch.

    Args:
        cu_q, cu_k: int32 ``[batch + 1]`` on one device (the same tensor for self-attention).
        totals: the rows of the packed q and k.
        max_lens: ``max_seqlen_q``, ``max_seqlen_k``.
        flag: the device's error flag (``ringflash.device_errors.error_flag``), or None to clamp
            without reporting.
    """
    return _launch_bounds(cu_q, cu_k, flag, _bounds_args(cu_q, cu_k, totals, max_lens, flag))


def plan_bounds(cu_q, cu_k, totals, max_lens, flag):
    """``bounded_cu_seqlens`` for later calls with ``cu_seqlens`` of these shapes (and ``cu_k is
    cu_q`` as here), the same ``totals``, ``max_lens`` and ``flag``: ``bounds(cu_q, cu_k) ->
    (cu_q, cu_k)``, with the launch's arguments derived once."""
    launch = _bounds_args(cu_q, cu_k, totals, max_lens, flag)
    return functools.partial(_launch_bounds, flag=flag, launch=launch)


__all__ = ["bounded_cu_seqlens", "plan_bounds"]
