"""Whole dense calls of the blockwise backend through PyTorch's fused CPU flash-attention kernels.

A dense call (one padded batch, or one packed sequence) whose row ``i`` sees every key ``j <= i +
hi`` (no mask, or a causal band at any diagonal, a right window included), with no left window
and no softcap, splits into at most two parts that those kernels compute exactly: the keys that
every row sees (no mask), and the diagonal square (their top-left causal mask), merged by LSE.
The forward takes ``_scaled_dot_product_flash_attention_for_cpu`` and the backward
``_scaled_dot_product_flash_attention_for_cpu_backward``, one call per part over every head, so
a plain causal call costs what SDPA's own CPU call does, where the tiles of ``blockwise`` pay
Python and merges per tile.

The backward kernel takes ``rowsum(dout * out)`` from the ``out`` it is given, where a call here
has ``delta``, which may include the LSE's gradient: when it does, every head dim gets one more
column, zero in q, k, v and ``out``, one in ``dout`` and ``delta`` in ``out``'s, so the kernel's
row sum is exactly ``delta`` while the scores and ``dout @ v^T`` are unchanged. The masked entries
of both kernels are filled, never added to, so a key that a row cannot see never reaches it;
inputs that are not all finite take the tiles, whose explicit products carry a NaN to exactly the
rows that see it.
"""

from __future__ import annotations

import math

import torch

from .merge import merge_rows_

__all__ = ["fused_bwd", "fused_cpu_op", "fused_fwd", "usable"]


def fused_cpu_op():
    """PyTorch's fused CPU flash-attention kernel, which returns the LSE too (None if absent)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _bwd_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def usable(lo: float, softcap: float, *tensors: torch.Tensor) -> bool:
    """Whether a dense call with these bounds (``masking.diag_bounds``) and tensors runs here: CPU
    tensors, PyTorch's fused CPU kernels present, no left bound, no softcap, one head dim for q, k,
    v (and dout), and every entry finite."""
    if lo != -math.inf or softcap != 0 or fused_cpu_op() is None or _bwd_op() is None:
        return False
    if any(t.device.type != "cpu" or t.shape[-1] != tensors[0].shape[-1] for t in tensors):
        return False
    # A NaN or an infinity anywhere makes the sum one (finite values that overflow it only send the
    # call to the tiles): one pass, where ``isfinite(t).all()`` writes a mask first.
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in tensors)


def _parts(hi: float, sq: int, sk: int) -> list[tuple[int, int, int, bool]]:
    """``(row0, key0, key1, causal)`` of each part of a call whose row ``i`` sees keys ``j <= i +
    hi`` (``hi`` inf: all): rows ``[row0, sq)`` against keys ``[key0, key1)``, under the kernels'
    top-left causal mask (row ``r`` of the part sees its keys ``c <= r``) or none. Rows before
    ``row0`` of every part see no key."""
    if hi == math.inf:
        return [(0, 0, sk, False)]
    h = int(hi)
    parts = []
    if h > 0:  # keys 0 .. h-1: every row sees them
        parts.append((0, 0, min(h, sk), False))
    if h < sk:  # keys from max(h, 0): row i sees key max(h, 0) + c for c <= i - max(-h, 0)
        if h >= 0:
            parts.append((0, h, sk, True))
        elif -h < sq:
            parts.append((-h, 0, sk, True))
    return parts


def _heads(x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``[B, S, H, D]`` -> float32 ``[B, H, S, width]``: a view when ``width`` is None, else a copy
    whose columns past ``D`` are zeros."""
    x = x.float().transpose(1, 2)
    if width is None:
        return x
    y = x.new_empty(*x.shape[:-1], width)
    y[..., : x.shape[-1]] = x
    y[..., x.shape[-1] :] = 0.0
    return y


def _fold(x: torch.Tensor, hk: int) -> torch.Tensor:
    """``[B, Hq, R, ...]`` -> ``[B, Hk, G * R, ...]``: each KV head's query heads as one run of rows
    (for a part whose rows all see the same keys, where one call then takes K and V unrepeated)."""
    return x.reshape(x.shape[0], hk, -1, *x.shape[3:])


