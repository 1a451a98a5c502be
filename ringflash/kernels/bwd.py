"""Backward flash-attention kernels: ``delta = rowsum(dout * out)``, then dK/dV, then dQ.

Probabilities are recomputed from the saved LSE, ``p = exp(s - lse)``, so nothing of size
``Sq x Sk`` is stored. dK/dV programs own ``BLOCK_N`` keys of one KV head and loop over the query
heads of its group (GQA without repeated K/V and without atomics); dQ programs own ``BLOCK_M``
rows of one query head. Both visit only the blocks inside the mask band (``_block_ranges``), so
the two kernels never race and the result is deterministic. With the ``ADD`` flag the float32
gradients are added into the given buffers (ring steps); otherwise they are written in the input
dtype. Rows that saw no key (``lse = -inf``) use ``lse = +inf``: their p, dS and gradients are 0.

Gradient of a softcapped score ``s = c * tanh(x * scale / c)`` is ``scale * (1 - tanh^2)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bwd_dkdv import _attn_bwd_dkdv_kernel
from .bwd_dq import _attn_bwd_dq_kernel
from .device import beside, on_tensor_device, sm_count
from .fwd import _launch_key
from .launch import SignatureTable, launch_cached
from .launch_args import (
    CALL_TENSORS,
    TUNE_KEY,
    attn_args,
    attn_heuristics,
    call_tensors,
    cdiv,
    pad_dim,
    stride_names,
    strides,
    wide_offsets,
)
from .options import AttnConfig
from .tma import tma_applies


@triton.jit
def _delta_kernel(
    DO, O, DELTA,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    seqlen, n_heads,
    HEAD_DIM_V: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    i0 = tl.program_id(0) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = i0 + rows
    offs_d = tl.arange(0, DV_PAD)
    mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM_V)
    do = tl.load(
        DO
        + b.to(tl.int64) * stride_db
        + i0.to(tl.int64) * stride_ds  # 64-bit tile base (see fwd.py)
        + h * stride_dh
        + rows[:, None] * stride_ds
        + offs_d[None, :] * stride_dd,
        mask=mask,
        other=0.0,
    )
    o = tl.load(
        O
        + b.to(tl.int64) * stride_ob
        + i0.to(tl.int64) * stride_os
        + h * stride_oh
        + rows[:, None] * stride_os
        + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(
        DELTA + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m * stride_ls, delta, mask=offs_m < seqlen
    )


# Tile configs (BLOCK_M, BLOCK_N, warps, stages) per head-dim class, from timing every config of each
# kernel alone on an H100 (docs/performance.md, "Backward tile tables"). At head dims 64 and 128 the
# dK/dV kernel is fastest with 64 resident k/v rows and 4 warps for non-causal masks; causal masks
# favour 128 streamed rows (head dim 64) or 8 warps over 128 resident rows (head dim 128, long
# sequences). (BLOCK_M 64, BLOCK_N 128, 8 warps, 2 stages) is left out of the dK/dV lists: on an H100
# with triton 3.6 it raised "misaligned address" at head dim 128 (not root-caused; see
# docs/performance.md).
_DKDV_TILES = {
    256: [(32, 64, 4, 2)],  # head dims above 128 (padded to 256): the resident tile and two stages fit
    64: [(32, 64, 4, 4), (128, 64, 4, 2), (32, 128, 4, 3), (32, 128, 4, 4), (64, 128, 8, 3), (32, 64, 4, 2)],
    128: [(32, 64, 4, 4), (32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 5), (64, 128, 8, 3)],
}
_DQ_TILES = {
    256: [(64, 32, 4, 2)],
    64: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3), (128, 32, 4, 3)],
}


def _configs(tiles):
    """One triton.Config per distinct tile of every head-dim class (the prune picks per call)."""
    shapes = list(dict.fromkeys(t for group in tiles.values() for t in group))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _shape(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _prune(table):
    """Keep the configs listed for the call's padded head dim (<= 64, <= 128, <= 256). A list that
    matches none (a caller that narrowed ``configs``) keeps the last config given."""

    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}  # constexpr flags arrive in kwargs (triton 3.6)
        d = max(a["D_PAD"], a["DV_PAD"])
        wanted = set(table[64 if d <= 64 else 128 if d <= 128 else 256])
        return [c for c in configs if _shape(c) in wanted] or configs[-1:]

    return prune


_KEY = [*TUNE_KEY, "ADD"]
_dkdv_tuned = triton.autotune(
    configs=_configs(_DKDV_TILES),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune(_DKDV_TILES)},
    restore_value=["DK", "DV"],  # ADD mode accumulates in place
)(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(
    configs=_configs(_DQ_TILES),
    key=_KEY,
    prune_configs_by={"early_config_prune": _prune(_DQ_TILES)},
    restore_value=["DQ"],
)(_attn_bwd_dq_kernel)
_dkdv_gpu, _dq_gpu = attn_heuristics(_dkdv_tuned), attn_heuristics(_dq_tuned)
_dkdv_cpu, _dq_cpu = attn_heuristics(_attn_bwd_dkdv_kernel), attn_heuristics(_attn_bwd_dq_kernel)
# Interpreter tiles: small, and different in the two directions so both edge runs are exercised.
_CPU_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32}
_CPU_DQ = {"BLOCK_M": 32, "BLOCK_N": 16}


_DO, _OUT, _DELTA = stride_names("d", "bshd"), stride_names("o", "bshd"), stride_names("l", "bhs")


@on_tensor_device
def attn_bwd_delta(dout: torch.Tensor, out: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """``rowsum(dout * out)`` in float32, laid out like the LSE.

    Args:
        dout, out: ``[B, S, H, Dv]``, or packed ``[T, H, Dv]``.
        packed: whether the inputs are packed.

    Returns:
        delta: float32 ``[B, H, S]`` (packed: ``[H, T]``).
    """
    if packed:
        T, H, Dv = out.shape
        B, S = 1, T
        delta = torch.empty((H, T), dtype=torch.float32, device=out.device)
    else:
        B, S, H, Dv = out.shape
        delta = torch.empty((B, H, S), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    block = 64 if out.device.type != "cpu" else 32
    _delta_kernel[(cdiv(S, block), B * H)](
        DO=dout,
        O=out,
        DELTA=delta,
        **strides(dout, _DO, packed),
        **strides(out, _OUT, packed),
        **strides(delta, _DELTA, packed),
        seqlen=S,
        n_heads=H,
        HEAD_DIM_V=Dv,
        DV_PAD=pad_dim(Dv),
        BLOCK_M=block,
    )
    return delta


_DOUT, _DQ = stride_names("do", "bshd"), stride_names("dq", "bshd")
_DK, _DV = stride_names("dk", "bshd"), stride_names("dv", "bshd")
_LSE, _DELTA_E = stride_names("l", "bhs"), stride_names("e", "bhs")
# The derived arguments of a backward launch per call signature, as the forward keeps its own.
_BWD_LAUNCHES = SignatureTable()
_PER_CALL = frozenset((*CALL_TENSORS, "DO", "LSE", "DELTA", "DQ", "DK", "DV", "DK_ROWS", "DV_ROWS", "TMA"))


@on_tensor_device
def attn_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    diag_offset=None,
    delta=None,
    dq=None,
    dk=None,
    dv=None,
    accumulate=(True, True),
    config=None,
    bound_cu=False,
    flag=None,
    seq_order=None,
    dkv_rows=None,
):
    """Backward of ``attn_fwd`` from the final ``(out, lse)``; returns ``(dq, dk, dv)``.

    The interface of ``ringflash.blockwise.attn_bwd``.

    Args:
        dout: ``[B, Sq, Hq, Dv]`` (packed ``[Tq, Hq, Dv]``), the gradient of ``out``.
        q, k, v, softmax_scale, causal, window_size, softcap, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, diag_offset, seq_order: as given to ``attn_fwd`` (the dK/dV
            kernel takes ``seq_order``'s row 1, the dQ kernel its row 0).
        out, lse: ``attn_fwd``'s results (lse float32 ``[B, Hq, Sq]``, packed ``[Hq, Tq]``).
        delta: ``rowsum(dout * out)`` laid out like ``lse`` (:func:`attn_bwd_delta`; computed when
            None).
        dq, dk, dv: buffers shaped like q/k/v, returned; None: new tensors in the inputs' dtypes.
        accumulate: for given buffers, whether the gradients are added into ``dq`` (first) and
            into ``dk``/``dv`` (second), which must then be float32, or written there in the
            buffers' dtype. Either way rows of a packed call's sequences with no keys (dQ) or no
            queries (dK/dV) are left as they are.
        config: :class:`~ringflash.kernels.options.AttnConfig` (default: ``AttnConfig()``).
        bound_cu: packed ``cu_seqlens`` not trusted: each program clamps its sequence's bounds to
            the tensors' rows (valid values are unchanged), and with ``flag`` (the device's error
            flag, ``ringflash.device_errors``) one program per sequence reports its failed checks
            there, as ``bounded_cu`` of ``ringflash.checks`` does; no extra launch.
        dkv_rows: packed calls with given buffers: ``(dk_rows, dv_rows)``, int64 ``[Tk]`` each,
            the row of ``dk`` and of ``dv`` where each key row's gradient goes (the buffers'
            first dim is then free: ``dk`` and ``dv`` may be one tensor); None: key row ``i``'s go
            to row ``i``.

    Returns:
        ``(dq, dk, dv)`` shaped like ``(q, k, v)``.
    """
    config = config or AttnConfig()
    packed = cu_seqlens_q is not None
    given = dq is not None
    add_q, add_kv = accumulate if given else (False, False)
    Hq, Hk = q.shape[-2], k.shape[-2]
    if delta is None:
        delta = attn_bwd_delta(dout, out, packed=packed)
    if given:
        assert dq.dtype == torch.float32 or not add_q
        assert dk.dtype == dv.dtype == torch.float32 or not add_kv
    else:
        # The kernels write every row of every sequence, those whose gradient is zero included.
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    mask = (softmax_scale, causal, window_size, softcap)
    buffers = (add_q, add_kv, given, bound_cu, flag is not None)
    key = _launch_key(
        q, k, v, dq, lse, mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, diag_offset, buffers, config,
        seq_order is not None,
    )  # fmt: skip
    mapped = dkv_rows is not None
    assert not mapped or (packed and given), "dkv_rows: packed calls with given buffers"
    if key is not None:
        key += (dout.stride(), delta.stride(), dk.dtype, dk.stride(), dv.dtype, dv.stride(), mapped)
    entry = _BWD_LAUNCHES.get(key) if key is not None else None
    if entry is None:
        args, B, Sq, Sk = attn_args(
            q,
            k,
            v,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            diag_offset=diag_offset,
            config=config,
            bound_cu=bound_cu,
            flag=flag,
            seq_order=seq_order,
        )
        args.update(
            **strides(dout, _DOUT, packed),
            **strides(lse, _LSE, packed),
            **strides(delta, _DELTA_E, packed),
            WIDE=config.int64_offsets or wide_offsets(q, k, v, dout, dq, dk, dv),
            KEEP_UNSEEN=given,
        )
        static_kv = dict(
            args,
            **strides(dk, _DK, packed),
            **strides(dv, _DV, packed),
            n_heads_k=Hk,
            ADD=add_kv,
            MAPPED=mapped,
        )
        static_q = dict(args, **strides(dq, _DQ, packed), n_heads_q=Hq, ADD=add_q)
        static_kv = {n: a for n, a in static_kv.items() if n not in _PER_CALL}
        static_q = {n: a for n, a in static_q.items() if n not in _PER_CALL}
        slots = (None, None)  # no signature: Triton launches every time
        if key is not None:
            slots = _BWD_LAUNCHES.keep(key, (static_kv, static_q, B, Sq, Sk, ({}, {})))[5]
        per_call = {n: args[n] for n in CALL_TENSORS}
    else:
        static_kv, static_q, B, Sq, Sk, slots = entry
        per_call = call_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, diag_offset, B, seq_order)
    if B == 0 or Sq == 0 or Sk == 0 or q.numel() == 0 or k.numel() == 0:
        if not given:
            dq.zero_(), dk.zero_(), dv.zero_()
        elif not packed:  # every row sees nothing: a written gradient is zero
            for x in ([] if add_q else [dq]) + ([] if add_kv else [dk, dv]):
                x.zero_()
        return dq, dk, dv
    tma = tma_applies(q, k, v, dout, seqlen=max(Sq, Sk), backward=True)
    per_call.update(DO=dout, LSE=lse, DELTA=delta, TMA=tma)
    dk_rows, dv_rows = dkv_rows if mapped else (None, None)
    dkdv_call = dict(per_call, DK=dk, DV=dv, DK_ROWS=dk_rows, DV_ROWS=dv_rows)
    dq_call = dict(per_call, DQ=dq)
    if q.device.type == "cpu":
        _dkdv_cpu[(cdiv(Sk, _CPU_DKDV["BLOCK_N"]) * B * Hk,)](**static_kv, **dkdv_call, **_CPU_DKDV)
        _dq_cpu[(cdiv(Sq, _CPU_DQ["BLOCK_M"]) * B * Hq,)](**static_q, **dq_call, **_CPU_DQ)
        return dq, dk, dv
    with beside(q.device, "dq", _dq_beside(cdiv(Sk, 128) * B * Hk, q.device, config)) as dq_stream:
        launch_cached(_dkdv_gpu, lambda m: (cdiv(Sk, m["BLOCK_N"]) * B * Hk,), static_kv, dkdv_call, slots[0])
        with dq_stream:
            launch_cached(_dq_gpu, lambda m: (cdiv(Sq, m["BLOCK_M"]) * B * Hq,), static_q, dq_call, slots[1])
    return dq, dk, dv


# dK/dV and dQ write different tensors, so dQ can run on a second stream beside dK/dV: dQ's
# programs fill the SMs that dK/dV's last wave leaves idle (launched second, they start as SMs free
# up). That pays while dK/dV's launch is a few waves (``AttnConfig.concurrent_dq_max_waves``); in
# longer launches the last wave is a small part and the two kernels contend for L2 instead
# (docs/performance.md).
def _dq_beside(dkdv_programs: int, device: torch.device, config: AttnConfig) -> bool:
    return config.concurrent_dq and dkdv_programs <= config.concurrent_dq_max_waves * sm_count(device)
