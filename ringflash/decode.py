"""Flash decoding with a KV cache: ``flash_attn_with_kvcache`` (flash-attn's signature and semantics).

One call (1) writes the new keys/values ``k``/``v`` ``[B, Snew, Hk, D]`` into the cache in place at
positions ``cache_seqlens[b] .. cache_seqlens[b] + Snew - 1`` of cache row ``cache_batch_idx[b]``
(or through ``block_table`` for a paged cache), touching no other slot, then (2) attends the
``Sq`` query tokens to the first ``cache_seqlens[b] + Snew`` keys of each row, with causal/window
masks aligned to the bottom-right (query token ``t`` sits at key position
``cache_seqlens[b] + Snew - Sq + t``). ``cache_seqlens`` itself is not updated (as in flash-attn):
the caller advances it.

Backends (``ringflash.backends``): Triton's split-KV kernel (``ringflash.kernels.decode``) on CUDA,
which also does the append and the merge of its splits (one launch per step),
the blockwise PyTorch backend elsewhere (one batch row at a time, the key range cut into
``num_splits`` pieces that are merged exactly). Inference only: there is no autograd.

Every input is validated before anything is written, so a bad call leaves the cache untouched.
Checks that need tensor values on the host (lengths against capacity, block-table and
cache_batch_idx ranges) are skipped while a CUDA graph is being captured or torch.compile traces.
"""

from __future__ import annotations

import math

import torch

from .backends import backend_name
from .checks import MAX_HEADDIM, SUPPORTED_DTYPES, check_options, host_checks_allowed

__all__ = ["flash_attn_with_kvcache"]


