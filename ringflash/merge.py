"""Exact merging of attention partials by log-sum-exp.

For one query row with partials ``(o_a, lse_a)`` over key set A and ``(o_b, lse_b)`` over a
disjoint set B::

    lse = log(exp(lse_a) + exp(lse_b))
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

A partial with ``lse = -inf`` saw no key and carries no weight; when every partial of a row is
``-inf`` the merged row is ``lse = -inf``, output 0, never NaN. Arithmetic is float32.

Layouts: ``out [B, S, H, D]`` with ``lse [B, H, S]``, or packed ``out [T, H, D]`` with ``lse [H, T]``.
"""

from __future__ import annotations

import math

import torch


def _lse_as_out(lse: torch.Tensor) -> torch.Tensor:
    """View an LSE laid out ``[..., H, S]`` so it broadcasts against an output ``[..., S, H, D]``."""
    return lse.transpose(-1, -2).unsqueeze(-1)


def _check_pair(out: torch.Tensor, lse: torch.Tensor, name: str) -> None:
    if out.dim() not in (3, 4) or lse.dim() != out.dim() - 1:
        raise ValueError(
            f"{name}: expected out [B, S, H, D] with lse [B, H, S] or out [T, H, D] with lse [H, T], "
            f"got out {tuple(out.shape)} and lse {tuple(lse.shape)}"
        )
    if tuple(lse.transpose(-1, -2).shape) != tuple(out.shape[:-1]):
        raise ValueError(f"{name}: lse shape {tuple(lse.shape)} does not match out shape {tuple(out.shape)}")


def merge_attn_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention partials over disjoint key sets into the exact joint result.

    Args:
        out_a, out_b: ``[B, S, H, D]`` (or packed ``[T, H, D]``), each normalised over its own keys.
        lse_a, lse_b: ``[B, H, S]`` (or ``[H, T]``), natural-log sum of exp of each set's scores.

    Returns:
        ``(out, lse)``: ``out`` in ``out_a``'s dtype, ``lse`` float32.

    Example:
        >>> out, lse = merge_attn_states(o1, lse1, o2, lse2)
    """
    _check_pair(out_a, lse_a, "out_a/lse_a")
    _check_pair(out_b, lse_b, "out_b/lse_b")
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"partials differ in shape: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    out = torch.empty(out_a.shape, dtype=torch.float32, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=lse_a.device)
    out.copy_(out_a)
    lse.copy_(lse_a)
    merge_into_(out, lse, out_b, lse_b)
    return out.to(out_a.dtype), lse


def merge_into_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge the partial ``(out_b, lse_b)`` into the float32 running state ``(out, lse)`` in place."""
    merge_rows_(out, _lse_as_out(lse), out_b, _lse_as_out(lse_b.float()))


def merge_rows_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """The merge for an LSE already laid out like the output's rows (``[..., rows, 1]`` against
    ``[..., rows, D]``); ``out`` and ``lse`` (float32, possibly views) are updated in place."""
    m = torch.maximum(lse, lse_b)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa = torch.exp(lse - m)
    wb = torch.exp(lse_b - m)
    s = wa + wb
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    out.mul_(wa * inv).add_(out_b.float() * (wb * inv))
    lse.copy_(m + torch.log(s))


