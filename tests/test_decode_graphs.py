"""The decoding kernels on a GPU beyond the oracle cases: the append fused into the attend launch
against the unfused path (also under the interpreter, through ``test_decode_interp.py``), CUDA
graph capture and exact replays, the L2 prefetch, launches through the kept compiled kernel, and
the fused merge's counters per stream and per capture.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_decode import _err, assert_checks

from ringflash.decode import flash_attn_with_kvcache


def _capture(step):
    """``step`` warmed up on a side stream, then captured: ``(graph, the captured call's outputs)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "B,S,cap,D,dtype",
    [
        (16, 4096, 4096, 128, torch.bfloat16),
        (1, 4000, 5000, 128, torch.bfloat16),
        (3, 100, 130, 80, torch.float16),
        (2, 0, 40, 64, torch.float32),
        (2, 0, 0, 64, torch.float32),
        (2, 700, 900, 192, torch.bfloat16),
        (2, 700, 900, 80, torch.float32),
    ],
)
def test_decode_cuda_prefetch_changes_nothing(B, S, cap, D, dtype):
    """The L2 prefetch of split 0's first rows is a hint: with it, without it and with more rows
    than the cache holds, the outputs are bitwise the same (and an empty cache prefetches nothing)."""
    from ringflash.kernels import decode as kd
    from ringflash.kernels.options import DecodeConfig

    q = torch.randn(B, 1, 16, D, device="cuda", dtype=dtype)
    kc = torch.randn(B, cap, 4, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    outs = []
    for rows in (0, 64, 256):
        config = DecodeConfig(prefetch_rows=rows)
        outs.append(kd.decode_fwd(q, kc, vc, lens, softmax_scale=D**-0.5, config=config))
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [0, 1])
def test_decode_cuda_cached_launch_is_tritons_launch(splits):
    """After its first call a decoding signature launches its compiled kernel directly
    (``kernels.launch``): bitwise the same results as Triton's own launch, and a pointer of
    another alignment (a view 8 bytes in) compiles its own kernel rather than reusing one."""
    from ringflash.kernels import decode as kdecode

    torch.manual_seed(0)
    B, S, cap = 2, 1000, 1024
    qs = torch.randn(B, 1, 32 * 128 + 4, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(B, cap, 8, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")

    def call(q):
        return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=splits)

    kdecode._LAUNCHES.clear()
    q = qs[..., : 32 * 128].unflatten(-1, (32, 128))  # strides of a row of 32 * 128 + 4
    first = call(q)
    (slot,) = [entry.compiled for entry in kdecode._LAUNCHES.values()]
    assert len(slot) == 1, "the first call keeps its compiled kernel"
    again = call(q)
    assert torch.equal(first, again)
    shifted = qs[..., 4:].unflatten(-1, (32, 128))  # same strides, 8 bytes further
    shifted.copy_(q.clone())
    assert torch.equal(call(shifted), first)
    assert len(slot) == 2, "another alignment is another specialization"
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tma", ["auto", "on"])
def test_decode_cuda_graph(tma):
    """A captured append+attend step replays for new lengths (read on the device) exactly (also
    with the cache read through TMA descriptors, whose scratch is allocated at capture)."""
    from ringflash.kernels.options import use_tma

    with use_tma(tma):
        _graph_replays_exactly()


def _graph_replays_exactly():
    dev = "cuda"
    q = torch.randn(2, 1, 16, 128, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(2, 3000, 4, 128, device=dev, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k, v = (
        torch.randn(2, 1, 4, 128, device=dev, dtype=torch.bfloat16),
        torch.randn(2, 1, 4, 128, device=dev).bfloat16(),
    )
    lens = torch.tensor([100, 2000], dtype=torch.int32, device=dev)
    kc0, vc0 = kc.clone(), vc.clone()

    def step():
        return flash_attn_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True
        )

    graph, (out, lse) = _capture(step)
    lens.copy_(torch.tensor([7, 2999], dtype=torch.int32))
    kc.copy_(kc0)
    vc.copy_(vc0)
    graph.replay()
    torch.cuda.synchronize()
    kc2, vc2 = kc0.clone(), vc0.clone()
    ref_o, ref_l = flash_attn_with_kvcache(
        q, kc2, vc2, k, v, cache_seqlens=lens.clone(), causal=True, return_softmax_lse=True
    )
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "graph append wrote other slots"
    assert torch.equal(out, ref_o), "graph out differs from eager"
    assert torch.equal(lse, ref_l), "graph lse differs from eager"


def _fused_step_inputs(dev, B=3, S=3000, Hq=16, Hk=4, D=128, n_new=2, page=None, seed=0):
    """bf16 inputs of one step; row lengths 0, S/3 and S - n_new (the cache ends up full)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=torch.bfloat16)

    q = rnd(B, n_new, Hq, D)
    k, v = rnd(B, n_new, Hk, D), rnd(B, n_new, Hk, D)
    lens = torch.tensor([0, S // 3, S - n_new][:B], dtype=torch.int32, device=dev)
    if page:
        per_row = math.ceil(S / page)
        kc, vc = rnd(B * per_row + 1, page, Hk, D), rnd(B * per_row + 1, page, Hk, D)
        bt = torch.randperm(B * per_row, generator=g).view(B, per_row).to(device=dev, dtype=torch.int32)
        return q, k, v, kc, vc, dict(cache_seqlens=lens, block_table=bt)
    return q, k, v, rnd(B, S, Hk, D), rnd(B, S, Hk, D), dict(cache_seqlens=lens)


def fused_vs_unfused(dev, splits, page=None, **shape):
    """One launch (append + attend + merge) against append kernel + split kernel + combine kernel
    (Triton on ``dev``): ``{check: [error, bound]}``, the semaphore counters' sum included."""
    from ringflash.kernels import decode as kd
    from ringflash.kernels.options import DecodeConfig

    q, k, v, kc, vc, kw = _fused_step_inputs(dev, page=page, **shape)
    bt, lens = kw.get("block_table"), kw["cache_seqlens"]
    opts = dict(softmax_scale=q.shape[-1] ** -0.5, causal=True, num_splits=splits, block_table=bt)
    kc2, vc2 = kc.clone(), vc.clone()
    o1, l1 = kd.decode_fwd(q, kc, vc, lens, k_new=k, v_new=v, **opts)
    kd.append_kv(kc2, vc2, k, v, lens, block_table=bt)
    unfused = DecodeConfig(fuse_combine=False)
    o2, l2 = kd.decode_fwd(q, kc2, vc2, lens, n_new=k.shape[1], config=unfused, **opts)
    sem = kd.semaphore_buffer(q.device, 1)
    o1, o2 = o1.float().cpu(), o2.float().cpu()
    return {
        "k_cache equal": [float(not torch.equal(kc, kc2)), 0.0],
        "v_cache equal": [float(not torch.equal(vc, vc2)), 0.0],
        "out": [_err(o1, o2), 2 * 2**-8 * o2.abs().max().item()],
        "lse": [_err(l1.cpu(), l2.cpu()), 1e-5],
        "lse -inf pattern": [float((torch.isinf(l1) != torch.isinf(l2)).sum()), 0.0],
        "semaphore counters back to 0": [float(sem.abs().sum()), 0.0],
    }


# (splits, page): one split writes out directly; 5 and 16 merge in the last program.
FUSED = [(1, None), (5, None), (16, None), (5, 64), (16, 64)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits,page", FUSED, ids=[f"splits{s}-page{p}" for s, p in FUSED])
def test_decode_cuda_fused_matches_unfused(splits, page):
    cid = f"fused splits={splits} page={page}"
    assert_checks(fused_vs_unfused("cuda", splits, page), cid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_graph_replays_fused():
    """A captured fused step (one kernel) replays many times with the same result, the counters
    stay at 0, and it matches the unfused eager path."""
    from ringflash.kernels import decode as kd
    from ringflash.kernels.options import DecodeConfig

    q, k, v, kc, vc, kw = _fused_step_inputs("cuda", B=1, S=4096, Hq=32, Hk=8, n_new=1, seed=1)
    lens = kw["cache_seqlens"]
    kc0, vc0 = kc.clone(), vc.clone()

    def step():
        return flash_attn_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True
        )

    graph, (out, lse) = _capture(step)
    first = None
    for _ in range(20):
        graph.replay()
        if first is None:
            first = (out.clone(), lse.clone())
    torch.cuda.synchronize()
    assert torch.equal(out, first[0]) and torch.equal(lse, first[1]), "replays differ"
    assert int(kd.semaphore_buffer(q.device, 1).abs().sum()) == 0, "semaphore counters not reset"
    kc2, vc2 = kc0.clone(), vc0.clone()
    kd.append_kv(kc2, vc2, k, v, lens)
    o2, l2 = kd.decode_fwd(
        q,
        kc2,
        vc2,
        lens,
        n_new=1,
        softmax_scale=128**-0.5,
        causal=True,
        config=DecodeConfig(fuse_combine=False),
    )
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "graph append wrote other slots"
    err_o = (out.float() - o2.float()).abs().max().item()
    assert err_o <= 2 * 2**-8 * o2.float().abs().max().item(), f"out: graph fused vs unfused {err_o:.3g}"
    assert torch.allclose(lse, l2, atol=1e-5, rtol=1e-5), "lse: graph fused vs unfused"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_cuda_counters_per_stream_and_per_capture():
    """The fused merge's counters are never shared by calls that may overlap: one buffer per CUDA
    stream for eager calls, counters of its own for each captured call (``test_decode_counters``)."""
    from ringflash.kernels import decode as kd

    dev = torch.device("cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        b1 = kd.semaphore_buffer(dev, 8)
        assert kd.semaphore_buffer(dev, 8) is b1, "one stream, one buffer"
    with torch.cuda.stream(s2):
        b2 = kd.semaphore_buffer(dev, 8)
    assert b1.data_ptr() != b2.data_ptr(), "two streams share counters"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g1 = kd.semaphore_buffer(dev, 8)
        g2 = kd.semaphore_buffer(dev, 8)
    assert len({b1.data_ptr(), b2.data_ptr(), g1.data_ptr(), g2.data_ptr()}) == 4
    graph.replay()
    torch.cuda.synchronize()
    assert int(g1.abs().sum()) == 0 and int(g2.abs().sum()) == 0
