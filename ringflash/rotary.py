"""Rotary position embedding applied to new keys and queries, as flash-attn's KV-cache call does.

``x [B, S, H, D]`` token ``(b, s)`` sits at position ``positions[b, s]``; its first ``rotary_dim``
channels turn by the angles whose cosines and sines are rows ``positions[b, s]`` of ``cos`` /
``sin`` ``[seqlen_ro, rotary_dim / 2]``. Interleaved (GPT-J) pairs channels ``(2i, 2i + 1)``;
otherwise (GPT-NeoX) ``(i, i + rotary_dim / 2)``. The other channels pass through unchanged.
Arithmetic is float32; the result has ``x``'s dtype.
"""

from __future__ import annotations

import torch


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """``x [B, S, H, D]`` rotated at ``positions [B, S]`` (int64, clamped into ``cos``'s rows).

    Returns:
        A new tensor like ``x``.
    """
    half = cos.shape[-1]
    rd = 2 * half
    pos = positions.clamp(0, cos.shape[0] - 1)
    c = cos[pos].float().unsqueeze(2)  # [B, S, 1, rd/2]
    s = sin[pos].float().unsqueeze(2)
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([rotated.to(x.dtype), x[..., rd:]], -1)