def _unfold(x: torch.Tensor, hq: int) -> torch.Tensor:
    """The inverse of ``_fold``: ``[B, Hk, G * R, ...]`` -> ``[B, Hq, R, ...]``."""
    return x.reshape(x.shape[0], hq, -1, *x.shape[3:])


def fused_fwd(q, k, v, scale: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Sq, Hq, D], lse [B, Hq, Sq])`` float32 of ``q [B, Sq, Hq, D]`` over ``k, v
    [B, Sk, Hk, D]`` where row ``i`` sees keys ``j <= i + hi`` (``usable`` holds).

    Under GQA a part without a mask takes each KV head's query heads as rows of one call
    (``_fold``); a causal part repeats its keys for the query heads (a decoding step's square is
    its few new keys)."""
    op = fused_cpu_op()
    sq, hq, sk, hk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    g = hq // hk
    qh, kh, vh = _heads(q), _heads(k), _heads(v)
    results = []
    for row0, key0, key1, causal in _parts(hi, sq, sk):
        ks, vs = kh[:, :, key0:key1], vh[:, :, key0:key1]
        if causal and g > 1:
            o, m = op(
                qh[:, :, row0:],
                ks.repeat_interleave(g, 1),
                vs.repeat_interleave(g, 1),
                0.0,
                True,
                scale=scale,
            )
        else:
            o, m = op(_fold(qh[:, :, row0:], hk), ks, vs, 0.0, causal, scale=scale)
            o, m = _unfold(o, hq), _unfold(m, hq)
        results.append((row0, o, m))
    if len(results) == 1 and results[0][0] == 0:  # one part over every row: its result as it is
        return results[0][1].transpose(1, 2), results[0][2]
    out = qh.new_zeros(qh.shape)
    lse = qh.new_full(qh.shape[:-1], -math.inf)
    for row0, o, m in results:
        merge_rows_(out[:, :, row0:], lse[:, :, row0:].unsqueeze(-1), o, m.unsqueeze(-1))
    return out.transpose(1, 2), lse


def fused_bwd(do, q, k, v, out, lse, delta, scale: float, hi: float, dq, dk, dv) -> None:
    """Add the gradients of ``fused_fwd``'s call into float32 ``dq [B, Sq, Hq, D]`` and ``dk``,
    ``dv [B, Sk, Hk, D]``, recomputed from the saved ``lse`` and ``delta`` (``[B, Hq, Sq]``: the
    final forward's LSE, and ``rowsum(dout * out)`` less the LSE's gradient). ``out``: the final
    forward's output when ``delta`` is exactly its row sums with ``do`` (no LSE gradient): the
    kernel then takes the tensors as they are; None otherwise, and the kernel takes them with the
    column that carries ``delta``. GQA as in ``fused_fwd``."""
    op = _bwd_op()
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    if out is not None:
        qp, dop, outp, kp, vp = _heads(q), _heads(do), _heads(out), _heads(k), _heads(v)
    else:
        w = d + 1
        qp, dop, kp, vp = _heads(q, w), _heads(do, w), _heads(k, w), _heads(v, w)
        dop[..., d] = 1.0
        outp = torch.zeros_like(dop)
        outp[..., d] = delta
    # A row that saw no key has lse = -inf; +inf makes its probabilities exactly 0.
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse.float())
    for row0, key0, key1, causal in _parts(hi, sq, sk):
        ks, vs = kp[:, :, key0:key1], vp[:, :, key0:key1]
        rows = (dop[:, :, row0:], qp[:, :, row0:])
        outs, lses = outp[:, :, row0:], lse[:, :, row0:]
        if causal and g > 1:
            ks, vs = ks.repeat_interleave(g, 1), vs.repeat_interleave(g, 1)
            gq, gk, gv = op(*rows, ks, vs, outs, lses, 0.0, True, scale=scale)
            gk, gv = (x.unflatten(1, (hk, g)).sum(2) for x in (gk, gv))
        else:
            rows = tuple(_fold(x, hk) for x in rows)
            gq, gk, gv = op(*rows, ks, vs, _fold(outs, hk), _fold(lses, hk), 0.0, causal, scale=scale)
            gq = _unfold(gq, hq)
        dq[:, row0:] += gq[..., :d].transpose(1, 2)
        dk[:, key0:key1] += gk[..., :d].transpose(1, 2)
        dv[:, key0:key1] += gv[..., :d].transpose(1, 2)