class DecodeArgs:
    """Validated, normalised arguments of one decode call (shapes and int32 index tensors)."""

    def __init__(self, q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, num_splits):
        _check_tensors(q, k_cache, v_cache, k, v)
        batch, sq, hq, d = q.shape
        n_new = 0 if k is None else k.shape[1]
        self.paged = block_table is not None
        self.batch, self.seqlen_q, self.n_new = batch, sq, n_new
        if self.paged:
            if cache_batch_idx is not None:
                raise ValueError("cache_batch_idx cannot be combined with block_table (paged cache)")
            _check_index(block_table, "block_table", 2, q.device)
            if block_table.shape[0] != batch:
                raise ValueError(
                    f"block_table must be [B={batch}, max_blocks], got shape {tuple(block_table.shape)}"
                )
            self.capacity = block_table.shape[1] * k_cache.shape[1]
        else:
            if cache_batch_idx is not None:
                _check_index(cache_batch_idx, "cache_batch_idx", 1, q.device)
                if cache_batch_idx.shape[0] != batch:
                    raise ValueError(
                        f"cache_batch_idx must be [B={batch}], got shape {tuple(cache_batch_idx.shape)}"
                    )
            elif k_cache.shape[0] != batch:
                raise ValueError(
                    f"k_cache has {k_cache.shape[0]} rows but q has batch {batch}: pass cache_batch_idx "
                    "to map batch rows to cache rows"
                )
            self.capacity = k_cache.shape[1]
        if n_new > self.capacity:  # known from shapes: checked even when values are not
            raise ValueError(f"cannot append {n_new} tokens to a cache of {self.capacity} slots per row")
        if cache_seqlens is None:
            if k is not None:
                raise ValueError("appending k/v needs cache_seqlens (where the new tokens go)")
            # flash-attn: no cache_seqlens means every row uses its whole cache.
            cache_seqlens = torch.full((batch,), self.capacity, dtype=torch.int32, device=q.device)
        elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
            cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
        else:
            _check_index(cache_seqlens, "cache_seqlens", 1, q.device)
            if cache_seqlens.shape[0] != batch:
                raise ValueError(
                    f"cache_seqlens must be int32 [B={batch}], got shape {tuple(cache_seqlens.shape)}"
                )
        self.cache_seqlens = cache_seqlens
        self.cache_batch_idx = cache_batch_idx
        self.block_table = block_table
        if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
            raise ValueError(f"num_splits must be an int >= 0 (0 picks it), got {num_splits!r}")
        self.num_splits = num_splits
        if host_checks_allowed(q):
            self._check_values(k_cache)
        if hq == 0 or d == 0:
            raise ValueError(f"q must have heads and a head dim, got shape {tuple(q.shape)}")

    def _check_values(self, k_cache):
        """Lengths, pages and cache rows in range; one device-to-host read however many rows
        (the error path reads more to name the culprit)."""
        if self.batch == 0:
            return
        lens = self.cache_seqlens.long()
        flags = [lens.min() < 0, lens.max() + self.n_new > self.capacity]
        n_rows = k_cache.shape[0]
        if self.paged:
            page, bt = k_cache.shape[1], self.block_table.long()
            need = ((lens.clamp(min=0) + self.n_new + page - 1) // page).clamp(max=bt.shape[1])
            used = torch.arange(bt.shape[1], device=bt.device)[None, :] < need[:, None]
            flags.append((used & ((bt < 0) | (bt >= n_rows))).any())
        if self.cache_batch_idx is not None:
            idx = self.cache_batch_idx
            flags.append(((idx < 0) | (idx >= n_rows)).any())
            if self.n_new:  # only appends collide
                srt = idx.sort().values
                flags.append((srt[1:] == srt[:-1]).any())
        if not any(torch.stack(flags).tolist()):
            return
        lens = self.cache_seqlens.tolist()
        if any(n < 0 for n in lens):
            raise ValueError(f"cache_seqlens must be >= 0, got {lens}")
        worst = max(lens) + self.n_new
        if worst > self.capacity:
            what = "block_table pages * page size" if self.paged else "k_cache.shape[1]"
            raise ValueError(
                f"the cache is too small: a row needs {worst} slots (cache_seqlens + {self.n_new} new) "
                f"but holds {self.capacity} ({what})"
            )
        if self.paged:
            page = k_cache.shape[1]
            for b, n in enumerate(lens):
                used = self.block_table[b, : math.ceil((n + self.n_new) / page)].tolist()
                if any(p < 0 or p >= n_rows for p in used):
                    raise ValueError(f"block_table row {b} points outside the cache's {n_rows} pages: {used}")
        idx = self.cache_batch_idx.tolist() if self.cache_batch_idx is not None else []
        if any(i < 0 or i >= n_rows for i in idx):
            raise ValueError(f"cache_batch_idx entries must be in [0, {n_rows}), got {idx}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"cache_batch_idx has repeated rows {idx}: appends would collide")


def _check_tensors(q, k_cache, v_cache, k, v):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(
            f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the head dim (stride 1)")
    d, hq, hk = q.shape[-1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[-1] != d:
        raise ValueError(f"q and the cache must share the head dim, got {d} and {k_cache.shape[-1]}")
    if not 0 < d <= MAX_HEADDIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEADDIM}, got {d}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"nheads of q ({hq}) must be a multiple of nheads of the cache ({hk}) (GQA/MQA)")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v to append, or neither")
    if k is None:
        return
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, the cache has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        want = (q.shape[0], t.shape[1] if t.dim() == 4 else -1, hk, d)
        if t.dim() != 4 or tuple(t.shape) != want:
            raise ValueError(f"{name} must be [B, Snew, Hk, D] = {want}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")


def _check_index(t, name, ndim, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dim(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _clamped_lens(a: DecodeArgs) -> torch.Tensor:
    """``cache_seqlens`` as int64, clamped so the append fits (a no-op for checked values; the
    Triton kernels clamp the same way)."""
    return a.cache_seqlens.long().clamp(0, a.capacity - a.n_new)


def append_kv_(k_cache, v_cache, k, v, a: DecodeArgs) -> None:
    """Write ``k``/``v`` ``[B, Snew, Hk, D]`` at ``cache_seqlens[b] + [0, Snew)`` of each row, in place.

    Positions are computed on the device (no host sync, sizes from shapes): capturable in a CUDA
    graph. The Triton backend does it in one kernel launch, the PyTorch backend by index_put.
    """
    if k is None or a.n_new == 0:
        return
    dev = k.device
    if backend_name(dev) == "triton":
        from .kernels.decode import append_kv

        append_kv(
            k_cache,
            v_cache,
            k if k.stride(-1) == 1 else k.contiguous(),
            v if v.stride(-1) == 1 else v.contiguous(),
            a.cache_seqlens,
            block_table=a.block_table,
            cache_batch_idx=a.cache_batch_idx,
        )
        return
    n_rows = k_cache.shape[0]
    pos = _clamped_lens(a)[:, None] + torch.arange(a.n_new, device=dev)[None, :]  # [B, Snew]
    if a.paged:
        page = k_cache.shape[1]
        rows = torch.gather(a.block_table.long(), 1, pos // page).clamp(0, n_rows - 1)
        slots = pos % page
    else:
        base = (
            a.cache_batch_idx.long().clamp(0, n_rows - 1)
            if a.cache_batch_idx is not None
            else torch.arange(a.batch, device=dev)
        )
        rows = base[:, None].expand(-1, a.n_new)
        slots = pos
    k_cache[rows, slots] = k
    v_cache[rows, slots] = v


def _torch_decode(q, k_cache, v_cache, a: DecodeArgs, scale, causal, window, softcap, diag_offset):
    """Blockwise PyTorch path: float32 ``(out [B, Sq, Hq, D], lse [B, Hq, Sq])``."""
    from . import blockwise

    batch, sq, hq, d = q.shape
    out = torch.zeros((batch, sq, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.full((batch, hq, sq), -math.inf, dtype=torch.float32, device=q.device)
    lens = (_clamped_lens(a) + a.n_new).tolist()
    diags = diag_offset.tolist() if diag_offset is not None else [n - sq for n in lens]
    for b, n in enumerate(lens):
        if n == 0:
            continue
        if a.paged:
            page = k_cache.shape[1]
            pages = a.block_table[b, : math.ceil(n / page)].long().clamp(0, k_cache.shape[0] - 1)
            kb = k_cache[pages].flatten(0, 1)[:n]
            vb = v_cache[pages].flatten(0, 1)[:n]
        else:
            row = (
                int(a.cache_batch_idx[b].clamp(0, k_cache.shape[0] - 1))
                if a.cache_batch_idx is not None
                else b
            )
            kb, vb = k_cache[row, :n], v_cache[row, :n]
        splits = max(1, min(a.num_splits or 1, n))
        step = math.ceil(n / splits)
        for j0 in range(0, n, step):  # each split merged into the float32 state exactly
            blockwise.attn_fwd(
                q[b : b + 1],
                kb[None, j0 : j0 + step],
                vb[None, j0 : j0 + step],
                softmax_scale=scale,
                causal=causal,
                window_size=window,
                softcap=softcap,
                diag_offset=diags[b] - j0,
                out=out[b : b + 1],
                lse=lse[b : b + 1],
            )
    return out, lse


def attend_kvcache(
    q,
    k_cache,
    v_cache,
    a: DecodeArgs,
    scale,
    causal,
    window,
    softcap,
    diag_offset=None,
    out_dtype=None,
    k=None,
    v=None,
):
    """Attention of ``q`` over the cache: ``(out in out_dtype, lse float32)``.

    ``k``/``v``: the ``a.n_new`` new tokens, not yet in the cache: they are appended first
    (:func:`append_kv_`), or, on the Triton backend, by the attention kernel itself (one launch
    for the whole step). None: the cache already holds them.
    ``diag_offset``: int32 ``[B]`` key index aligned with query token 0 per row (sharded caches),
    or None for bottom-right alignment. ``out_dtype`` defaults to q's (float32 for partials).
    The backend follows ``ringflash.backends.backend_name``.
    """
    if backend_name(q.device) == "triton":
        from .kernels.decode import decode_fwd

        fused = k is not None and a.n_new > 0
        return decode_fwd(
            q if q.stride(-1) == 1 else q.contiguous(),
            k_cache,
            v_cache,
            a.cache_seqlens,
            n_new=a.n_new,
            k_new=(k if k.stride(-1) == 1 else k.contiguous()) if fused else None,
            v_new=(v if v.stride(-1) == 1 else v.contiguous()) if fused else None,
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
    append_kv_(k_cache, v_cache, k, v, a)
    out, lse = _torch_decode(q, k_cache, v_cache, a, scale, causal, window, softcap, diag_offset)
    return out.to(out_dtype or q.dtype), lse


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
    window = check_options(0.0, softmax_scale, window_size, softcap, None)
    a = DecodeArgs(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, num_splits)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    with torch.no_grad():
        out, lse = attend_kvcache(
            q, k_cache, v_cache, a, scale, bool(causal), window, float(softcap), k=k, v=v
        )
    return (out, lse) if return_softmax_lse else out
