"""Split-KV flash decoding: a few query tokens against a long (optionally paged) KV cache.

``decode_fwd`` launches the split kernel (``split.py``): the keys a batch row can see are divided
into ``num_splits`` runs, one program per (run, batch row, KV head, block of query rows) writes a
float32 partial ``(out, lse)``, and the partials merge exactly (``lse = log sum exp lse_s``, ``out =
sum exp(lse_s - lse) out_s``), by default in the same launch (the last program of a row merges,
with the counters of ``counters.py``), else by the combine kernel (``combine.py``). New tokens
given as ``k_new``/``v_new`` are appended to the cache by the same launch; ``append_kv``
(``append.py``) is the append on its own.

Invariant: every path returns exact attention over the first ``cache_seqlens[b] + n_new`` keys
of each row (bottom-right masks, or at ``diag_offset``): ``-inf`` LSE and output 0 for rows that
see no key; nothing outside the cache is read or written, whatever the lengths. CUDA graphs:
lengths are read on the device, every buffer is sized from the shapes and ``num_splits``, and
nothing syncs with the host, so a step can be captured once and replayed for any cache lengths.

Flags are computed here, not by ``@triton.heuristics``: each heuristic copies the launch's
arguments, host time that a decoding step (tens of microseconds of GPU time) does not spare.
"""

from __future__ import annotations

import torch

from ..device import bandwidth_per_sm, on_tensor_device, ptx_device, sm_count
from ..launch import SignatureTable, launch_cached, stream_scratch
from ..launch_args import cdiv, dot_f32, dot_precision, mask_flags, next_pow2, pad_dim, stride_names, strides
from ..options import DecodeConfig, tma_mode
from ..tma import tma_applies
from .append import append_kv
from .check import check_blocks
from .combine import combine_partials
from .counters import semaphore_buffer
from .split import _decode_split_kernel
from .tiles import (
    _COMBINE_TILE,
    _CPU_BLOCK_N,
    MAX_BLOCK_M,
    block_m,
    pick_block_n,
    pick_num_splits,
    prefetch_lines,
    split_kv_pays,
)

__all__ = [
    "MAX_BLOCK_M",
    "append_kv",
    "block_m",
    "combine_partials",
    "decode_fwd",
    "pick_block_n",
    "pick_num_splits",
    "semaphore_buffer",
    "split_kv_pays",
]

_Q, _KC, _VC = stride_names("q", "bsh"), stride_names("k", "bsh"), stride_names("v", "bsh")
_KN, _VN = stride_names("kn", "bsh"), stride_names("vn", "bsh")
_OUT, _LSE = stride_names("o", "bsh"), stride_names("l", "bhs")
_PARTS = ("stride_opb", "stride_ops", "stride_oph", "stride_opn", "stride_lpb", "stride_lps", "stride_lph")


class _Launch:
    """Everything one split-kernel launch derives from its call's signature (shapes, strides,
    dtypes, options): the grid, the scalar and constexpr arguments, the partial buffers' shapes."""

    __slots__ = ("grid", "static", "parts", "sem_rows", "compiled", "scratch")

    def __init__(self, grid, static, parts, sem_rows):
        self.grid, self.static, self.parts, self.sem_rows = grid, static, parts, sem_rows
        self.compiled: dict = {}  # compiled kernels by pointer alignment (``kernels.launch``)
        self.scratch: dict = {}  # eager calls' float32 buffers by (name, device, stream): ``scratch``


def scratch(launch: _Launch, name: str, shape: tuple, dev: torch.device) -> torch.Tensor:
    """``stream_scratch`` of ``launch``: a split call's float32 partials under the fused merge,
    or the LSE of a planned call that does not take it."""
    return stream_scratch(launch.scratch, name, shape, dev)


# Launches by call signature. An eager decoding loop repeats one signature per layer shape, so the
# derivation (about half of a step's host time) runs once; the per-call work is the binding of the
# tensors. Bounded: a workload of many shapes starts over rather than growing.
_LAUNCHES: SignatureTable = SignatureTable()


def _signature(
    q,
    k_cache,
    v_cache,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    diag_offset,
    cache_leftpad,
    out_dtype,
    n_new,
    opts,
    config,
    check,
) -> tuple:
    kn = None if k_new is None else (k_new.shape, k_new.stride(), v_new.stride())
    bt = None if block_table is None else (block_table.shape, block_table.stride(0))
    return (
        q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), v_cache.stride(),
        kn, bt, cache_batch_idx is None, diag_offset is None, cache_leftpad is None, out_dtype, n_new,
        opts, config, check,
    )  # fmt: skip


