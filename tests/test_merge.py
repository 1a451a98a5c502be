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


def test_combine_of_no_partials_is_attention_over_no_key():
    out, lse = rf.combine_attn_partials(torch.randn(0, 2, 3, 4, 8), torch.randn(0, 2, 4, 3))
    assert out.shape == (2, 3, 4, 8) and not out.any()
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32 and bool((lse == -math.inf).all())
    with pytest.raises(ValueError, match="lse"):
        rf.combine_attn_partials(torch.randn(0, 2, 3, 4, 8), torch.randn(0, 2, 3, 4))


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lse"):
        rf.merge_attn_states(
            torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2), torch.randn(1, 4, 2, 8), torch.randn(1, 2, 4)
        )
    with pytest.raises(ValueError, match="outs"):
        rf.combine_attn_partials(torch.randn(4, 2, 8), torch.randn(4, 2))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_blockwise_writes_over_given_buffers_without_merge(packed):
    """``attn_fwd(..., out=, lse=, merge=False)`` (the ring's first step) writes the result over
    whatever the float32 buffers held, rows without keys included; merge=True would merge NaN."""
    from ringflash import blockwise

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 11, 2, 8, generator=g) for _ in range(3))
    kw = dict(softmax_scale=8**-0.5, causal=True, diag_offset=-3)  # rows 0-2 see no key
    if packed:
        cu = torch.tensor([0, 11, 22], dtype=torch.int32)
        q, k, v = (x.reshape(22, 2, 8) for x in (q, k, v))
        kw = dict(
            kw, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=11, max_seqlen_k=11, diag_offset=[-3, -3]
        )
    want_out, want_lse = blockwise.attn_fwd(q, k, v, **kw)
    out = torch.full(want_out.shape, float("nan"))
    lse = torch.full(want_lse.shape, float("nan"))
    got_out, got_lse = blockwise.attn_fwd(q, k, v, **kw, out=out, lse=lse, merge=False)
    assert got_out is out and got_lse is lse
    torch.testing.assert_close(out, want_out.float())
    torch.testing.assert_close(lse, want_lse)
    assert torch.isinf(lse).sum() > 0  # the rows without keys were written too
