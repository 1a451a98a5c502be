"""KV-cache decoding on the blockwise PyTorch backend: the interface of
``ringflash.kernels.decode`` (append, then attention over each row's cache, split key ranges merged
exactly), built on ``ringflash.blockwise.attn_fwd``."""

from __future__ import annotations

import math

import torch

from .blockwise import DEFAULT_CONFIG, BlockwiseConfig, attn_fwd


def _cache_capacity(k_cache, block_table) -> int:
    return block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]


def _clamped_lens(cache_seqlens, capacity: int, n_new: int) -> torch.Tensor:
    """``cache_seqlens`` as int64 clamped so an append of ``n_new`` fits (a no-op for checked
    values; the Triton kernels clamp the same way), so nothing outside the cache is touched."""
    return cache_seqlens.long().clamp(0, max(capacity - n_new, 0))


def append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, cache_batch_idx=None) -> None:
    """Write ``k``/``v`` ``[B, Snew, Hk, D]`` at ``cache_seqlens[b] + [0, Snew)`` of each row, in place.

    Positions are computed on the device (no host sync), clamped into the cache.
    """
    B, n_new = k.shape[0], k.shape[1]
    if n_new == 0 or B == 0:
        return
    dev, n_rows = k.device, k_cache.shape[0]
    pos = _clamped_lens(cache_seqlens, _cache_capacity(k_cache, block_table), n_new)[:, None]
    pos = pos + torch.arange(n_new, device=dev)[None, :]  # [B, Snew]
    if block_table is not None:
        page = k_cache.shape[1]
        rows = torch.gather(block_table.long(), 1, pos // page).clamp(0, n_rows - 1)
        slots = pos % page
    else:
        base = (
            cache_batch_idx.long().clamp(0, n_rows - 1)
            if cache_batch_idx is not None
            else torch.arange(B, device=dev)
        )
        rows = base[:, None].expand(-1, n_new)
        slots = pos
    k_cache[rows, slots] = k
    v_cache[rows, slots] = v


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
    cache_leftpad=None,
    num_splits=0,
    diag_offset=None,
    out_dtype=None,
    config: BlockwiseConfig | None = None,
    **mask,
):
    """Attention of ``q [B, Sq, Hq, D]`` over a KV cache, one batch row at a time; the interface of
    ``ringflash.kernels.decode.decode_fwd`` (``cache_leftpad``: row ``b``'s keys start at slot
    ``cache_leftpad[b]``). ``mask``: ``softmax_scale`` and optionally ``causal``, ``window_size``,
    ``softcap``, as for ``ringflash.blockwise.attn_fwd``.

    With ``k_new``/``v_new`` ``[B, Snew, Hk, D]`` they are first written at ``cache_seqlens[b]``
    (``append_kv``); without them the cache already holds ``n_new`` new tokens after
    ``cache_seqlens[b]``. Row ``b`` attends to its first ``cache_seqlens[b] + Snew`` keys, the key
    range cut into ``num_splits`` pieces merged exactly. ``diag_offset``: int32 ``[B]`` key index
    aligned with query token 0 (sharded caches), or None for bottom-right alignment.

    Returns:
        ``(out [B, Sq, Hq, D] in out_dtype (default q's), lse [B, Hq, Sq] float32)``.
    """
    cfg = config or DEFAULT_CONFIG
    if k_new is not None:
        n_new = k_new.shape[1]
        append_kv(
            k_cache,
            v_cache,
            k_new,
            v_new,
            cache_seqlens,
            block_table=block_table,
            cache_batch_idx=cache_batch_idx,
        )
    B, Sq, Hq, D = q.shape
    out = torch.zeros((B, Sq, Hq, v_cache.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float32, device=q.device)
    capacity, n_rows = _cache_capacity(k_cache, block_table), k_cache.shape[0]
    lens = (_clamped_lens(cache_seqlens, capacity, n_new) + n_new).tolist()
    diags = diag_offset.tolist() if diag_offset is not None else [n - Sq for n in lens]
    pads = cache_leftpad.tolist() if cache_leftpad is not None else [0] * B
    for b, n in enumerate(lens):
        lp = min(max(pads[b], 0), n)
        if n == lp:
            continue
        if block_table is not None:
            page = k_cache.shape[1]
            pages = block_table[b, : math.ceil(n / page)].long().clamp(0, n_rows - 1)
            kb, vb = k_cache[pages].flatten(0, 1)[lp:n], v_cache[pages].flatten(0, 1)[lp:n]
        else:
            row = int(cache_batch_idx[b].clamp(0, n_rows - 1)) if cache_batch_idx is not None else b
            kb, vb = k_cache[row, lp:n], v_cache[row, lp:n]
        n, diag = n - lp, diags[b] - lp  # key index 0 is now slot lp
        step = math.ceil(n / max(1, min(num_splits or 1, n)))
        for j0 in range(0, n, step):  # each split merged into the float32 state exactly
            attn_fwd(
                q[b : b + 1],
                kb[None, j0 : j0 + step],
                vb[None, j0 : j0 + step],
                diag_offset=diag - j0,
                out=out[b : b + 1],
                lse=lse[b : b + 1],
                config=cfg,
                **mask,
            )
    return out.to(out_dtype or q.dtype), lse
