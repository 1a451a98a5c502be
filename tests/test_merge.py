"""Exact LSE merging, including partials that saw no key."""

import math

import pytest
import torch

import ringflash as rf
from ringflash.reference import attention_ref
from tests.oracle import assert_matches


def test_merge_two_key_halves_equals_whole():
    q, k, v = (torch.randn(2, 9, 3, 16, dtype=torch.float64) for _ in range(3))
    full, full_lse = attention_ref(q, k, v)
    a = attention_ref(q, k[:, :4], v[:, :4], diag_offset=0)
    b = attention_ref(q, k[:, 4:], v[:, 4:], diag_offset=0)
    out, lse = rf.merge_attn_states(a[0].float(), a[1].float(), b[0].float(), b[1].float())
    assert_matches("out", out, full, None, 0)
    assert_matches("lse", lse, full_lse, None, 0)


def test_merge_with_minus_inf_partials_never_nan():
    out_a = torch.randn(1, 4, 2, 8)
    lse_a = torch.randn(1, 2, 4)
    out_b = torch.zeros(1, 4, 2, 8)
    lse_b = torch.full((1, 2, 4), -math.inf)
    out, lse = rf.merge_attn_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    out, lse = rf.merge_attn_states(out_b, lse_b, out_b, lse_b)
    assert not torch.isnan(out).any() and torch.all(out == 0) and torch.all(lse == -math.inf)


def test_combine_many_partials_packed_layout():
    q, k, v = (torch.randn(13, 2, 8, dtype=torch.float64) for _ in range(3))
    full, full_lse = attention_ref(q[None], k[None], v[None])
    parts = [
        attention_ref(q[None], k[None, i : i + 4], v[None, i : i + 4], diag_offset=0) for i in (0, 4, 8, 12)
    ]
    outs = torch.stack([p[0][0] for p in parts] + [torch.zeros(13, 2, 8, dtype=torch.float64)])
    lses = torch.stack([p[1][0] for p in parts] + [torch.full((2, 13), -math.inf, dtype=torch.float64)])
    out, lse = rf.combine_attn_partials(outs, lses)
    assert_matches("out", out, full[0], None, 0)
    assert_matches("lse", lse, full_lse[0], None, 0)


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lse"):
        rf.merge_attn_states(
            torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2), torch.randn(1, 4, 2, 8), torch.randn(1, 2, 4)
        )
    with pytest.raises(ValueError, match="outs"):
        rf.combine_attn_partials(torch.randn(4, 2, 8), torch.randn(4, 2))
