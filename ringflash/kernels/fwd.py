"""Forward flash-attention kernel: ``(q, k, v) -> (out, lse)`` with online softmax.

One program owns ``BLOCK_M`` query rows of one (sequence, query head) and streams the key blocks
of its KV head (``h // (Hq // Hk)``, so GQA/MQA never repeat K/V) in the three runs given by
``_block_ranges``: only blocks on a mask edge pay for the mask, blocks outside the band are not
visited. Scores live in base 2 (``log2(e)`` folded into the scale, ``exp2`` on the MUFU unit); the
stored LSE is the natural log, ``-inf`` for rows that see no key (their output is 0).

``ACCUMULATE`` merges the new partial into a float32 ``(out, lse)`` in the epilogue
(``lse = log(e^a + e^b)``, weights ``e^(lse_x - lse)``), which is one ring step, without a second
pass over memory. Variants (causal/window, softcap, varlen, diag offsets) are constexpr flags.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _attn_prologue, _block_ranges, _dot, _rows_desc, _run_bounds, _tanh, _tile_src, _visible
from .device import on_tensor_device
from .launch import SignatureTable, launch_cached
from .launch_args import (
    CALL_TENSORS,
    TUNE_KEY,
    attn_args,
    attn_heuristics,
    call_tensors,
    cdiv,
    stride_names,
    strides,
    two_part,
    wide_offsets,
)
from .options import AttnConfig
from .tma import tma_applies


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs, offs_m, offs_n, offs_d, offs_dv,
    start, full_start, full_end, end, seqlen_q, seqlen_k, lo, hi, qk_scale, cap_scale, cap_out,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # k_src / v_src: tensor descriptors of this sequence's K/V rows (TMA: rows past seqlen_k and
    # columns past the head dim read as 0), else pointer tiles at its first key. The three runs of
    # key blocks (masked head, mask-free middle, masked tail) in order, MASKED a constexpr of each.
    for RUN in tl.static_range(3):
        MASKED = RUN != 1
        j_start, j_end = _run_bounds(RUN, start, full_start, full_end, end)
        for j0 in range(j_start, j_end, BLOCK_N):
            offs_j = j0 + offs_n
            if TMA:
                k = k_src.load([j0, 0])
                v = v_src.load([j0, 0])
            elif MASKED:
                kv_row = offs_j[:, None] < seqlen_k
                k = tl.load(
                    k_src + j0 * stride_ks,
                    mask=kv_row & (offs_d[None, :] < HEAD_DIM),
                    other=0.0,
                )
                v = tl.load(
                    v_src + j0 * stride_vs,
                    mask=kv_row & (offs_dv[None, :] < HEAD_DIM_V),
                    other=0.0,
                )
            elif D_PAD == HEAD_DIM and DV_PAD == HEAD_DIM_V:
                k = tl.load(k_src + j0 * stride_ks)
                v = tl.load(v_src + j0 * stride_vs)
            else:
                k = tl.load(k_src + j0 * stride_ks, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_src + j0 * stride_vs, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
            s = _dot(q, tl.trans(k), None, DOT_PREC, DOT_F32)
            if SOFTCAP:
                s = _tanh(s * cap_scale) * cap_out
            else:
                s = s * qk_scale
            if MASKED:
                vis = _visible(offs_m, offs_j, seqlen_q, seqlen_k, lo, hi, HAS_LO, HAS_HI)
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row with nothing visible so far keeps m = -inf; subtract 0 instead so that
                # exp2(-inf - -inf) never makes a NaN.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_sub = m_new
            p = tl.exp2(s - m_sub[:, None])
            alpha = tl.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _dot(p.to(v.dtype), v, acc, DOT_PREC, DOT_F32)
            m_i = m_new
    return acc, l_i, m_i


# Sequence lengths and offsets vary from call to call: specialising on them (== 1, % 16) would
# only multiply compilations.
@triton.jit(
    do_not_specialize=["seqlen_q", "seqlen_k", "diag", "window_left", "window_right", "total_q", "total_k"]
)
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, DIAG_PTR, SEQ_ORDER, FLAG,
    stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd, stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, diag, window_left, window_right, n_heads_q, group,
    sm_scale, softcap, sched_width, SEQ_BUCKET, total_q, total_k,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr, TWO_PART: tl.constexpr, ORDERED: tl.constexpr,
    ACCUMULATE: tl.constexpr, WIDE: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr, KEEP_UNSEEN: tl.constexpr, CHECK_CU: tl.constexpr,
):  # fmt: skip
    # The online softmax state of BLOCK_M rows, scores in base 2.
    qk_scale = sm_scale * 1.4426950408889634
    cap_scale = 0.0
    cap_out = 0.0
    if SOFTCAP:
        cap_scale = sm_scale / softcap
        cap_out = softcap * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)

    # Causal row blocks get cheaper as the block index falls: the expensive ones start first, in
    # groups of heads, so the last wave is short (``_tile_order``).
    b, h, i0, q_start, k_start, seqlen_q, seqlen_k, lo, hi, offs_m, q_row0, rows, ks, vs = _attn_prologue(
        CU_Q, CU_K, DIAG_PTR, SEQ_ORDER, seqlen_q, seqlen_k, diag, window_left, window_right, n_heads_q,
        sched_width, stride_ks, stride_vs, FLAG, total_q, total_k, HAS_HI, IS_VARLEN, DIAG_FROM_PTR,
        TWO_PART, ORDERED, WIDE, False, CHECK_CU, BLOCK_M,
    )  # fmt: skip
    if i0 >= seqlen_q:
        return
    if KEEP_UNSEEN:
        # A sequence with no keys writes nothing into given buffers: its rows keep what they hold.
        # The ring's and the all-gather's packed calls use such spacer sequences to skip rows that
        # other calls write. Otherwise (results allocated here) its rows are stored as seeing no
        # key, so that the results need no zero fill before the launch.
        if seqlen_k == 0:
            return
    hk = h // group
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q_base = Q + b.to(tl.int64) * stride_qb + q_row0.to(tl.int64) * stride_qs + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + hk * stride_vh
    if TMA:
        # Hopper's bulk copies: one descriptor per sequence and head, whose bounds zero-fill the
        # tails (rows past the sequence, columns past the head dim) that masks cover otherwise.
        q_seq = Q + b.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + h * stride_qh
        q = _rows_desc(q_seq, seqlen_q, stride_qs, HEAD_DIM, BLOCK_M, D_PAD).load([i0, 0])
    else:
        q_mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    k_src = _tile_src(k_base, seqlen_k, stride_ks, stride_kd, offs_n, offs_d, HEAD_DIM, BLOCK_N, D_PAD, TMA)
    v_src = _tile_src(
        v_base, seqlen_k, stride_vs, stride_vd, offs_n, offs_dv, HEAD_DIM_V, BLOCK_N, DV_PAD, TMA
    )

    start, full_start, full_end, end = _block_ranges(i0, seqlen_k, lo, hi, HAS_LO, HAS_HI, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_src, v_src, ks, vs, offs_m, offs_n, offs_d, offs_dv,
        start, full_start, full_end, end, seqlen_q, seqlen_k, lo, hi, qk_scale, cap_scale, cap_out,
        HAS_LO, HAS_HI, SOFTCAP, HEAD_DIM, HEAD_DIM_V, D_PAD, DV_PAD, DOT_PREC, DOT_F32, TMA, BLOCK_N,
    )  # fmt: skip

    # No key: l == 0. A NaN in the inputs makes l NaN, and its LSE stays NaN, so that every merge
    # of this partial carries the NaN instead of weighing the partial as empty.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    o = acc / l_safe[:, None]
    # m_i is in log2 units; the LSE is stored as a natural log.
    lse = tl.where(no_key, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)

    row_ok = offs_m < seqlen_q
    o_ptrs = (
        O
        + b.to(tl.int64) * stride_ob
        + q_row0.to(tl.int64) * stride_os
        + h * stride_oh
        + rows[:, None] * stride_os
        + offs_dv[None, :] * stride_od
    )
    l_ptrs = LSE + b.to(tl.int64) * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if ACCUMULATE:
        lse_old = tl.load(l_ptrs, mask=row_ok, other=float("-inf"))
        o_old = tl.load(o_ptrs, mask=o_mask, other=0.0)
        mx = tl.maximum(lse_old, lse)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w_old = tl.exp(lse_old - mx)
        w_new = tl.exp(lse - mx)
        tot = w_old + w_new
        inv = tl.where(tot > 0.0, 1.0 / tot, 0.0)
        o = o_old * (w_old * inv)[:, None] + o * (w_new * inv)[:, None]
        lse = mx + tl.log(tot)
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=o_mask)
    tl.store(l_ptrs, lse, mask=row_ok)


def _fwd_configs():
    # Hopper: 128-row Q tiles (two warpgroups' worth of wgmma rows with 8 warps); 64 for head dim 256,
    # whose K/V tiles would not fit shared memory twice over otherwise.
    shapes = [
        (128, 64, 4, 3),
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 2),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


def _prune_fwd(configs, named_args, **kwargs):
    """Keep the configs whose tiles fit Hopper's shared memory (~227 KB) at the inputs' element
    size, with 128-row query tiles below head dim 256 and 64 from it; where no tile of that height
    fits (float32 inputs at head dim 128), the other height's that fit."""
    a = {**named_args, **kwargs}  # constexpr flags arrive in kwargs (triton 3.6)
    d = max(a["D_PAD"], a["DV_PAD"])
    size = a["Q"].element_size()
    fits = []
    for c in configs:
        bm, bn, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
        if size * (bm * d + 2 * bn * d * st) <= 200 * 1024:  # Q once, K and V per pipeline stage
            fits.append(c)
    return [c for c in fits if (c.kwargs["BLOCK_M"] == 64) == (d >= 256)] or fits or configs[-1:]


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(),
    key=[*TUNE_KEY, "ACCUMULATE"],
    prune_configs_by={"early_config_prune": _prune_fwd},
    # Accumulate mode updates out/lse in place: benchmarking a config must not merge twice.
    restore_value=["O", "LSE"],
)(_attn_fwd_kernel)
_fwd_gpu = attn_heuristics(_attn_fwd_tuned)
_fwd_cpu = attn_heuristics(_attn_fwd_kernel)

