"""The all-gather method for packed documents: its cost model against the ring (``method="auto"``),
its exchange in pieces of KV heads, and real gloo ranks against the simulated exchange, bit for bit.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from dist_utils import spawn
from test_packed import LAYOUTS, MASKS

import ringflash as rf
from ringflash.parallel.gather_plan import gather_plan
from ringflash.parallel.sharding import shard_for
from ringflash.parallel.simulate import simulate_ring_attn, simulate_ring_attn_backward


def test_band_pairs_counts_every_visible_pair():
    import random

    from ringflash.parallel.method_cost import band_pairs

    rng = random.Random(0)
    for _ in range(2000):
        nq, nk = rng.randint(0, 12), rng.randint(0, 12)
        lo = rng.choice([-math.inf, rng.randint(-15, 15)])
        hi = rng.choice([math.inf, rng.randint(-15, 15)])
        want = sum(1 for i in range(nq) for j in range(nk) if lo <= j - i <= hi)
        assert band_pairs(lo, hi, nq, nk) == want, (lo, hi, nq, nk)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe", "balanced"])
def test_method_cost_counts(layout):
    """The cost model's pairs add up to the stream's causal (and windowed) pairs in every layout,
    and its gathered rows are what the all-gather plan receives."""
    from ringflash.parallel.gather_plan import received_rows
    from ringflash.parallel.method_cost import pair_counts

    cu, world = (0, 1, 700, 1500, 1520, 3000, 4096), 4
    for window, per_doc in (
        ((-1, 0), lambda n: n * (n + 1) // 2),
        ((50, 0), lambda n: sum(min(i, 50) + 1 for i in range(n))),
    ):
        pairs = pair_counts(layout, cu, world, True, window)
        assert sum(map(sum, pairs)) == sum(per_doc(b - a) for a, b in itertools.pairwise(cu)), window
    recv = received_rows(layout, cu, world, True, (-1, 0))
    plans = [gather_plan(layout, cu, r, world, True, (-1, 0)) for r in range(world)]
    assert recv == [sum(p.recv) - p.recv[r] for r, p in enumerate(plans)], "rows from other ranks"


def test_auto_method_follows_the_costs():
    """``method="auto"``: the all-gather when nothing travels or the link is fast enough that its
    exchange costs less than the ring's per-step state; the ring when a slow link would leave the
    all-gather's exchange exposed; stripe and one rank on the ring."""
    from ringflash.parallel.method_cost import choose_method

    q, k = torch.empty(1, 32, 128, dtype=torch.bfloat16), torch.empty(1, 8, 128, dtype=torch.bfloat16)
    one_doc, world = (0, 4 * 8192), 4
    far = (3, 3, 3, 3)
    args = ("zigzag", one_doc, world, True, (-1, 0), far, q, k, True)
    assert choose_method(*args, 1e15) == "allgather"
    assert choose_method(*args, 1e6) == "ring"
    assert (
        choose_method(
            "balanced", (0, 1024, 2048, 3072, 4096), world, True, (-1, 0), (0,) * 4, q, k, True, 1e6
        )
        == "allgather"
    )
    assert choose_method("stripe", *args[1:], 1e15) == "ring"
    assert choose_method("zigzag", one_doc, 1, True, (-1, 0), (0,), q, k, True, 1e15) == "ring"
    calls = []
    choose_method(
        "balanced", (0, 1024, 2048, 3072, 4096), world, True, (-1, 0), (0,) * 4, q, k, True, calls.append
    )
    assert not calls, "nothing travels: no link measured"


def test_default_pieces_keep_four_waves_per_call():
    """The exchange goes in pieces only on a GPU, and only as many as leave each piece's forward
    call 4 waves of 128-row query tiles."""
    from ringflash.parallel.allgather import pieces_for

    assert pieces_for(32, 8, 16384, None) == 1  # no GPU: nothing runs beside the calls
    assert pieces_for(32, 8, 16384, 132) == 4
    assert pieces_for(32, 8, 8192, 132) == 2  # 4 pieces: 64 tiles x 8 heads < 4 x 132
    assert pieces_for(32, 8, 4096, 132) == 1
    assert pieces_for(32, 2, 65536, 132) == 2  # 4 does not divide the KV heads
    assert pieces_for(32, 1, 65536, 132) == 1


