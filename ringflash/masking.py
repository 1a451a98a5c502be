"""Mask conventions shared by every backend.

A query row ``i`` may attend to key ``j`` when ``lo <= j - i <= hi`` with

    hi = diag + (0 if causal else window_right)   (no bound when not causal and window_right < 0)
    lo = diag - window_left                        (no bound when window_left < 0)

``diag`` is the key index that lines up with query 0. For a local call it is
``seqlen_k - seqlen_q`` (flash-attn's bottom-right alignment); a ring step between a query shard
that starts at global position ``qs`` and a key shard that starts at ``ks`` uses ``diag = qs - ks``.
"""

from __future__ import annotations

import math

import torch

INF = math.inf


def diag_bounds(diag: int, causal: bool, window_size: tuple[int, int]) -> tuple[float, float]:
    """Return ``(lo, hi)`` bounds on ``j - i`` for the visible keys (floats, +-inf when unbounded)."""
    left, right = window_size
    if causal:
        hi = float(diag)
    elif right >= 0:
        hi = float(diag + right)
    else:
        hi = INF
    lo = float(diag - left) if left >= 0 else -INF
    return lo, hi


def is_masked_free(lo: float, hi: float, i0: int, i1: int, j0: int, j1: int) -> bool:
    """True when every (i, j) in the block [i0, i1) x [j0, j1) is visible."""
    return (j1 - 1) - i0 <= hi and j0 - (i1 - 1) >= lo


def is_fully_masked(lo: float, hi: float, i0: int, i1: int, j0: int, j1: int) -> bool:
    """True when no (i, j) in the block [i0, i1) x [j0, j1) is visible."""
    return j0 - (i1 - 1) > hi or (j1 - 1) - i0 < lo or i1 <= i0 or j1 <= j0


def visible(i: torch.Tensor, j: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Boolean mask for query indices ``i`` (column vector) and key indices ``j`` (row vector)."""
    d = j - i
    m = torch.ones_like(d, dtype=torch.bool)
    if hi != INF:
        m &= d <= hi
    if lo != -INF:
        m &= d >= lo
    return m