def _derive(
    q,
    k_cache,
    v_cache,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    diag_offset,
    cache_leftpad,
    out_dtype,
    n_new,
    softmax_scale,
    causal,
    window_size,
    softcap,
    num_splits,
    config,
    check,
) -> _Launch:
    """The launch of a signature (see ``_Launch``)."""
    B, Sq, Hq, D = q.shape
    paged = block_table is not None
    Hk = k_cache.shape[2]
    group = Hq // Hk
    dev = q.device
    fuse_append = k_new is not None and k_new.shape[1] > 0
    has_lo, has_hi, wl, wr = mask_flags(causal, window_size)
    page_size = k_cache.shape[1]
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    bm = block_m(group, Sq)
    m_blocks = cdiv(group * Sq, bm)
    n_splits = int(num_splits) or pick_num_splits(B, Hk, group, Sq, capacity, dev)
    fused = config.fuse_combine
    # Partials [B, Sq, Hq, n_splits, D]: each (b, t, h) row's splits are contiguous for the combine.
    if fused and n_splits == 1:
        parts, part_strides = None, dict.fromkeys(_PARTS, 0)  # the one split writes out / lse
    else:
        parts = ((B, Sq, Hq, n_splits, D), (B, Sq, Hq, n_splits))
        o_strides = torch.empty(parts[0], device="meta").stride()[:4]
        l_strides = torch.empty(parts[1], device="meta").stride()[:3]
        part_strides = dict(zip(_PARTS, (*o_strides, *l_strides), strict=True))
    cpu = dev.type == "cpu"
    d_pad = pad_dim(D)
    if config.block_n:
        bn = config.block_n
    elif cpu:
        bn = _CPU_BLOCK_N
    else:
        programs = n_splits * B * Hk * m_blocks
        bn = pick_block_n(
            programs,
            capacity // n_splits,
            d_pad * q.element_size(),
            sm_count(dev),
            bandwidth_per_sm(dev),
            config,
        )
    combine_m = min(bm, next_pow2(group * Sq))
    # L2 prefetch (an inline PTX hint, so CUDA only) where split 0's first keys are known early.
    prefetch = (
        ptx_device(dev) and not paged and cache_batch_idx is None and not has_lo and cache_leftpad is None
    )
    lines, step = prefetch_lines(D, k_cache.element_size())
    out_strides = torch.empty((B, Sq, Hq, D), device="meta").stride()
    lse_strides = torch.empty((B, Hq, Sq), device="meta").stride()
    static = dict(
        **strides(q, _Q),
        **strides(k_cache, _KC),
        **strides(v_cache, _VC),
        **(strides(k_new, _KN) if fuse_append else dict.fromkeys(_KN, 0)),
        **(strides(v_new, _VN) if fuse_append else dict.fromkeys(_VN, 0)),
        stride_btb=block_table.stride(0) if paged else 0,
        **part_strides,
        **dict(zip(_OUT, out_strides, strict=False)),
        **dict(zip(_LSE, lse_strides, strict=False)),
        seqlen_q=Sq,
        n_new=int(n_new),
        page_size=page_size,
        capacity=capacity,
        n_rows=k_cache.shape[0],
        window_left=wl,
        window_right=wr,
        n_kv_heads=Hk,
        sm_scale=float(softmax_scale),
        softcap=float(softcap),
        GROUP=group,
        HEAD_DIM=D,
        D_PAD=d_pad,
        HAS_LO=has_lo,
        HAS_HI=has_hi,
        SOFTCAP=softcap > 0,
        PAGED=paged,
        HAS_CBI=cache_batch_idx is not None,
        DIAG_FROM_PTR=diag_offset is not None,
        HAS_LEFTPAD=cache_leftpad is not None,
        DOT_PREC=dot_precision(q.dtype),
        DOT_F32=dot_f32(q),
        FUSE_APPEND=fuse_append,
        FUSE_COMBINE=fused,
        EVICT=config.evict,
        TMA=False,
        COMBINE_M=combine_m,
        SPLIT_BLOCK=max(1, min(next_pow2(n_splits), _COMBINE_TILE // (combine_m * d_pad))),
        BLOCK_M=bm,
        BLOCK_N=bn,
        # A power of two of at most the cache's rows; 0 (none) for an empty cache.
        PREFETCH_ROWS=next_pow2(min(config.prefetch_rows, capacity)) if prefetch else 0,
        PREFETCH_LINES=lines,
        PREFETCH_STEP=step,
        batch=B,
        CHECK=check,
        **{
            f"CHECK_{n}": v for n, v in check_blocks(B, capacity // max(page_size, 1) if paged else 1).items()
        },
    )
    if not cpu:
        static.update(num_warps=config.num_warps, num_stages=config.num_stages)
    sem_rows = B * Hk * m_blocks if fused and n_splits > 1 else 0
    return _Launch((n_splits, B * Hk, m_blocks), static, parts, sem_rows)


def _launch_for(
    q,
    k_cache,
    v_cache,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    diag_offset,
    cache_leftpad,
    out_dtype,
    n_new,
    softmax_scale,
    causal,
    window_size,
    softcap,
    num_splits,
    config,
    check,
) -> tuple[_Launch, bool]:
    """``(launch, kept)``: the launch of this call's signature, from ``_LAUNCHES`` or derived;
    ``kept`` False under ``use_tma("on")``, whose launches depend on addresses."""
    opts = (softmax_scale, causal, tuple(window_size), softcap, num_splits)
    tma = tma_mode() == "on" and block_table is None
    args = (q, k_cache, v_cache, k_new, v_new, block_table, cache_batch_idx, diag_offset, cache_leftpad)
    key = _signature(*args, out_dtype, n_new, opts, config, check)
    launch = None if tma else _LAUNCHES.get(key)
    if launch is None:
        launch = _derive(
            *args, out_dtype, n_new, softmax_scale, causal, window_size, softcap, num_splits, config, check
        )
        if tma:  # TMA descriptors for the cache's K/V tiles: only under use_tma("on"), never cached
            # (slower than pointer loads here, docs/performance.md; the check reads addresses)
            on = tma_applies(k_cache, v_cache, seqlen=launch.static["capacity"])
            launch.static.update(TMA=on, PREFETCH_ROWS=0 if on else launch.static["PREFETCH_ROWS"])
        else:
            _LAUNCHES.keep(key, launch)
    return launch, not tma


def _bind(
    launch: _Launch,
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    out,
    lse,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    diag_offset,
    cache_leftpad,
    check_flag,
) -> dict:
    """The per-call arguments of ``launch``, with the float32 partials (``OP``/``LSEP``, from
    ``scratch``) unless the launch writes ``out``/``lse`` directly (one split, fused)."""
    dev = q.device
    if launch.parts is None:
        o_part = lse_part = out  # unused: the one split writes out / lse directly
    elif launch.static["FUSE_COMBINE"]:  # read by the launch that writes them: a stream's to reuse
        o_part = scratch(launch, "OP", launch.parts[0], dev)
        lse_part = scratch(launch, "LSEP", launch.parts[1], dev)
    else:  # read by a later launch, which another thread's call on this stream could precede
        o_part = torch.empty(launch.parts[0], dtype=torch.float32, device=dev)
        lse_part = torch.empty(launch.parts[1], dtype=torch.float32, device=dev)
    fuse_append = launch.static["FUSE_APPEND"]
    return dict(
        Q=q,
        K=k_cache,
        V=v_cache,
        KN=k_new if fuse_append else None,
        VN=v_new if fuse_append else None,
        OP=o_part,
        LSEP=lse_part,
        O=out,
        LSE=lse,
        # With one split the merge is compiled but never runs: any int32 pointer will do.
        SEM=semaphore_buffer(dev, launch.sem_rows) if launch.sem_rows else cache_seqlens,
        SEQLENS=cache_seqlens,
        BT=block_table,
        CBI=cache_batch_idx,
        DIAG=diag_offset,
        LEFTPAD=cache_leftpad,
        FLAG=check_flag,
    )  # fmt: skip


def split_args(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    out,
    lse,
    *,
    n_new,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    softmax_scale,
    causal,
    window_size,
    softcap,
    num_splits,
    diag_offset,
    config: DecodeConfig,
    cache_leftpad=None,
    check_flag=None,
) -> tuple[tuple[int, int, int], dict, dict, dict]:
    """``(grid, static, per_call, slot)`` of one split-kernel launch of ``decode_fwd`` (shapes as
    there; ``out``/``lse`` the results to write): the arguments fixed for this call's signature,
    those bound for this call, and the signature's compiled kernels (``kernels.launch``)."""
    launch, _ = _launch_for(
        q, k_cache, v_cache, k_new, v_new, block_table, cache_batch_idx, diag_offset, cache_leftpad,
        out.dtype, n_new, softmax_scale, causal, window_size, softcap, num_splits, config,
        check_flag is not None,
    )  # fmt: skip
    per_call = _bind(
        launch, q, k_cache, v_cache, cache_seqlens, out, lse, k_new, v_new, block_table, cache_batch_idx,
        diag_offset, cache_leftpad, check_flag,
    )  # fmt: skip
    return launch.grid, launch.static, per_call, launch.compiled


@on_tensor_device
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
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    diag_offset=None,
    out_dtype=None,
    config=None,
    cache_leftpad=None,
    check_flag=None,
):
    """Split-KV decode attention; with ``k_new``/``v_new`` it also appends them to the cache.

    Args:
        q: ``[B, Sq, Hq, D]`` (last dim contiguous), ``D <= 256``.
        k_cache, v_cache: ``[B_cache, S_cache, Hk, D]``, or paged ``[num_pages, page_size, Hk, D]``
            with ``block_table``; last dim contiguous; ``Hq % Hk == 0``.
        cache_seqlens: int32 ``[B]`` on q's device.
        n_new: without ``k_new``: the cache already holds ``n_new`` new tokens after
            ``cache_seqlens[b]`` and row ``b`` attends to ``cache_seqlens[b] + n_new`` keys.
        k_new, v_new: ``[B, Snew, Hk, D]`` (last dim contiguous) or None. Fused append: the kernel
            writes them to cache slots ``cache_seqlens[b] + [0, Snew)`` and attends to them read
            from ``k_new``/``v_new`` (the same keys the unfused append + attend sees).
        block_table: int32 ``[B, max_pages]`` (paged cache) or None.
        cache_batch_idx: int32 ``[B]``, the cache row of each batch row (contiguous cache) or None.
        softmax_scale, causal, window_size, softcap: the score scale, the mask (bottom-right
            aligned, or at ``diag_offset``) and the score cap (0 for none).
        num_splits: 0 picks it from the shapes and the SM count (:func:`pick_num_splits`).
        diag_offset: int32 ``[B]``, the key index aligned with query token 0 per row (sharded
            caches), or None for bottom-right alignment.
        cache_leftpad: int32 ``[B]`` or None: row ``b``'s cache starts at slot ``cache_leftpad[b]``
            (earlier slots hold no key; positions still count from slot 0).
        out_dtype: dtype of ``out`` (default q's; float32 for partials that are merged again).
        config: :class:`~ringflash.kernels.options.DecodeConfig` (default: ``DecodeConfig()``):
            tiles, load policy, prefetch, and whether the merge is fused.
        check_flag: an error flag (``ringflash.device_errors.error_flag``) or None: the launch
            also checks the index values (``check.py``) and ORs the failures' bits into it.

    Returns:
        ``(out [B, Sq, Hq, D] in out_dtype, lse [B, Hq, Sq] float32)``. Nothing syncs with the host
        and every buffer is sized from shapes, so the call can be captured in a CUDA graph.

    Example:
        >>> lens = torch.full((B,), S, dtype=torch.int32, device=q.device)
        >>> out, lse = decode_fwd(q, k, v, lens, softmax_scale=D**-0.5)  # k, v [B, S, Hk, D]
    """
    config = config or DecodeConfig()
    B, Sq, Hq, D = q.shape
    Hk = k_cache.shape[2]
    assert Hq % Hk == 0 and k_cache.shape[-1] == D and D <= 256
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (B,)
    if diag_offset is not None:
        assert diag_offset.dtype == torch.int32 and diag_offset.shape == (B,)
    out = torch.empty((B, Sq, Hq, D), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    fuse_append = k_new is not None and k_new.shape[1] > 0
    if fuse_append:
        assert v_new is not None and k_new.stride(-1) == 1 and v_new.stride(-1) == 1
        n_new = k_new.shape[1]
        if out.numel() == 0:  # no program runs: append on its own
            append_kv(
                k_cache,
                v_cache,
                k_new,
                v_new,
                cache_seqlens,
                block_table=block_table,
                cache_batch_idx=cache_batch_idx,
            )
    if out.numel() == 0:
        return out, lse
    grid, static, per_call, slot = split_args(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        out,
        lse,
        n_new=n_new,
        k_new=k_new,
        v_new=v_new,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        num_splits=num_splits,
        diag_offset=diag_offset,
        config=config,
        cache_leftpad=cache_leftpad,
        check_flag=check_flag,
    )
    launch_cached(_decode_split_kernel, grid, static, per_call, slot)
    if not config.fuse_combine:
        combine_partials(per_call["OP"], per_call["LSEP"], out, lse)
    return out, lse
