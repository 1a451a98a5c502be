"""flash-attn's packed call forms: K and V (or Q, K and V) stacked in one tensor.

Each form unbinds its packed tensor into views and calls :func:`ringflash.ops.flash_attn_func`
or :func:`ringflash.ops.flash_attn_varlen_func`, so the checks, backends and gradients are theirs
(gradients flow into the packed tensor).
"""

from __future__ import annotations

import torch

from .ops import flash_attn_func, flash_attn_varlen_func

__all__ = [
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def _unpacked(x, n: int, dim: int, layout: str, name: str):
    if not isinstance(x, torch.Tensor) or x.dim() != dim + 3 or x.shape[dim] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be {layout} with {n} at dim {dim}, got {shape}")
    return x.unbind(dim=dim)


def flash_attn_kvpacked_func(q, kv, *args, **kwargs):
    """:func:`~ringflash.ops.flash_attn_func` with K and V packed together.

    Args:
        q: ``[B, Sq, Hq, D]``. kv: ``[B, Sk, 2, Hk, D]``. Other arguments (positional or by name)
            as in ``flash_attn_func`` after ``v``.

    Returns:
        As ``flash_attn_func``; gradients flow into ``kv``.

    Example:
        >>> out = flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), causal=True)
    """
    k, v = _unpacked(kv, 2, 2, "[B, S, 2, H, D]", "kv")
    return flash_attn_func(q, k, v, *args, **kwargs)


def flash_attn_qkvpacked_func(qkv, *args, **kwargs):
    """:func:`~ringflash.ops.flash_attn_func` with Q, K and V packed together.

    Args:
        qkv: ``[B, S, 3, H, D]``. Other arguments as in ``flash_attn_func`` after ``v``.

    Returns:
        As ``flash_attn_func``; gradients flow into ``qkv``.

    Example:
        >>> out = flash_attn_qkvpacked_func(torch.stack([q, k, v], dim=2), causal=True)
    """
    q, k, v = _unpacked(qkv, 3, 2, "[B, S, 3, H, D]", "qkv")
    return flash_attn_func(q, k, v, *args, **kwargs)


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs
):
    """:func:`~ringflash.ops.flash_attn_varlen_func` with K and V packed together.

    Args:
        q: ``[total_q, Hq, D]``. kv: ``[total_k, 2, Hk, D]``. Other arguments as in
            ``flash_attn_varlen_func``.

    Returns:
        As ``flash_attn_varlen_func``; gradients flow into ``kv``.

    Example:
        >>> out = flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu, cu, 250, 250, causal=True)
    """
    k, v = _unpacked(kv, 2, 1, "[T, 2, H, D]", "kv")
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs
    )


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kwargs):
    """:func:`~ringflash.ops.flash_attn_varlen_func` with Q, K and V packed together (one set of
    sequences for queries and keys).

    Args:
        qkv: ``[total, 3, H, D]``. cu_seqlens: int32 ``[batch + 1]``. max_seqlen: an int bounding
            the longest sequence. Other arguments as in ``flash_attn_varlen_func`` after the lengths.

    Returns:
        As ``flash_attn_varlen_func``; gradients flow into ``qkv``.

    Example:
        >>> out = flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, 250, causal=True)
    """
    q, k, v = _unpacked(qkv, 3, 1, "[T, 3, H, D]", "qkv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, *args, **kwargs)
