"""Whole dense calls through PyTorch's fused CPU kernels (``ringflash.blockwise_fused``)."""

import math

import pytest
import torch

import ringflash as rf
from ringflash.blockwise_fused import _parts, usable
from ringflash.masking import diag_bounds
from ringflash.reference import attention_ref
from tests.oracle import assert_matches


@pytest.mark.parametrize("sq", [1, 5, 12])
@pytest.mark.parametrize("sk", [1, 7, 12])
def test_parts_see_exactly_the_keys_of_the_band(sq, sk):
    """Every row sees, over the parts, each key ``j <= i + hi`` exactly once and no other."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    for hi in [math.inf, *range(-sq - 2, sk + 3)]:
        seen = torch.zeros(sq, sk, dtype=torch.int64)
        for row0, key0, key1, causal in _parts(hi, sq, sk):
            r, c = i - row0, j - key0
            part = (r >= 0) & (c >= 0) & (j < key1)
            seen += (part & (c <= r) if causal else part).long()
        want = (j <= i + hi).long() if hi != math.inf else torch.ones(sq, sk, dtype=torch.int64)
        assert torch.equal(seen, want), f"hi={hi}"


# (Sq, Sk, Hq, Hk, causal, window): bottom-right diagonals above, on and below the first key,
# right windows, no mask; MHA and GQA.
CASES = [
    (40, 40, 4, 4, True, (-1, -1)),
    (24, 61, 4, 2, True, (-1, -1)),
    (61, 24, 4, 1, True, (-1, -1)),
    (33, 50, 6, 2, False, (-1, -1)),
    (45, 45, 2, 1, False, (-1, 5)),
    (30, 44, 4, 2, True, (-1, 3)),
]


@pytest.mark.parametrize("lse_grad", [True, False], ids=["lse-grad", "out-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Sq{c[0]}-Sk{c[1]}-H{c[2]}:{c[3]}-{c[4]}-{c[5]}")
def test_whole_call_matches_oracle_forward_and_backward(case, dtype, lse_grad):
    """Output, LSE and gradients against the float64 oracle, for calls that the fused whole-call
    path takes: with a gradient into the LSE (which the backward passes in ``delta``: the padded
    column) and without one (the kernel reads the output itself)."""
    sq, sk, hq, hk, causal, window = case
    q, k, v = (torch.randn(2, s, h, 32).to(dtype) for s, h in ((sq, hq), (sk, hk), (sk, hk)))
    lo, _ = diag_bounds(sk - sq, causal, window)
    assert usable(lo, 0.0, q, k, v)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = rf.flash_attn_func(*leaves, causal=causal, window_size=window, return_attn_probs=True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse) * lse_grad
    grads = torch.autograd.grad([out, lse], leaves, [dout, dlse])

    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = attention_ref(*leaves64, causal=causal, window_size=window)
    ref_grads = torch.autograd.grad([ref, ref_lse], leaves64, [dout.double(), dlse.double()])
    low = low_grads = None
    if dtype != torch.float32:  # plain PyTorch in the same precision: the error it makes
        low_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        low, low_lse = attention_ref(*low_leaves, causal=causal, window_size=window, upcast=False)
        low_grads = torch.autograd.grad([low, low_lse], low_leaves, [dout, dlse.to(low_lse.dtype)])
    assert_matches("out", out, ref, low, 2)
    assert_matches("lse", lse, ref_lse, None, 0)
    for i, (name, got, want) in enumerate(zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)):
        assert_matches(name, got, want, None if low_grads is None else low_grads[i], 3)


def test_calls_it_cannot_express_take_the_tiles():
    """Non-finite inputs, a softcap, a left window or a value head dim of its own are refused."""
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    assert usable(-math.inf, 0.0, q, k, v)
    bad = k.clone()
    bad[0, 3, 1, 2] = math.nan
    assert not usable(-math.inf, 0.0, q, bad, v)
    bad[0, 3, 1, 2] = math.inf
    assert not usable(-math.inf, 0.0, q, k, bad)
    assert not usable(-math.inf, 5.0, q, k, v)
    assert not usable(-4.0, 0.0, q, k, v)
    assert not usable(-math.inf, 0.0, q, k, torch.randn(1, 8, 2, 8))