# The interpreter (CPU tensors) runs one small fixed tile shape: autotuning there would only cost
# time, and blocks smaller than the test sequences exercise every masked/unmasked run.
_CPU_FWD = {"BLOCK_M": 32, "BLOCK_N": 16}
_O, _LSE = stride_names("o", "bshd"), stride_names("l", "bhs")


# Launch arguments by call signature (shapes, strides, dtypes, device, mask, options): ``attn_args``
# runs once per signature and a call binds only its tensors.
_FWD_LAUNCHES = SignatureTable()
# What a call binds anew (``call_tensors``, then the results and the TMA flag).
_PER_CALL = frozenset((*CALL_TENSORS, "O", "LSE", "TMA"))


def _launch_key(q, k, v, out, lse, mask, cu_q, max_q, max_k, diag, buffers, config, ordered=False):
    """The signature of a forward launch, or None when its arguments come from tensor values
    (packed lengths not given) or a padded call's diagonal is not an int. ``buffers``: (accumulate,
    out and lse given, ``cu_seqlens`` bounded, bounds reported); ``ordered``: a packed call's
    ``seq_order`` given."""
    packed = cu_q is not None
    if packed:
        if max_q is None or max_k is None:
            return None
        diag_key = "two-part" if two_part(diag) else diag is None
        lens = (cu_q.shape[0], int(max_q), int(max_k), ordered)
    else:
        if diag is not None and not isinstance(diag, int):
            return None
        diag_key, lens = diag, None
    scale, causal, window, softcap = mask
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
        out.dtype, out.stride(), lse.stride(), float(scale), bool(causal), tuple(window),
        float(softcap), lens, diag_key, buffers, config,
    )  # fmt: skip


