"""Exact merge of float32 attention partials ``(out_s, lse_s)`` over their split axis, on the device.

``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``; ``-inf`` safe (a row with no
key ends as ``out = 0``, ``lse = -inf``). ``_combine_rows`` is the merge of a tile of rows, shared by
the split-KV decode kernel (whose last program per row merges in place, see ``split.py``) and by
``_decode_combine_kernel``, the separate launch used for stacked partials (e.g. gathered from the
ranks of a sharded cache) and by the unfused decode path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..device import on_tensor_device
from ..launch_args import next_pow2, pad_dim, stride_names, strides


@triton.jit
def _combine_rows(
    OP, LSEP, O, LSE, b, hk, r0, r_end, n_splits,
    stride_opb, stride_ops, stride_oph, stride_opn, stride_lpb, stride_lps, stride_lph,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, COMBINE_M: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):  # fmt: skip
    """Merge the ``n_splits`` float32 partials of rows ``[r0, r_end)`` into ``O`` / ``LSE``.

    ``COMBINE_M`` rows x ``SPLIT_BLOCK`` splits x ``D_PAD`` are loaded at once (one round trip to
    L2 for the usual 4-row GQA group and <= 16 splits); ``.cg`` loads bypass L1, which may hold
    nothing of these addresses but is not coherent with the other programs' stores anyway.
    """
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    for rc in range(r0, r_end, COMBINE_M):
        offs_c = rc + tl.arange(0, COMBINE_M)
        c_ok = offs_c < r_end
        t = offs_c // GROUP
        h = hk * GROUP + offs_c % GROUP
        o_row = OP + b.to(tl.int64) * stride_opb + t * stride_ops + h * stride_oph
        l_row = LSEP + b.to(tl.int64) * stride_lpb + t * stride_lps + h * stride_lph
        m = tl.full([COMBINE_M], float("-inf"), tl.float32)
        tot = tl.zeros([COMBINE_M], tl.float32)
        acc = tl.zeros([COMBINE_M, D_PAD], tl.float32)
        for s0 in range(0, n_splits, SPLIT_BLOCK):
            s_ok = (s0 + offs_s) < n_splits
            cs_ok = c_ok[:, None] & s_ok[None, :]
            ls = tl.load(
                l_row[:, None] + (s0 + offs_s)[None, :], mask=cs_ok, other=float("-inf"), cache_modifier=".cg"
            )
            o = tl.load(
                o_row[:, None, None] + (s0 + offs_s)[None, :, None] * stride_opn + offs_d[None, None, :],
                mask=cs_ok[:, :, None] & d_ok[None, None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            m_new = tl.maximum(m, tl.max(ls, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp(ls - m_safe[:, None])  # exactly 0 for -inf partials
            alpha = tl.exp(m - m_safe)
            tot = tot * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        inv = tl.where(tot > 0.0, 1.0 / tot, 0.0)
        lse = tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot))  # NaN stays NaN
        o_ptrs = (
            O + b.to(tl.int64) * stride_ob + t[:, None] * stride_os + h[:, None] * stride_oh + offs_d[None, :]
        )
        tl.store(o_ptrs, (acc * inv[:, None]).to(O.dtype.element_ty), mask=c_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + t * stride_ls, lse, mask=c_ok)


@triton.jit
def _decode_combine_kernel(
    OP, LSEP, O, LSE, n_splits, seqlen_q, n_heads,
    stride_opr, stride_opn, stride_lpr, stride_lpn,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per (b, t, h) row; row r's split s sits at OP + r * stride_opr + s * stride_opn
    # (and likewise in LSEP), so both [B, Sq, H, N, D] partials and N stacked [B, Sq, H, D] fit.
    row = tl.program_id(0)
    h = row % n_heads
    t = (row // n_heads) % seqlen_q
    b = row // (n_heads * seqlen_q)
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    lse_row = LSEP + row.to(tl.int64) * stride_lpr
    op_row = OP + row.to(tl.int64) * stride_opr

    m = float("-inf")
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        ls = tl.load(lse_row + (s0 + offs_s) * stride_lpn, mask=s0 + offs_s < n_splits, other=float("-inf"))
        m = tl.maximum(m, tl.max(ls, 0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = 0.0
    acc = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, n_splits, SPLIT_BLOCK):
        s_ok = s0 + offs_s < n_splits
        ls = tl.load(lse_row + (s0 + offs_s) * stride_lpn, mask=s_ok, other=float("-inf"))
        w = tl.exp(ls - m_safe)  # exactly 0 for -inf partials
        o = tl.load(
            op_row + (s0 + offs_s)[:, None] * stride_opn + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        tot += tl.sum(w, 0)
        acc += tl.sum(o * w[:, None], 0)
    inv = tl.where(tot > 0.0, 1.0 / tot, 0.0)
    lse = tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot))  # NaN stays NaN
    o_ptrs = O + b.to(tl.int64) * stride_ob + t * stride_os + h * stride_oh + offs_d
    tl.store(o_ptrs, (acc * inv).to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh + t * stride_ls, lse)


_PART = ("stride_opr", "stride_opn", "stride_lpr", "stride_lpn")
_OUT, _LSE = stride_names("o", "bsh"), stride_names("l", "bhs")


@on_tensor_device
def combine_partials(o_part, lse_part, out, lse, split_dim=3):
    """Merge float32 partials exactly into ``out`` and ``lse`` in place; returns ``(out, lse)``.

    ``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``; ``-inf`` safe: rows
    with no key end as 0 / ``-inf``.

    Args:
        o_part, lse_part: float32 partials. ``split_dim=3``: ``o_part [B, Sq, H, N, D]``,
            ``lse_part [B, Sq, H, N]`` (the decode kernel's layout, contiguous). ``split_dim=0``:
            ``o_part [N, B, Sq, H, D]``, ``lse_part [N, B, Sq, H]`` (N stacked partials, e.g.
            gathered from N ranks; each contiguous).
        out: ``[B, Sq, H, D]``, any float dtype, last dim contiguous; written.
        lse: float32 ``[B, H, Sq]``; written.
        split_dim: 3 or 0, where the split axis is.

    Returns:
        ``(out, lse)``.
    """
    if split_dim == 0:
        N, B, Sq, H, D = o_part.shape
        rows = (o_part.stride(3), o_part.stride(0), lse_part.stride(3), lse_part.stride(0))
        assert o_part[0].is_contiguous() and lse_part[0].is_contiguous()
    else:
        B, Sq, H, N, D = o_part.shape
        rows = (o_part.stride(2), o_part.stride(3), lse_part.stride(2), lse_part.stride(3))
        assert o_part.is_contiguous() and lse_part.is_contiguous()
    assert out.stride(-1) == 1 and o_part.stride(-1) == 1
    if out.numel() == 0:
        return out, lse
    launch = {} if o_part.device.type == "cpu" else dict(num_warps=4)
    _decode_combine_kernel[(B * Sq * H,)](
        OP=o_part,
        LSEP=lse_part,
        O=out,
        LSE=lse,
        n_splits=N,
        seqlen_q=Sq,
        n_heads=H,
        **dict(zip(_PART, rows, strict=True)),
        **strides(out, _OUT),
        **strides(lse, _LSE),
        HEAD_DIM=D,
        D_PAD=pad_dim(D),
        SPLIT_BLOCK=min(16, next_pow2(N)),
        **launch,
    )
    return out, lse
