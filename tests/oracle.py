"""Comparison helpers: every attention result is checked against the float64 oracle.

float32 results pass within fixed tolerances. Low-precision results pass when their error is at
most ``factor`` times the error of plain PyTorch doing the same computation in the same precision
(flash-attn's rule: 2x forward, 3x backward), plus a small absolute slack for near-zero errors.
"""

from __future__ import annotations

import torch

F32_ATOL = 2e-5
F32_RTOL = 2e-5


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference over the finite entries of ``ref`` (inf entries must match exactly)."""
    x, ref = x.double(), ref.double()
    inf = torch.isinf(ref)
    if inf.any():
        assert torch.equal(x[inf], ref[inf]), "infinite entries differ"
    return (x[~inf] - ref[~inf]).abs().max().item() if (~inf).any() else 0.0


def assert_matches(
    name: str, got: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor | None, factor: float
):
    """Assert ``got`` matches the float64 ``ref64``; ``lowp`` is plain PyTorch in got's precision."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    err = max_err(got, ref64)
    if got.dtype == torch.float32 or lowp is None:
        scale = ref64[torch.isfinite(ref64)].abs().max().item() if torch.isfinite(ref64).any() else 1.0
        bound = F32_ATOL + F32_RTOL * scale
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (float32 tolerance)"
    else:
        base = max_err(lowp, ref64)
        bound = factor * base + 1e-4
        assert err <= bound, f"{name}: max error {err:.3g} > {factor}x plain-PyTorch error {base:.3g}"
