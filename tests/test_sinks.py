"""Learnable attention sinks (gpt-oss): one logit per query head joins every row's softmax
denominator and carries no value. Every path adds it exactly once, with its gradient: local,
packed, the KV cache, the ring (padded and packed, both methods), Ulysses, the hybrid, sharded
decoding; against a float64 oracle that appends the sink as one more score column."""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import spawn
from oracle import assert_matches

import ringflash as rf
from ringflash.parallel.sharding import shard


def sink_ref(q, k, v, sink, causal=False, window_size=(-1, -1)):
    """float64 attention ``[B, Sq, H, D]`` with the sink as an extra column of every row's scores."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(H // Hk, 2)
    vv = v.repeat_interleave(H // Hk, 2)
    s = torch.einsum("bshd,bthd->bhst", q, kk) * D**-0.5
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        vis &= j <= i
    if window_size[0] >= 0:
        vis &= j >= i - window_size[0]
    s = s.masked_fill(~vis, -math.inf)
    s = torch.cat([s, sink.view(1, H, 1, 1).expand(B, H, Sq, 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])[..., :-1]
    return torch.einsum("bhst,bthd->bshd", p, vv), lse


def _leaves(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(), dict(causal=True, window_size=(3, 0))], ids=str)
def test_local_sink_forward_and_backward(dtype, mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 11, 2, 16), torch.randn(2, 11, 2, 16)
    sink = torch.randn(4)
    dout = torch.randn(2, 9, 4, 16)
    leaves = _leaves(q, k, v, sink)
    ref, ref_lse = sink_ref(*leaves, **mask)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    mine = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [sink.clone().requires_grad_()]
    out, lse, _ = rf.flash_attn_func(*mine[:3], learnable_sink=mine[3], return_attn_probs=True, **mask)
    grads = torch.autograd.grad(out, mine, dout.to(dtype))
    tol = 2e-2 if dtype == torch.bfloat16 else None
    for name, g, r in zip(
        ("out", "lse", "dq", "dk", "dv", "dsink"), (out, lse, *grads), (ref, ref_lse, *ref_grads), strict=True
    ):
        if tol is None:
            assert_matches(name, g, r, None, 0)
        else:
            assert (g.double() - r).abs().max() < tol * (r.abs().max() + 1), name


def test_sink_varlen_and_kvcache():
    torch.manual_seed(1)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    sink = torch.randn(4)
    out = rf.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, learnable_sink=sink)
    for a, b in ((0, 3), (3, 10)):
        ref, _ = sink_ref(*(x[None, a:b].double() for x in (q, k, v)), sink.double(), causal=True)
        assert_matches(f"doc {a}:{b}", out[a:b], ref[0], None, 0)
    kc, vc = torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    qd = torch.randn(2, 1, 4, 8)
    lens = torch.tensor([5, 0], dtype=torch.int32)
    out, lse = rf.flash_attn_with_kvcache(
        qd, kc, vc, cache_seqlens=lens, learnable_sink=sink, return_softmax_lse=True
    )
    ref, rlse = sink_ref(qd[:1].double(), kc[:1, :5].double(), vc[:1, :5].double(), sink.double())
    assert_matches("cached row", out[:1], ref, None, 0)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "an empty cache with a sink: output 0"
    torch.testing.assert_close(lse[1, :, 0], sink.float(), msg="an empty cache's lse is the sink")
    with pytest.raises(ValueError, match=r"learnable_sink must be \[nheads=4\]"):
        rf.flash_attn_func(qd, qd, qd, learnable_sink=torch.zeros(3))


def _ranks(rank, world):
    torch.manual_seed(2)
    S = 8 * world
    q, k, v = torch.randn(1, S, 4, 8), torch.randn(1, S, 2, 8), torch.randn(1, S, 2, 8)
    dout = torch.randn(1, S, 4, 8)
    sink = torch.randn(4)
    leaves = _leaves(q, k, v, sink)
    ref, _ = sink_ref(*leaves, causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    uly, ring = rf.build_usp_groups(2, world // 2)
    cu = torch.tensor([0, S], dtype=torch.int32)

    def zigzag(*x, s):
        return rf.zigzag_ring_flash_attn_func(*x, causal=True, learnable_sink=s)

    def ulysses(*x, s):
        return rf.ulysses_attn_func(*x, causal=True, learnable_sink=s)

    def hybrid(*x, s):
        return rf.usp_attn_func(*x, causal=True, ulysses_group=uly, ring_group=ring, learnable_sink=s)

    def packed(q, k, v, s):
        kw = dict(causal=True, layout="zigzag", method="allgather", learnable_sink=s)
        return rf.ring_flash_attn_varlen_func(q[0], k[0], v[0], cu, S, **kw)[None]

    shards = {
        "zigzag": lambda x: shard(x, dim=1, layout="zigzag"),
        "contiguous": lambda x: shard(x, dim=1, layout="contiguous"),
        "usp": lambda x: rf.usp_shard(x, uly, ring, layout="zigzag"),
        "packed": lambda x: shard(x[0], dim=0, layout="zigzag", cu_seqlens=cu)[None],
    }
    calls = {"zigzag ring": ("zigzag", zigzag), "ulysses": ("contiguous", ulysses), "hybrid": ("usp", hybrid)}
    calls["packed all-gather"] = ("packed", packed)
    for name, (sharding, fn) in calls.items():
        sh = shards[sharding]
        mine = [sh(x).requires_grad_() for x in (q, k, v)] + [sink.clone().requires_grad_()]
        out = fn(*mine[:3], s=mine[3])
        grads = list(torch.autograd.grad(out, mine, sh(dout)))
        torch.distributed.all_reduce(grads[3])  # the sink's gradient: a sum over the ranks' rows
        assert_matches(f"{name} out", out, sh(ref.detach()), None, 2)
        for g, r, n in zip(grads[:3], ref_grads[:3], ("dq", "dk", "dv"), strict=True):
            assert_matches(f"{name} {n}", g, sh(r), None, 2)
        assert_matches(f"{name} dsink", grads[3], ref_grads[3], None, 2)
    # Sharded decoding: the sink joins once, after the ranks' partials.
    kc = torch.randn(1, 6, 2, 8)
    qd = torch.randn(1, 1, 4, 8)
    out = rf.sharded_flash_attn_with_kvcache(qd, kc, kc, cache_seqlens=6, learnable_sink=sink)
    parts = [torch.empty_like(kc) for _ in range(world)]
    torch.distributed.all_gather(parts, kc)
    full = torch.cat(parts, 1)
    ref, _ = sink_ref(qd.double(), full.double(), full.double(), sink.double())
    assert_matches("sharded decode", out, ref, None, 0)


def test_sinks_across_ranks():
    spawn(_ranks, 2, timeout=120)
