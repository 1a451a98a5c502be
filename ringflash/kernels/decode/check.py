"""A KV-cache call's index values checked on the device, in one program: no host sync.

``kv_value_bits`` is that program's work; the check kernel here runs it alone (before a decode
kernel, or for the sharded cache), and the decode kernel of ``split.py`` runs it in one of its
programs (``CHECK``), so that a checked decoding step is still one launch.

The kernel reads ``cache_seqlens`` (and ``cache_leftpad``, the used entries of ``block_table``,
``cache_batch_idx``) and raises one bit per failed check in an int32 flag
(``ringflash.device_errors``), which the host reads later. It writes nothing else, so it can run
before the decode kernel, which clamps every position, page and row into the cache whatever the
values. The bits are ``ringflash.device_errors.BITS``: 1 negative length, 2 length + new tokens past
the cache, 4 left padding out of range, 8 a used page out of range, 16 a cache row out of range,
32 a cache row repeated while appending.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import or_into_flag
from ..device import on_tensor_device
from ..launch import SignatureTable, launch_cached
from ..launch_args import next_pow2


@triton.jit
def kv_value_bits(
    LENS, LEFTPAD, BT, CBI, batch, capacity, n_new, n_rows, page_size, max_pages, stride_bt,
    HAS_LEFTPAD: tl.constexpr, PAGED: tl.constexpr, HAS_CBI: tl.constexpr, APPENDS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """The OR of the bits of a KV-cache call's failed value checks, computed by one program (the
    check kernel's, or one of the decode kernel's, which runs it beside its own work)."""
    bits = tl.full((), 0, tl.int32)
    for b0 in range(0, batch, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        live = rows < batch
        lens = tl.load(LENS + rows, mask=live, other=0)
        bits |= tl.max(((lens < 0) & live).to(tl.int32), 0)
        bits |= tl.max(((lens > capacity - n_new) & live).to(tl.int32), 0) * 2
        if HAS_LEFTPAD:
            pad = tl.load(LEFTPAD + rows, mask=live, other=0)
            bits |= tl.max((((pad < 0) | (pad > lens + n_new)) & live).to(tl.int32), 0) * 4
        if PAGED:
            need = tl.minimum((tl.maximum(lens, 0) + n_new + page_size - 1) // page_size, max_pages)
            for p0 in range(0, max_pages, BLOCK_P):
                cols = p0 + tl.arange(0, BLOCK_P)
                used = live[:, None] & (cols[None, :] < need[:, None])
                at = BT + rows[:, None].to(tl.int64) * stride_bt + cols[None, :]
                pages = tl.load(at, mask=used, other=0)
                out = used & ((pages < 0) | (pages >= n_rows))
                bits |= tl.max(tl.max(out.to(tl.int32), 1), 0) * 8
        if HAS_CBI:
            idx = tl.load(CBI + rows, mask=live, other=0)
            bits |= tl.max((((idx < 0) | (idx >= n_rows)) & live).to(tl.int32), 0) * 16
            if APPENDS:  # rows after these in the batch that name the same cache row: colliding appends
                for c0 in range(b0, batch, BLOCK_B):
                    other = c0 + tl.arange(0, BLOCK_B)
                    theirs = tl.load(CBI + other, mask=other < batch, other=0)
                    same = (idx[:, None] == theirs[None, :]) & live[:, None] & (other[None, :] < batch)
                    same = same & (other[None, :] > rows[:, None])
                    bits |= tl.max(tl.max(same.to(tl.int32), 1), 0) * 32
    return bits


@triton.jit(do_not_specialize=["batch", "capacity", "n_new", "n_rows", "page_size", "max_pages", "stride_bt"])
def _kv_values_kernel(
    LENS, LEFTPAD, BT, CBI, FLAG, batch, capacity, n_new, n_rows, page_size, max_pages, stride_bt,
    HAS_LEFTPAD: tl.constexpr, PAGED: tl.constexpr, HAS_CBI: tl.constexpr, APPENDS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    bits = kv_value_bits(
        LENS, LEFTPAD, BT, CBI, batch, capacity, n_new, n_rows, page_size, max_pages, stride_bt,
        HAS_LEFTPAD, PAGED, HAS_CBI, APPENDS, BLOCK_B, BLOCK_P,
    )  # fmt: skip
    or_into_flag(FLAG, bits)


def check_blocks(batch: int, max_pages: int) -> dict:
    """The check's tile sizes (batch rows, pages) for a call's shapes."""
    return dict(BLOCK_B=min(256, next_pow2(batch)), BLOCK_P=min(64, next_pow2(max_pages)))


_LAUNCHES = SignatureTable()


@on_tensor_device
def check_kv_values(
    cache_seqlens: torch.Tensor,
    flag: torch.Tensor,
    *,
    capacity: int,
    n_new: int,
    n_rows: int,
    page_size: int = 1,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
) -> None:
    """OR the bits of the failed checks of one KV-cache call's index values into ``flag``: one
    launch, nothing read on the host.

    Args:
        cache_seqlens: int32 ``[B]``.
        flag: int32, a word per bit, on the tensors' device or in pinned host memory (the
            device's error flag, ``ringflash.device_errors.error_flag``).
        capacity: slots per cache row (``block_table`` pages x ``page_size`` when paged).
        n_new: tokens appended by the call.
        n_rows: the cache's rows (pages when paged).
        page_size: tokens per page (paged caches).
        cache_leftpad, block_table, cache_batch_idx: int32 ``[B]``, ``[B, max_pages]``, ``[B]`` or None.
    """
    batch = cache_seqlens.shape[0]
    if batch == 0:
        return
    dummy = cache_seqlens
    paged = block_table is not None
    max_pages = block_table.shape[1] if paged else 1
    flags = dict(
        HAS_LEFTPAD=cache_leftpad is not None,
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        APPENDS=n_new > 0,
        **check_blocks(batch, max_pages),
    )
    static = dict(
        batch=batch,
        capacity=capacity,
        n_new=n_new,
        n_rows=n_rows,
        page_size=page_size,
        max_pages=max_pages,
        stride_bt=block_table.stride(0) if paged else 0,
        **flags,
    )
    key = tuple(static.values())
    slot = _LAUNCHES.get(key) or _LAUNCHES.keep(key, {})
    per_call = dict(
        LENS=cache_seqlens,
        LEFTPAD=cache_leftpad if cache_leftpad is not None else dummy,
        BT=block_table if paged else dummy,
        CBI=cache_batch_idx if cache_batch_idx is not None else dummy,
        FLAG=flag,
    )
    launch_cached(_kv_values_kernel, (1,), static, per_call, slot)


__all__ = ["check_blocks", "check_kv_values", "kv_value_bits", "or_into_flag"]
