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

Every input is validated before anything is written (``ringflash.kv_checks.KVCacheArgs``), so a bad
call leaves the cache untouched, except the index values under ``use_value_checks("device")`` (the
default for CUDA tensors): those are checked on the device, inside the decoding kernel, and a
failure is reported by a later call (``ringflash.device_errors``), the faulty call's writes clamped
into the cache.
"""

from __future__ import annotations

import torch

from .backends import SignatureTable, backend_for, plan_signature
from .checks import check_flag, check_options, check_sink, resolve_scale, value_check_mode
from .device_errors import raise_completed
from .kv_checks import KVCacheArgs
from .merge import merge_sink
from .rotary import apply_rotary

__all__ = ["flash_attn_with_kvcache"]

# Calls that passed every check and were planned by their backend, by everything the checks and
# the launch derive from: each tensor's type, shape, strides, dtype and device, each option's type
# and value, and the backend, configs and value-check mode in force. A decoding loop repeats a few;
# a later call of one skips the checks and the derivation (the checks of index values still run,
# on the device, in its launch) and only allocates its results and launches.
_PLANS = SignatureTable(256)


def _plan_key(tensors, options, mode, lse: bool) -> tuple | None:
    """The key of a call in ``_PLANS`` (``lse``: whether the call needs the LSE), or None for a
    call that always takes the full path."""
    if mode == "host" or tensors[5] is None or torch.compiler.is_compiling():
        return None  # host value checks read every call's values; no cache_seqlens: filled per call
    # An int cache_seqlens or a tensor subclass gives no key: the full path handles it.
    return plan_signature(tensors, options, options[2], mode, lse)


def queue_value_checks(a: KVCacheArgs, q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """In ``"device"`` value-check mode (``a.device_checks``), queue the call's index checks on
    the device (``ringflash.device_errors``): one launch that writes the host's error flag."""
    if a.device_checks:
        backend_for(q).check_kv_values(a, k_cache)


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
    check=False,
):
    """Append ``k``/``v`` (the ``a.n_new`` new tokens, or None) and attend ``q`` over the cache:
    ``(out in out_dtype (default q's), lse float32)``.

    ``diag_offset``: int32 ``[B]`` key index aligned with query token 0 per row (sharded caches),
    or None for bottom-right alignment. ``check``: also check ``a``'s index values on the device
    (``queue_value_checks``), in the same launch where the backend can.
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
        cache_leftpad=a.cache_leftpad,
        check=a if check else None,
    )


def _check_rotary(cos, sin, q, interleaved, capacity: int, appends: bool) -> None:
    if (cos is None) != (sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if cos is None:
        return
    if not appends:  # flash-attn's rule: the rotation is of the tokens being appended
        raise ValueError("rotary_cos and rotary_sin need the new k and v to append (as in flash-attn)")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor [seqlen_ro, rotary_dim / 2], got {t!r}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"rotary_cos {tuple(cos.shape)} and rotary_sin {tuple(sin.shape)} differ in shape")
    if 2 * cos.shape[1] > q.shape[-1] or cos.shape[1] == 0:
        raise ValueError(f"rotary_dim = 2 * {cos.shape[1]} must be in 2..head dim {q.shape[-1]}")
    if cos.shape[0] < capacity:  # flash-attn's rule: a position past the table would be clamped
        raise ValueError(
            f"rotary_cos and rotary_sin must have a row for every cache slot: seqlen_ro = {cos.shape[0]} "
            f"is shorter than the cache's {capacity} slots per row"
        )
    check_flag(interleaved, "rotary_interleaved")


def _rotate(q, k, cos, sin, a: KVCacheArgs, causal, window, interleaved):
    """flash-attn's rotary while appending, at cache slot positions (``cache_leftpad`` does not
    shift them, as in flash-attn): new key ``i`` at ``cache_seqlens + i``; query ``t`` at
    ``cache_seqlens + t`` when causal or windowed, else every query at ``cache_seqlens``."""
    start = a.cache_seqlens.long()
    if k is not None and a.n_new:
        k = apply_rotary(k, cos, sin, start[:, None] + torch.arange(a.n_new, device=q.device), interleaved)
    sq = q.shape[1]
    if causal or window != (-1, -1):
        qpos = start[:, None] + torch.arange(sq, device=q.device)
    else:
        qpos = start[:, None].expand(-1, sq)
    return apply_rotary(q, cos, sin, qpos, interleaved), k


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    learnable_sink=None,
):
    """Append new keys/values to a KV cache in place, then attend to the cache (flash decoding).

    flash-attn's signature, argument for argument, so code switches by changing an import.
    Inference only: no autograd (the cache is mutated in place and no backward is defined).

    Args:
        q: ``[B, Sq, Hq, D]``, a few query tokens per row (1 for plain decoding, more for
            speculative decoding). float16, bfloat16 or float32; ``D <= 256``.
        k_cache, v_cache: ``[B_cache, S_cache, Hk, D]``, or paged ``[num_blocks, block_size, Hk, D]``
            with ``block_table``. ``Hq % Hk == 0`` (GQA/MQA; K/V are read once per KV head).
        k, v: ``[B, Snew, Hk, D]`` new tokens written at ``cache_seqlens[b]`` onwards, or None.
        rotary_cos, rotary_sin: ``[seqlen_ro, rotary_dim / 2]`` or None: rotary embedding applied
            to the new keys (before they are written) and to the queries at cache slot positions,
            as flash-attn does: new key ``i`` at ``cache_seqlens[b] + i``, query ``t`` at
            ``cache_seqlens[b] + t`` when causal or windowed, else every query at
            ``cache_seqlens[b]`` (``cache_leftpad`` does not shift them); ``rotary_interleaved``
            pairs channels (0, 1), (2, 3), ... (GPT-J) when True, else (i, i + rotary_dim / 2)
            (GPT-NeoX). Only with ``k``/``v``, and ``seqlen_ro`` must cover the cache's slots per
            row (both as in flash-attn).
        cache_seqlens: int32 ``[B]`` tokens already in each row's cache, or an int for all rows;
            None means every row's whole cache (only without k/v). Lengths may be 0.
        cache_batch_idx: int32 ``[B]``, the cache row of each batch row (contiguous cache only).
        cache_leftpad: int32 ``[B]`` or None: row ``b``'s cache starts at slot
            ``cache_leftpad[b]`` (left-padded prompts): earlier slots are not attended. Not with
            ``block_table``.
        block_table: int32 ``[B, max_blocks]``, page indices into ``k_cache``'s first dim. Rows
            may share pages they only read (a common prefix), never a page that one of them
            appends to (checked by host value checks only; undefined otherwise, as in flash-attn).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: bottom-right causal mask (query token ``t`` sees keys up to
            ``cache_seqlens[b] + Snew - Sq + t``).
        window_size: ``(left, right)`` sliding window, -1 for unbounded. softcap: as flash-attn.
        alibi_slopes: must be None (not supported).
        num_splits: key-range splits per (row, KV head); 0 picks from the shape and SM count.
        return_softmax_lse: also return the LSE.
        learnable_sink: ``[Hq]`` float tensor or None: one logit per query head that joins every
            row's softmax denominator and carries no value (gpt-oss).

    Returns:
        ``out [B, Sq, Hq, D]`` in q's dtype, or ``(out, lse [B, Hq, Sq] float32)``. A row that
        sees no key (length 0) has output 0 and ``lse = -inf`` (the sink's logit with a sink).

    Raises:
        ValueError / TypeError for bad shapes, dtypes, devices, a cache too small for the append,
        or block_table / cache_batch_idx / cache_leftpad entries outside the cache, before
        anything is written. For CUDA tensors the index values are checked on the device instead
        (no sync): a failure is raised by a later call or ``check_device_errors()``
        (``use_value_checks("host")`` raises in the call itself).

    Example:
        >>> k_cache = torch.zeros(2, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
        >>> v_cache = torch.zeros_like(k_cache)
        >>> lens = torch.tensor([100, 7], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(2, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        >>> k = v = torch.randn(2, 1, 8, 128, dtype=torch.bfloat16, device="cuda")
        >>> out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
        >>> lens += 1
    """
    key = None
    # A plan whose caller takes no LSE (plain decoding) lets its launch write the LSE to scratch.
    wants_lse = bool(return_softmax_lse) or learnable_sink is not None
    # One cache passed as both k_cache and v_cache takes the full path, whose checks refuse an append.
    if rotary_cos is None and rotary_sin is None and alibi_slopes is None and k_cache is not v_cache:
        tensors = (
            q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
            learnable_sink,
        )  # fmt: skip
        options = (softmax_scale, causal, window_size, softcap, num_splits)
        mode = value_check_mode(q) if type(q) is torch.Tensor else None
        key = _plan_key(tensors, options, mode, wants_lse)
        runner = _PLANS.find(key)
        if runner is not None:
            if mode is not None:
                raise_completed(q.device)  # a failure an earlier call queued on the device
            out, lse = runner(
                q, k_cache, v_cache, cache_seqlens, k, v, block_table, cache_batch_idx, cache_leftpad
            )
            if learnable_sink is not None:
                with torch.no_grad():
                    out, lse = merge_sink(out, lse, learnable_sink)
            return (out, lse) if return_softmax_lse else out
    causal, window, softcap, scale = check_options(
        0.0, softmax_scale, window_size, softcap, alibi_slopes, causal
    )
    a = KVCacheArgs(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, num_splits, cache_leftpad
    )
    _check_rotary(rotary_cos, rotary_sin, q, rotary_interleaved, a.capacity, k is not None)
    check_sink(learnable_sink, q)
    with torch.no_grad():
        if rotary_cos is not None:
            q, k = _rotate(q, k, rotary_cos, rotary_sin, a, causal, window, bool(rotary_interleaved))
        out, lse = attend_kvcache(
            q, k_cache, v_cache, a, resolve_scale(scale, q.shape[-1]), causal, window, softcap, k=k, v=v,
            check=a.device_checks,
        )  # fmt: skip
        if learnable_sink is not None:
            out, lse = merge_sink(out, lse, learnable_sink)
    if key is not None:
        runner = backend_for(q).decode_plan(
            q, k_cache, v_cache, k_new=k if a.n_new else None, v_new=v if a.n_new else None,
            block_table=a.block_table, cache_batch_idx=a.cache_batch_idx, cache_leftpad=a.cache_leftpad,
            softmax_scale=resolve_scale(scale, q.shape[-1]), causal=causal, window_size=window,
            softcap=softcap, num_splits=a.num_splits, check=a.device_checks, lse=wants_lse,
        )  # fmt: skip
        if runner is not None:
            _PLANS.keep(key, runner)
    return (out, lse) if return_softmax_lse else out
