"""Flash decoding with a KV cache: ``flash_attn_with_kvcache`` (flash-attn's signature and semantics).

One call (1) writes the new keys/values ``k``/``v`` ``[B, Snew, Hk, D]`` into the cache in place at
positions ``cache_seqlens[b] .. cache_seqlens[b] + Snew - 1`` of cache row ``cache_batch_idx[b]``
(or through ``block_table`` for a paged cache), touching no other slot, then (2) attends the
``Sq`` query tokens to the first ``cache_seqlens[b] + Snew`` keys of each row, with causal/window
masks aligned to the bottom-right (query token ``t`` sits at key position
``cache_seqlens[b] + Snew - Sq + t``). ``cache_seqlens`` itself is not updated (as in flash-attn):
the caller advances it.

The backend (``ringflash.backends``) does both steps: on CUDA the Triton split-KV kernel (append,
attention and the merge of its splits in one launch), elsewhere the blockwise PyTorch path.
Inference only: there is no autograd.

Every input is validated before anything is written (``ringflash.checks.KVCacheArgs``), so a bad
call leaves the cache untouched.
"""

from __future__ import annotations

import torch

from .backends import backend_for
from .checks import KVCacheArgs, check_options, resolve_scale

__all__ = ["flash_attn_with_kvcache"]


def attend_kvcache(
    q,
    k_cache,
    v_cache,
    a: KVCacheArgs,
    scale,
    causal,
    window,
    softcap,
    *,
    k=None,
    v=None,
    diag_offset=None,
    out_dtype=None,
):
    """Append ``k``/``v`` (the ``a.n_new`` new tokens, or None) and attend ``q`` over the cache:
    ``(out in out_dtype (default q's), lse float32)``.

    ``diag_offset``: int32 ``[B]`` key index aligned with query token 0 per row (sharded caches),
    or None for bottom-right alignment.
    """
    return backend_for(q).decode_fwd(
        q,
        k_cache,
        v_cache,
        a.cache_seqlens,
        k_new=k if a.n_new else None,
        v_new=v if a.n_new else None,
        block_table=a.block_table,
        cache_batch_idx=a.cache_batch_idx,
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        softcap=softcap,
        num_splits=a.num_splits,
        diag_offset=diag_offset,
        out_dtype=out_dtype,
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    return_softmax_lse=False,
):
    """Append new keys/values to a KV cache in place, then attend to the cache (flash decoding).

    Inference only: no autograd (the cache is mutated in place and no backward is defined).

    Args:
        q: ``[B, Sq, Hq, D]``, a few query tokens per row (1 for plain decoding, more for
            speculative decoding). float16, bfloat16 or float32; ``D <= 256``.
        k_cache, v_cache: ``[B_cache, S_cache, Hk, D]``, or paged ``[num_blocks, block_size, Hk, D]``
            with ``block_table``. ``Hq % Hk == 0`` (GQA/MQA; K/V are read once per KV head).
        k, v: ``[B, Snew, Hk, D]`` new tokens written at ``cache_seqlens[b]`` onwards, or None.
        cache_seqlens: int32 ``[B]`` tokens already in each row's cache, or an int for all rows;
            None means every row's whole cache (only without k/v). Lengths may be 0.
        cache_batch_idx: int32 ``[B]``, the cache row of each batch row (contiguous cache only).
        block_table: int32 ``[B, max_blocks]``, page indices into ``k_cache``'s first dim.
        softmax_scale: defaults to ``D ** -0.5``.
        causal: bottom-right causal mask (query token ``t`` sees keys up to
            ``cache_seqlens[b] + Snew - Sq + t``).
        window_size: ``(left, right)`` sliding window, -1 for unbounded. softcap: as flash-attn.
        num_splits: key-range splits per (row, KV head); 0 picks from the shape and SM count.
        return_softmax_lse: also return the LSE.

    Returns:
        ``out [B, Sq, Hq, D]`` in q's dtype, or ``(out, lse [B, Hq, Sq] float32)``. A row that
        sees no key (length 0) has output 0 and ``lse = -inf``.

    Raises:
        ValueError / TypeError for bad shapes, dtypes, devices, a cache too small for the append,
        or block_table / cache_batch_idx entries outside the cache, before anything is written.

    Example:
        >>> k_cache = torch.zeros(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
        >>> v_cache = torch.zeros_like(k_cache)
        >>> lens = torch.tensor([100, 7], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(2, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        >>> k = v = torch.randn(2, 1, 8, 128, dtype=torch.bfloat16, device="cuda")
        >>> out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
        >>> lens += 1
    """
    causal, window, softcap, scale = check_options(0.0, softmax_scale, window_size, softcap, None, causal)
    a = KVCacheArgs(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, num_splits)
    with torch.no_grad():
        out, lse = attend_kvcache(
            q, k_cache, v_cache, a, resolve_scale(scale, q.shape[-1]), causal, window, softcap, k=k, v=v
        )
    return (out, lse) if return_softmax_lse else out
