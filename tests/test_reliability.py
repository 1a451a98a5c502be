"""Defects that once gave a silent wrong answer, a NaN or an internal error, each pinned by a test."""

from __future__ import annotations

import math
import os

import pytest
import torch

import ringflash as rf
from ringflash.backends import use_config
from ringflash.blockwise import BlockwiseConfig
from ringflash.reference import attention_ref
from tests.oracle import assert_matches


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "explicit"])
def test_inf_in_one_key_stays_out_of_rows_that_cannot_see_it(fused):
    """Rows that cannot see a key with an ``inf`` stay finite and exact on every path (it once
    spread NaN through the fused CPU kernel's additive mask). An ``inf`` in a *value* is another
    matter: a row whose tile holds it multiplies it by a zero weight, NaN, as in SDPA's kernels."""
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    j = 25
    k[0, j, 0, 3] = math.inf
    with use_config(BlockwiseConfig(block_q=16, block_k=8, fused_cpu=fused)):
        out, lse, _ = rf.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref, ref_lse = attention_ref(q.double()[:, :j], k.double()[:, :j], v.double()[:, :j], causal=True)
    # Rows before j never see key j: finite and exact.
    assert torch.isfinite(out[:, :j]).all() and torch.isfinite(lse[..., :j]).all()
    assert_matches("out[:j]", out[:, :j], ref, None, 0)
    assert_matches("lse[:j]", lse[..., :j], ref_lse, None, 0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu", "explicit"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_one_query_row_is_a_nan_row_on_every_path(fused, causal):
    """A query row holding a NaN gives a NaN output row and LSE, the other rows exact
    (PyTorch's fused CPU kernel once turned it into zeros with an LSE of 0, hiding the NaN)."""
    q, k, v = (torch.randn(1, 24, 2, 16) for _ in range(3))
    q[0, 17, 1, 5] = math.nan
    with use_config(BlockwiseConfig(block_q=16, block_k=8, fused_cpu=fused)):
        out, lse, _ = rf.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert torch.isnan(out[0, 17, 1]).all() and torch.isnan(lse[0, 1, 17])
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=causal)
    ok = torch.ones(24, 2, dtype=torch.bool)
    ok[17, 1] = False
    assert_matches("other rows", out[0][ok], ref[0][ok], None, 0)
    assert torch.allclose(lse[0].transpose(0, 1)[ok], ref_lse[0].transpose(0, 1)[ok].float(), atol=1e-5)


NAN_DOCS = [0, 5, 12, 16]


def _nan_key_rows(rank, world, layout, method):
    """Rows of the packed ring's result that hold a NaN, for a NaN in key 6 (document [5, 12))."""
    from ringflash.parallel import shard, unshard

    torch.manual_seed(0)
    cu = torch.tensor(NAN_DOCS, dtype=torch.int32)
    q, k, v = (torch.randn(16, 2, 16) for _ in range(3))
    k[6, 0, 0] = math.nan
    sh = lambda x: shard(x, dim=0, layout=layout, cu_seqlens=cu)  # noqa: E731
    out, lse, _ = rf.ring_flash_attn_varlen_func(
        sh(q), sh(k), sh(v), cu, 7, causal=True, layout=layout, method=method, return_attn_probs=True
    )
    out = unshard(out, dim=0, layout=layout, cu_seqlens=cu)
    lse = unshard(lse.transpose(0, 1), dim=0, layout=layout, cu_seqlens=cu)
    return torch.isnan(out[:, 0]).any(-1).nonzero().flatten().tolist(), torch.isnan(
        lse[:, 0]
    ).nonzero().flatten().tolist()


def test_nan_in_a_key_reaches_every_row_that_sees_it():
    """A NaN in one key makes every row that sees it NaN, output and LSE, and no other row, on one
    device (where the key is the first of its sequence: a span of one key that PyTorch's fused CPU
    kernel once turned into a finite partial) and through the packed ring in layouts that put the
    key in another piece than most of its rows (a partial with a NaN was once merged as empty)."""
    from dist_utils import spawn

    torch.manual_seed(0)
    cu = torch.tensor(NAN_DOCS, dtype=torch.int32)
    q, k, v = (torch.randn(16, 2, 16) for _ in range(3))
    k[5, 0, 0] = math.nan  # the first key of document [5, 12)
    out, lse, _ = rf.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, return_attn_probs=True)
    assert torch.isnan(out[:, 0]).any(-1).nonzero().flatten().tolist() == list(range(5, 12))
    assert torch.isnan(lse[0]).nonzero().flatten().tolist() == list(range(5, 12))
    assert torch.isfinite(out[:, 1]).all() and torch.isfinite(lse[1]).all()
    for layout, method in (("zigzag", "ring"), ("stripe", "ring"), ("stripe", "allgather")):
        for rows in spawn(_nan_key_rows, 2, layout, method, timeout=120):
            assert rows == (list(range(6, 12)), list(range(6, 12))), (layout, method, rows)


