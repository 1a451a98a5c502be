"""The fused merge's counters: per-stream buffers for eager calls, arena slices for captured calls."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from ringflash.kernels.decode import counters as dc  # noqa: E402
from ringflash.kernels.options import CounterArenaConfig  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def arenas():
    """No arena yet, small limits: the arena logic on CPU tensors."""
    return dc.CounterArenas(CounterArenaConfig(min_counters=64, max_counters=512, headroom_calls=4))


def test_arena_slices_are_zero_disjoint_and_never_reused():
    arena = dc.CounterArena(CPU, 10)
    a, b = arena.take(4), arena.take(6)
    assert a.numel() == 4 and b.numel() == 6 and arena.free == 0
    assert int(a.abs().sum() + b.abs().sum()) == 0
    a.fill_(1)
    assert int(b.sum()) == 0, "slices overlap"
    assert arena.take(1) is None, "an exhausted arena handed out counters"


def test_no_capture_counters_before_an_eager_call(arenas):
    assert arenas.take(CPU, 8) is None


def test_reserve_keeps_headroom_and_earlier_arenas(arenas):
    arenas.reserve(CPU, 8)  # headroom 4 calls x 8 = 32 -> one arena of 64
    (first,) = arenas.of(CPU)
    assert first.buf.numel() == 64
    taken = [arenas.take(CPU, 8) for _ in range(5)]
    assert all(t is not None for t in taken) and first.free == 24
    arenas.reserve(CPU, 8)  # 24 < 32 left: a second arena, twice the size
    both = arenas.of(CPU)
    assert len(both) == 2 and both[0] is first and both[1].buf.numel() == 128
    fresh = arenas.take(CPU, 8)
    assert fresh.untyped_storage().data_ptr() == both[1].buf.untyped_storage().data_ptr()
    for t in taken:
        t.fill_(7)
    assert int(fresh.sum()) == 0, "a new slice shares counters with an earlier one"


def test_reserve_stops_at_the_limit(arenas):
    for _ in range(10):
        arenas.reserve(CPU, 16)  # 64 needed per arena
        while arenas.take(CPU, 16) is not None:
            pass
    held = sum(a.buf.numel() for a in arenas.of(CPU))
    assert 0 < held <= arenas.config.max_counters
    assert arenas.take(CPU, 16) is None


def test_clear_forgets_every_arena(arenas):
    arenas.reserve(CPU, 8)
    kept = arenas.take(CPU, 8)
    arenas.clear()
    assert arenas.of(CPU) == [] and arenas.take(CPU, 8) is None
    assert kept.numel() == 8, "a slice handed out stays valid"


def test_semaphore_buffer_on_cpu_is_one_zeroed_buffer():
    a = dc.semaphore_buffer(CPU, 8)
    assert a is dc.semaphore_buffer(CPU, 8) and int(a.abs().sum()) == 0 and a.numel() >= 8


# ----------------------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_captured_calls_take_arena_slices_else_zero_their_own():
    """After an eager call, every captured call gets its own slice of the arena (no memset node);
    with the arena exhausted, a captured call gets a buffer that the graph zeroes."""
    dev = torch.device("cuda", torch.cuda.current_device())
    eager = dc.semaphore_buffer(dev, 8)
    arena = dc.default_arenas().of(dev)[-1]
    base = arena.buf.untyped_storage().data_ptr()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g1 = dc.semaphore_buffer(dev, 8)
        g2 = dc.semaphore_buffer(dev, 8)
        used, arena.used = arena.used, arena.buf.numel()  # exhausted for the next call only
        g3 = dc.semaphore_buffer(dev, 8)
        arena.used = used
    graph.replay()
    torch.cuda.synchronize()
    assert g1.untyped_storage().data_ptr() == base and g2.untyped_storage().data_ptr() == base
    assert g1.data_ptr() != g2.data_ptr() and eager.data_ptr() not in (g1.data_ptr(), g2.data_ptr())
    assert g3.untyped_storage().data_ptr() != base, "an exhausted arena served a capture"
    assert int(g1.abs().sum() + g2.abs().sum() + g3.abs().sum()) == 0


@needs_cuda
@pytest.mark.parametrize("warm", [True, False], ids=["arena", "own-buffer"])
def test_cuda_graph_of_several_fused_calls(warm):
    """Three fused decode calls captured in one graph (a model's layers), with arena counters or,
    with no arena, buffers the graph zeroes: every replay merges exactly like the
    unfused path and leaves the counters at 0."""
    from ringflash.kernels import decode as kd
    from ringflash.kernels.options import DecodeConfig

    g = torch.Generator(device="cuda").manual_seed(3)
    B, S, Hq, Hk, D = 2, 1000, 8, 2, 64
    layers = [
        tuple(
            torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
            for shape in ((B, 1, Hq, D), (B, S, Hk, D), (B, S, Hk, D))
        )
        for _ in range(3)
    ]
    lens = torch.tensor([S, 517], dtype=torch.int32, device="cuda")
    opts = dict(softmax_scale=D**-0.5, num_splits=6)

    def step():
        return [kd.decode_fwd(q, kc, vc, lens, **opts) for q, kc, vc in layers]

    s = torch.cuda.Stream()  # warm-up (compiles the kernel before the capture)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    if not warm:
        dc.default_arenas().clear()  # as if the capture came first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    unfused = DecodeConfig(fuse_combine=False)
    want = [kd.decode_fwd(q, kc, vc, lens, config=unfused, **opts) for q, kc, vc in layers]
    arena = dc.default_arenas().of(lens.device)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    for (o, lse), (o2, l2) in zip(outs, want, strict=True):
        assert (o.float() - o2.float()).abs().max().item() <= 2 * 2**-8 * o2.float().abs().max().item()
        assert torch.allclose(lse, l2, atol=1e-5, rtol=1e-5)
    if warm:
        assert int(arena[-1].buf.abs().sum()) == 0, "arena counters not back to 0"


@needs_cuda
def test_cuda_counters_of_ever_new_streams_stay_bounded():
    dev = torch.device("cuda", torch.cuda.current_device())
    for _ in range(dc._SEM_STREAMS + 8):
        with torch.cuda.stream(torch.cuda.Stream()):
            assert int(dc.semaphore_buffer(dev, 8).abs().sum()) == 0
    assert len(dc._semaphores) <= dc._SEM_STREAMS