def combine_attn_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``N`` partials stacked along dim 0 (KV splits, ranks) into the exact result.

    Args:
        outs: ``[N, B, S, H, D]`` (or ``[N, T, H, D]``).
        lses: ``[N, B, H, S]`` (or ``[N, H, T]``).

    Returns:
        ``(out, lse)``: ``out`` in ``outs``' dtype without the leading dim, ``lse`` float32
        (with ``N = 0``, attention over no key: zeros and ``-inf``).

    Example:
        >>> out, lse = combine_attn_partials(torch.stack([o1, o2, o3]), torch.stack([l1, l2, l3]))
    """
    if outs.dim() < 4 or lses.dim() != outs.dim() - 1 or outs.shape[0] != lses.shape[0]:
        raise ValueError(
            "expected outs [N, B, S, H, D] / [N, T, H, D] and lses [N, B, H, S] / [N, H, T], "
            f"got {tuple(outs.shape)} and {tuple(lses.shape)}"
        )
    if outs.shape[0] == 0:  # no partial: attention over no key
        _check_pair(outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:]), "outs/lses")
        return outs.new_zeros(outs.shape[1:]), torch.full(lses.shape[1:], -math.inf, device=lses.device)
    _check_pair(outs[0], lses[0], "outs/lses")
    lses32 = lses.float()
    m = lses32.amax(dim=0)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w = torch.exp(lses32 - m)
    s = w.sum(dim=0)
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    out = (outs.float() * _lse_as_out(w * inv)).sum(dim=0)
    return out.to(outs.dtype), m + torch.log(s)


def _sink_like(sink: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``sink [H]`` laid out to broadcast against ``lse [B, H, S]`` or ``[H, T]``."""
    return sink.float().view(-1, 1) if lse.dim() == 2 else sink.float().view(1, -1, 1)


class _SinkMerge(torch.autograd.Function):
    """``(out, lse)`` with a value-less partial of LSE ``sink[h]`` merged in: every row's softmax
    denominator gains ``exp(sink[h])``. Exact gradients for ``out``, ``lse`` and ``sink``."""

    @staticmethod
    def forward(ctx, out, lse, sink):
        s = _sink_like(sink, lse)
        new_lse = torch.logaddexp(lse, s)
        # A row that saw no key: lse = -inf, new_lse = sink, weight exp(-inf) = 0: output 0.
        w = torch.exp(lse - new_lse)
        new_out = (out.float() * _lse_as_out(w)).to(out.dtype)
        ctx.save_for_backward(out, w, new_lse, sink)
        return new_out, new_lse

    @staticmethod
    def backward(ctx, dout, dlse):
        out, w, new_lse, sink = ctx.saved_tensors
        p_sink = torch.exp(_sink_like(sink, new_lse) - new_lse)  # the sink's probability, 1 - w
        dout = torch.zeros_like(out) if dout is None else dout
        g = (dout.float() * out.float()).sum(-1)  # [B, S, H] or [T, H]: dout . out per row
        g = g.transpose(-1, -2)  # laid out like lse
        dl = torch.zeros_like(new_lse) if dlse is None else dlse.float()
        d_out = (dout.float() * _lse_as_out(w)).to(out.dtype)
        d_lse = g * w * p_sink + dl * w
        d_sink = (-g * w * p_sink + dl * p_sink).sum(
            dim=tuple(d for d in range(new_lse.dim()) if d != new_lse.dim() - 2)
        )
        return d_out, d_lse, d_sink.to(sink.dtype)


def merge_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a learnable sink: ``sink [H]``, one logit per query head, joins every row's
    softmax denominator and carries no value (gpt-oss). ``(out, lse)`` of attention over the keys
    become those with the sink; differentiable in all three (the sink's gradient is
    ``-sum_rows p_sink * (dout . out - dlse)``).

    Args:
        out: ``[B, S, H, D]`` (or packed ``[T, H, D]``). lse: ``[B, H, S]`` (or ``[H, T]``), float32.
        sink: ``[H]``, any float dtype (computed in float32).

    Returns:
        ``(out in out's dtype, lse float32)``.

    Example:
        >>> out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        >>> out, lse = merge_sink(out, lse, sinks)   # what learnable_sink=sinks computes
    """
    _check_pair(out, lse, "out/lse")
    if not isinstance(sink, torch.Tensor) or sink.dim() != 1 or sink.shape[0] != out.shape[-2]:
        got = tuple(sink.shape) if isinstance(sink, torch.Tensor) else type(sink).__name__
        raise ValueError(
            f"learnable_sink must be a tensor [nheads={out.shape[-2]}] (one logit per query head), got {got}"
        )
    if not sink.is_floating_point():
        raise TypeError(f"learnable_sink must be a floating tensor, got {sink.dtype}")
    return _SinkMerge.apply(out, lse, sink)