def test_inf_in_one_key_stays_out_of_the_cache_rows_that_cannot_see_it():
    k_cache, v_cache = torch.randn(2, 30, 1, 8), torch.randn(2, 30, 1, 8)
    k_cache[0, 20, 0, 0] = math.inf  # past row 0's length: never attended
    q = torch.randn(2, 1, 2, 8)
    lens = torch.tensor([12, 30], dtype=torch.int32)
    out = rf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert torch.isfinite(out[0]).all()
    ref, _ = attention_ref(q[:1].double(), k_cache[:1, :12].double(), v_cache[:1, :12].double())
    assert_matches("row 0", out[:1], ref, None, 0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs triton on CPU")
def test_triton_on_cpu_tensors_is_a_clear_error():
    pytest.importorskip("triton")
    q = torch.randn(1, 4, 2, 8)
    with rf.use_backend("triton"):
        for call in (
            lambda: rf.flash_attn_func(q, q, q),
            lambda: rf.flash_attn_with_kvcache(q[:, :1], q, q),
            lambda: rf.ring_flash_attn_func(q, q, q),
        ):
            with pytest.raises(ValueError, match="cannot run cpu tensors.*TRITON_INTERPRET=1"):
                call()


EMPTY = [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)]


@pytest.mark.parametrize("B, Sq, Sk", EMPTY, ids=[f"B{b}-Sq{q}-Sk{k}" for b, q, k in EMPTY])
def test_empty_batches_and_lengths_give_empty_or_no_key_results(B, Sq, Sk):
    q = torch.randn(B, Sq, 4, 16, requires_grad=True)
    k = torch.randn(B, Sk, 2, 16, requires_grad=True)
    v = torch.randn(B, Sk, 2, 16, requires_grad=True)
    out, lse, _ = rf.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (B, Sq, 4, 16) and lse.shape == (B, 4, Sq)
    assert (out == 0).all() if Sk == 0 else True
    assert (lse == -math.inf).all() if Sk == 0 else True
    out.sum().backward()
    assert q.grad.shape == q.shape and (q.grad == 0).all() if Sk == 0 else True
    if Sq == Sk:  # a sequence-parallel shard holds queries and keys of the same tokens
        assert rf.zigzag_ring_flash_attn_func(q, k, v, causal=True).shape == out.shape


def test_empty_packed_batch_and_empty_kvcache_batch():
    z = torch.zeros(0, 2, 16)
    cu = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch\\+1 >= 2 entries"):
        rf.flash_attn_varlen_func(z, z, z, cu, cu, 0, 0)
    cu = torch.tensor([0, 0], dtype=torch.int32)
    assert rf.flash_attn_varlen_func(z, z, z, cu, cu, 0, 0).shape == (0, 2, 16)
    q, cache = torch.zeros(0, 1, 2, 16), torch.zeros(0, 8, 2, 16)
    assert rf.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=0).shape == (0, 1, 2, 16)


@pytest.mark.parametrize(
    "shape, match",
    [((1, 4, 0, 16), "at least one head"), ((1, 4, 2, 0), "head dim must be in 1..256")],
    ids=["no-heads", "no-head-dim"],
)
def test_zero_heads_or_head_dim_is_a_clear_error(shape, match):
    x = torch.randn(shape)
    for call in (
        lambda: rf.flash_attn_func(x, x, x),
        lambda: rf.flash_attn_with_kvcache(x[:, :1], x, x),
        lambda: rf.ring_flash_attn_func(x, x, x),
        lambda: rf.ulysses_attn_func(x, x, x),
    ):
        with pytest.raises(ValueError, match=match):
            call()