@on_tensor_device
def attn_fwd(
    q,
    k,
    v,
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
    out=None,
    lse=None,
    merge=True,
    config=None,
    bound_cu=False,
    flag=None,
    seq_order=None,
):
    """Forward attention returning ``(out, lse)``; the interface of ``ringflash.blockwise.attn_fwd``.

    Args:
        q: ``[B, Sq, Hq, D]``, or packed ``[Tq, Hq, D]`` with ``cu_seqlens_q``.
        k, v: ``[B, Sk, Hk, D]`` / ``[B, Sk, Hk, Dv]`` (packed: ``[Tk, Hk, D(v)]``); ``Hq % Hk ==
            0``, ``D, Dv <= 256``.
        softmax_scale: the score scale.
        causal, window_size, softcap: the mask (bottom-right aligned, or at ``diag_offset``) and
            the score cap (``softcap * tanh(s / softcap)``; 0 for none).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` sequence starts of packed inputs, or None.
        max_seqlen_q, max_seqlen_k: the longest packed sequences (computed when None).
        diag_offset: key index aligned with query 0 (an int; per sequence for packed inputs), or
            None for bottom-right alignment.
        out, lse: buffers shaped like the result: the result is merged into them in place
            (accumulate mode, float32 ``out``) or, with ``merge=False``, written over them (``out``
            float32 or q's dtype); rows of a packed batch outside every sequence, or in a
            sequence with no keys, are left as they are. They are returned.
        config: :class:`~ringflash.kernels.options.AttnConfig` (default: ``AttnConfig()``).
        bound_cu: packed ``cu_seqlens`` not trusted: each program clamps its sequence's bounds to
            the tensors' rows (valid values are unchanged), and with ``flag`` (the device's error
            flag, ``ringflash.device_errors``) one program per sequence reports its failed checks
            there, as ``bounded_cu`` of ``ringflash.checks`` does; no extra launch.
        seq_order: packed calls only: int32 ``[2, B]`` on the device, each row a permutation of
            the sequences (row 0 read here, row 1 by the dK/dV kernel): the order in which the
            programs take them, heaviest first from a caller that knows the lengths (the parallel
            plans), so that the longest programs start early. It changes no result.

    Returns:
        ``(out, lse)``: out ``[B, Sq, Hq, Dv]`` (packed ``[Tq, Hq, Dv]``) in q's dtype (float32 in
        accumulate mode), lse float32 ``[B, Hq, Sq]`` (packed ``[Hq, Tq]``), natural log; ``-inf``
        and output 0 for rows that see no key.
    """
    config = config or AttnConfig()
    packed = cu_seqlens_q is not None
    given = out is not None
    accumulate = given and merge
    Hq = q.shape[-2]
    if not given:
        # The kernel writes every row of every sequence, those that see no key included (packed
        # rows outside every sequence exist only for a cu_seqlens that fails its checks).
        out_shape, lse_shape = _result_shapes(q, v, packed)
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    else:
        writable = (torch.float32,) if accumulate else (torch.float32, q.dtype)
        assert lse.dtype == torch.float32 and out.dtype in writable
    mask = (softmax_scale, causal, window_size, softcap)
    buffers = (accumulate, given, bound_cu, flag is not None)
    key = _launch_key(
        q, k, v, out, lse, mask, cu_seqlens_q, max_seqlen_q, max_seqlen_k, diag_offset, buffers, config,
        seq_order is not None,
    )  # fmt: skip
    entry = _FWD_LAUNCHES.get(key) if key is not None else None
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
            **strides(out, _O, packed),
            **strides(lse, _LSE, packed),
            n_heads_q=Hq,
            ACCUMULATE=accumulate,
            KEEP_UNSEEN=given,
            WIDE=config.int64_offsets or wide_offsets(q, k, v, out),
        )
        static = {n: a for n, a in args.items() if n not in _PER_CALL}
        slot = _FWD_LAUNCHES.keep(key, (static, B, Sq, Sk, {}))[4] if key is not None else None
        per_call = {n: args[n] for n in CALL_TENSORS}
    else:
        static, B, Sq, Sk, slot = entry
        per_call = call_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, diag_offset, B, seq_order)
    if B == 0 or Sq == 0 or q.numel() == 0:
        if not accumulate:  # nothing launches: the empty buffers must still read as "no key"
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    per_call.update(O=out, LSE=lse, TMA=tma_applies(q, k, v, seqlen=max(Sq, Sk)))
    _launch(q, static, per_call, slot, B, Sq, Hq)
    return out, lse


def _result_shapes(q, v, packed: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of a forward's ``out`` (q's, with v's head dim) and ``lse`` (``[Hq, Tq]`` packed,
    ``[B, Hq, Sq]`` padded)."""
    Hq = q.shape[-2]
    lse_shape = (Hq, q.shape[0]) if packed else (q.shape[0], Hq, q.shape[1])
    return q.shape[:-1] + (v.shape[-1],), lse_shape


def _launch(q, static, per_call, slot, B, Sq, Hq) -> None:
    if q.device.type == "cpu":
        _fwd_cpu[(cdiv(Sq, _CPU_FWD["BLOCK_M"]) * B * Hq,)](**static, **per_call, **_CPU_FWD)
    else:
        launch_cached(_fwd_gpu, _gpu_grid(B, Sq, Hq), static, per_call, slot)


def _gpu_grid(B: int, Sq: int, Hq: int):
    return lambda meta: (cdiv(Sq, meta["BLOCK_M"]) * B * Hq,)