def test_allgather_cost_in_pieces():
    """Pieces of KV heads leave one piece's share of the shorter of exchange and compute exposed:
    ``max(C, X) + min(C, X) / P``, where one piece pays ``C + X``."""
    from ringflash.parallel.method_cost import method_costs

    args = ("zigzag", (0, 4 * 8192), 4, True, (-1, 0), (3, 3, 3, 3), (32, 8, 128, 2), True)
    one, slow = (method_costs(*args, (1e14, 3e12, link))["allgather"] for link in (1e11, 1e10))
    exchange = (slow - one) / 0.9  # C at the 1e10 link: one - C/10 = slow - C
    work = slow - exchange
    for p in (2, 4):
        got = method_costs(*args, (1e14, 3e12, 1e10), pieces=p)["allgather"]
        assert got == pytest.approx(max(exchange, work) + min(exchange, work) / p), p


def _allgather_ranks(rank, world):
    """The all-gather method on real gloo ranks and on simulated ones, with the rows each rank
    receives counted by the collective's own splits."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 40, 41, 70, 96], dtype=torch.int32)  # 96 tokens: long and short documents
    T = int(cu[-1])
    q, k, v, dout = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8), torch.randn(T, 4, 8)
    layout = "balanced"
    with rf.use_backend("torch"):
        mine = [rf.shard(x, dim=0, layout=layout, cu_seqlens=cu).requires_grad_() for x in (q, k, v)]
        out = rf.ring_flash_attn_varlen_func(*mine, cu, T, causal=True, layout=layout, method="allgather")
        grads = torch.autograd.grad(out, mine, rf.shard(dout, dim=0, layout=layout, cu_seqlens=cu))
        parts = [[shard_for(x, r, world, 0, layout, cu) for r in range(world)] for x in (q, k, v, dout)]
        outs, lses, _ = simulate_ring_attn(*parts[:3], layout, causal=True, cu_seqlens=cu, method="allgather")
        sim = simulate_ring_attn_backward(
            parts[3], *parts[:3], outs, lses, layout, causal=True, cu_seqlens=cu, method="allgather"
        )
    same = torch.equal(out, outs[rank]) and all(
        torch.equal(g, s[rank]) for g, s in zip(grads, sim[:3], strict=True)
    )
    plan = gather_plan(layout, tuple(cu.tolist()), rank, world, True, (-1, -1))
    return same, sum(plan.recv), plan.src.shape[1]


def _pieces_ranks(rank, world):
    """The all-gather method with its exchange in pieces of KV heads (1 of 2 per piece, GQA 2:1)
    and whole, on the same ranks, for every layout and mask: outputs, LSE and gradients (also
    through the LSE)."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 40, 41, 70, 96], dtype=torch.int32)
    T = int(cu[-1])
    full = [torch.randn(T, h, 8) for h in (4, 2, 2, 4)]
    dlse = torch.randn(4, T // world)
    same = {}
    for layout, mask in itertools.product(LAYOUTS, MASKS):
        results = []
        for stride in (None, 1):
            with rf.use_backend("torch"):
                mine = [rf.shard(x, dim=0, layout=layout, cu_seqlens=cu).requires_grad_() for x in full[:3]]
                out, lse, _ = rf.ring_flash_attn_varlen_func(
                    *mine,
                    cu,
                    T,
                    layout=layout,
                    method="allgather",
                    heads_k_stride=stride,
                    return_attn_probs=True,
                    **MASKS[mask],
                )
                dout = rf.shard(full[3], dim=0, layout=layout, cu_seqlens=cu)
                results.append([out, lse, *torch.autograd.grad((out, lse), mine, (dout, dlse))])
        same[f"{layout}-{mask}"] = [_same_heads(a, b) for a, b in zip(*results, strict=True)]
    return same


def _same_heads(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` equals ``b`` up to float32 rounding: on the CPU, BLAS may sum one head's products in
    another order when a call holds another number of heads (it picks its kernels by shape)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_allgather_in_pieces_of_heads_equals_one_exchange():
    """Pieces of KV heads (each piece's calls overlap the next piece's transfer on a GPU) compute
    every head as one exchange does: the same outputs, LSE and gradients (up to the CPU's float32
    rounding, ``_same_heads``; bit for bit through the Triton kernels, the CUDA test below)."""
    for rank, cases in enumerate(spawn(_pieces_ranks, 3, timeout=300)):
        assert len(cases) == len(LAYOUTS) * len(MASKS), cases
        for case, same in cases.items():
            assert all(same), (rank, case, same)


def _simulated_pieces_case(backend: str, device: str, dtype: torch.dtype, dim: int, same) -> list[bool]:
    cu = torch.tensor([0, 3, 40, 41, 70, 96], dtype=torch.int32)
    full = [torch.randn(96, h, dim, device=device, dtype=dtype) for h in (4, 2, 2, 4)]
    parts = [[shard_for(x, r, 3, 0, "balanced", cu) for r in range(3)] for x in full]
    got = []
    with rf.use_backend(backend):
        for stride in (None, 1):
            kw = dict(causal=True, cu_seqlens=cu, method="allgather", heads_k_stride=stride)
            outs, lses, _ = simulate_ring_attn(*parts[:3], "balanced", **kw)
            grads = simulate_ring_attn_backward(parts[3], *parts[:3], outs, lses, "balanced", **kw)[:3]
            got.append([*outs, *lses, *(g for gs in grads for g in gs)])
    return [same(a, b) for a, b in zip(*got, strict=True)]


def test_simulated_allgather_in_pieces_of_heads_equals_one_exchange():
    """The simulator runs the pieces one after another: the same results (``_same_heads``)."""
    assert all(_simulated_pieces_case("torch", "cpu", torch.float32, 8, _same_heads))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_simulated_allgather_in_pieces_of_heads_equals_one_exchange_cuda():
    """Through the Triton kernels the pieces run on strided head views of the gathered keys: the
    same results bit for bit as one exchange of every head."""
    assert all(_simulated_pieces_case("triton", "cuda", torch.bfloat16, 128, torch.equal))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_calls_beside_the_shared_calls_change_no_bit_cuda(monkeypatch):
    """On a GPU a rank's calls on its own documents run on a second stream beside its calls on the
    gathered keys (``allgather._beside``): they write other rows, so the results and gradients
    are those of one stream bit for bit."""
    import ringflash.parallel.allgather as ag
    from ringflash.kernels.device import forget_side_streams, side_stream_devices

    forget_side_streams()  # made anew by this test's calls
    world, cu = 4, torch.tensor([0, 700, 760, 1100, 1150, 1900, 2048], dtype=torch.int32)
    plans = [gather_plan("balanced", tuple(cu.tolist()), r, world, True, (-1, 0)) for r in range(world)]
    assert any(p.write_once and p.local and p.shared for p in plans), "no rank takes the two streams"
    full = [torch.randn(2048, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2, 8)]
    parts = [[shard_for(x, r, world, 0, "balanced", cu) for r in range(world)] for x in full]
    got = []
    with rf.use_backend("triton"):
        for side in (True, False):
            if not side:
                monkeypatch.setattr(ag, "_two_streams", lambda plan: False)
            kw = dict(causal=True, cu_seqlens=cu, method="allgather", heads_k_stride=1)
            outs, lses, _ = simulate_ring_attn(*parts[:3], "balanced", **kw)
            grads = simulate_ring_attn_backward(parts[3], *parts[:3], outs, lses, "balanced", **kw)[:3]
            got.append([*outs, *lses, *(g for gs in grads for g in gs)])
    assert side_stream_devices("local documents"), "the second stream was used"
    assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))


def test_allgather_real_ranks_equal_the_simulation():
    """Real gloo ranks and the simulated ring messages run the same exchange and the same sums: the
    same outputs and gradients bit for bit; each rank receives exactly the gathered keys it reads."""
    for rank, (same, received, gathered) in enumerate(spawn(_allgather_ranks, 3, timeout=120)):
        assert same, rank
        assert received == gathered, (rank, received, gathered)


def _exchange_ranks(rank, world):
    """The all-gather's uneven exchange three ways on real gloo ranks: the collective, and ring posts
    received in place (``Post(into=True)``) over ``RingComm``; returns both and the rank's input."""
    from ringflash.comm.gather import start_exchange
    from ringflash.comm.ring import RingComm, run_on_group
    from ringflash.parallel.simulate import _exchange_by_posts

    sends = [(rank + d) % 3 for d in range(world)]  # rows to each rank, 0 included
    recvs = [(r + rank) % 3 for r in range(world)]
    x = torch.arange(sum(sends) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank
    collective = start_exchange(x, sends, recvs, None)()
    posts = run_on_group(_exchange_by_posts(x, sends, recvs, rank, world, 5), RingComm())
    return [t.tolist() for t in (x, collective, posts)], sends, recvs


def test_exchange_by_posts_receives_in_place_as_the_collective():
    """Ring posts that receive into their place of one buffer give the collective's result, on
    real ranks and in the simulator (whose copies into place are untimed, as transfers are)."""
    from ringflash.comm.ring import run_simulated
    from ringflash.parallel.simulate import _exchange_by_posts

    world = 3
    ranks = [
        (*(torch.tensor(t, dtype=torch.float32).view(-1, 2) for t in got), sends, recvs)
        for got, sends, recvs in spawn(_exchange_ranks, world, timeout=120)
    ]
    loops = [_exchange_by_posts(x, s, rv, r, world, 5) for r, (x, _, _, s, rv) in enumerate(ranks)]
    simulated, _ = run_simulated(loops)
    for r, (_, collective, posts, _, recvs) in enumerate(ranks):
        want = torch.cat([ranks[s][0][_block(ranks[s][3], r)] for s in range(world)])
        assert collective.shape[0] == sum(recvs) and want.shape[0] == sum(recvs), r
        assert torch.equal(collective, want), r
        assert torch.equal(posts, want), r
        assert torch.equal(simulated[r], want), r


def _block(sends: list[int], dst: int) -> slice:
    at = [0, *itertools.accumulate(sends)]
    return slice(at[dst], at[dst + 1])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "balanced"])
def test_allgather_gathers_only_the_keys_a_window_reaches(layout):
    """Two-sided windows without a causal mask: each rank gathers a shared document's keys only
    from its first query's reach to its last one's, and outputs and gradients still equal one
    process's call."""
    cu = torch.tensor([0, 3, 40, 41, 70, 120], dtype=torch.int32)
    T, world, window = 120, 3, (3, 4)
    full = [torch.randn(T, h, 8) for h in (4, 2, 2, 4)]
    with rf.use_backend("torch"):
        one = [x.clone().requires_grad_() for x in full[:3]]
        ref = rf.flash_attn_varlen_func(*one, cu, cu, 50, 50, window_size=window)
        ref_grads = torch.autograd.grad(ref, one, full[3])
        parts = [[shard_for(x, r, world, 0, layout, cu) for r in range(world)] for x in full]
        kw = dict(window_size=window, cu_seqlens=cu, method="allgather")
        outs, lses, _ = simulate_ring_attn(*parts[:3], layout, **kw)
        grads = simulate_ring_attn_backward(parts[3], *parts[:3], outs, lses, layout, **kw)[:3]
    for r in range(world):
        assert torch.allclose(outs[r], shard_for(ref, r, world, 0, layout, cu), atol=1e-5)
        for g, want in zip(grads, ref_grads, strict=True):
            assert torch.allclose(g[r], shard_for(want, r, world, 0, layout, cu), atol=1e-5)
    cuts = (layout, tuple(cu.tolist()))
    gathered = sum(sum(gather_plan(*cuts, r, world, False, window).recv) for r in range(world))
    whole = sum(sum(gather_plan(*cuts, r, world, False, (-1, -1)).recv) for r in range(world))
    assert gathered < whole, (gathered, whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_returned_rows_summed_in_one_pass_cuda():
    """The Triton backend's one-pass sum of returned dK/dV rows equals the torch operations bit
    for bit on a GPU, bfloat16 gradients included (both round their cast to nearest), and so does
    its one-pass gather of the outgoing K/V rows."""
    from ringflash.backends import Backend, get_backend

    parts = torch.randn(3000, 4, 128, device="cuda")
    sources = torch.randint(-1, 3000, (4, 2 * 700), device="cuda")
    rows = torch.randperm(1000, device="cuda")[:700]
    for dtype in (torch.float32, torch.bfloat16):
        grads = [torch.zeros(1000, 8, 128, dtype=dtype, device="cuda") for _ in range(4)]
        get_backend("triton").sum_rows_into(parts, grads[0][:, 4:], grads[1][:, 4:], sources, rows)
        Backend().sum_rows_into(parts, grads[2][:, 4:], grads[3][:, 4:], sources, rows)
        assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[3]), dtype
    k, v = (torch.randn(3000, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pick = torch.randperm(6000, device="cuda")[:2500]
    got = get_backend("triton").gather_rows(k[:, 4:], v[:, 4:], pick)
    assert torch.equal(got, Backend().gather_rows(k[:, 4:], v[:, 4:], pick)), "outgoing rows"
