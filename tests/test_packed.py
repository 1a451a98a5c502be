"""Packed documents across ranks: the layouts, the ring and the all-gather method, against one process.

Every case draws documents (lengths 1 and 0 included, some longer than a shard, one crossing three
shards), shards the stream in a layout, runs forward and backward, and compares every rank's
output, LSE and gradients with ``flash_attn_varlen_func`` on the whole stream in one process (and
that with the float64 oracle). The simulated ring (one process, virtual ranks) covers many shapes
quickly; real gloo processes at W = 2, 3 and 4 cover the public function.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from dist_utils import spawn
from oracle import assert_matches

import ringflash as rf
from ringflash.comm import Post, run_simulated
from ringflash.parallel.allgather import gather_plan
from ringflash.parallel.doc_layouts import _run_cost, doc_positions, doc_segments
from ringflash.parallel.ring_loop import TAG_KV, ring_fwd_loop
from ringflash.parallel.sharding import shard_for, unshard_from
from ringflash.parallel.simulate import simulate_plans, simulate_ring_attn, simulate_ring_attn_backward
from ringflash.reference import attention_varlen_ref

LAYOUTS = ("contiguous", "zigzag", "stripe", "balanced")
METHODS = ("ring", "allgather", "auto")
MASKS = {"causal": dict(causal=True), "full": dict(), "window": dict(causal=True, window_size=(5, 0))}


def _docs(rng: random.Random, world: int, n_local: int) -> torch.Tensor:
    """Global cu_seqlens of ``world * n_local`` tokens: short documents, 1- and 0-token ones, and a
    long one that crosses at least three shards (when there are three)."""
    total = world * n_local
    lens, left = [], total
    long_one = min(left, 2 * n_local + 3)
    while left > 0:
        n = long_one if len(lens) == 2 else rng.choice([0, 1, 1, 2, 3, 5, 9, 14])
        n = min(n, left)
        lens.append(n)
        left -= n
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_partition_the_stream_evenly(layout, world):
    rng = random.Random(world)
    for _ in range(20):
        cu = tuple(_docs(rng, world, rng.choice([1, 3, 7, 16])).tolist())
        parts = [doc_positions(layout, cu, r, world) for r in range(world)]
        assert {len(p) for p in parts} == {cu[-1] // world}, "every rank holds T / W tokens"
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(cu[-1])), "each token once"
        for r in range(world):
            segs = doc_segments(layout, cu, r, world)
            assert [s.doc for s in segs] == sorted(s.doc for s in segs), "documents in order"
            if layout == "zigzag" and world > 1:  # pieces r and 2W-1-r, nearly equal, in doc order
                for d, (a, b) in enumerate(itertools.pairwise(cu)):
                    mine = [s for s in segs if s.doc == d]
                    size = (b - a) // (2 * world)
                    assert all(size <= s.count <= size + 1 for s in mine)
                    assert [s.pos0 for s in mine] == sorted(s.pos0 for s in mine)
                    if len(mine) == 2:  # piece r, then piece 2W-1-r further on
                        assert mine[0].pos0 + mine[0].count <= mine[1].pos0


def test_shard_and_unshard_a_packed_stream_round_trip():
    cu = torch.tensor([0, 5, 6, 20, 21, 24], dtype=torch.int32)
    x = torch.arange(24 * 3).view(24, 3)
    for layout in LAYOUTS:
        shards = [shard_for(x, r, 4, 0, layout, cu) for r in range(4)]
        assert torch.equal(unshard_from(shards, 0, layout, cu), x)
    pos = torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(cu.tolist())])  # restart per doc
    assert torch.equal(
        shard_for(pos, 1, 4, 0, "zigzag", cu), pos[doc_positions("zigzag", tuple(cu.tolist()), 1, 4)]
    )
    with pytest.raises(ValueError, match="does not divide by the world size 5"):
        shard_for(x, 0, 5, 0, "zigzag", cu)
    with pytest.raises(TypeError, match="must be int32"):
        shard_for(x, 0, 4, 0, "zigzag", cu.long())


def _reference(q, k, v, cu, dout, **mask):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, lse = attention_varlen_ref(*leaves, cu, cu, **mask)
    grads = torch.autograd.grad(ref, leaves, dout.double())
    return ref, lse, grads


def _sim_case(world, n_local, layout, method, mask, seed, hk=2):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cu = _docs(rng, world, n_local)
    T = cu[-1].item()
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, hk, 8), torch.randn(T, hk, 8)
    dout = torch.randn_like(q)
    part = [[shard_for(x, r, world, 0, layout, cu) for r in range(world)] for x in (q, k, v, dout)]
    outs, lses, _ = simulate_ring_attn(*part[:3], layout, cu_seqlens=cu, method=method, **mask)
    dqs, dks, dvs, _ = simulate_ring_attn_backward(
        part[3], *part[:3], outs, lses, layout, cu_seqlens=cu, method=method, **mask
    )
    ref, rlse, rgrads = _reference(q, k, v, cu, dout, **mask)
    got = [unshard_from(xs, 0, layout, cu) for xs in (outs, dqs, dks, dvs)]
    lse = unshard_from([x.t() for x in lses], 0, layout, cu).t()
    assert_matches(f"{layout}/{method} lse", lse, rlse, None, 2)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, (ref, *rgrads), strict=True):
        assert_matches(f"{layout}/{method} W{world} {name}", g, r, None, 2)


@pytest.mark.parametrize("mask", list(MASKS), ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_simulated_packed_matches_oracle(world, layout, method, mask, small_blocks):
    for seed in range(3):
        _sim_case(world, 11 if world == 3 else 12, layout, method, MASKS[mask], seed)


def _long_and_short(world: int, n_local: int, seed: int) -> torch.Tensor:
    """A document longer than a shard, one of half a shard, the rest short (0 and 1 included)."""
    rng = random.Random(seed)
    lens, left = [5 * n_local // 4, 37, 11 * n_local // 20, 1, 0], world * n_local
    left -= sum(lens)
    while left > 0:
        lens.append(min(left, rng.randint(1, n_local // 4)))
        left -= lens[-1]
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _holders(cu, world):
    segs = [doc_segments("balanced", cu, r, world) for r in range(world)]
    holders = {
        d: sorted({r for r in range(world) for s in segs[r] if s.doc == d}) for d in range(len(cu) - 1)
    }
    return segs, holders


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_balanced_layout_keeps_short_documents_whole(world):
    n_local = 512 * world
    cu = tuple(_long_and_short(world, n_local, world).tolist())
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    segs, holders = _holders(cu, world)
    for r in range(world):
        assert [(s.doc, s.pos0) for s in segs[r]] == sorted((s.doc, s.pos0) for s in segs[r]), "doc order"
        assert sum(s.count for s in segs[r]) == n_local
    assert len(holders[0]) >= 2, "a document longer than a shard is spread"
    for d, rs in holders.items():  # a spread document: each holder takes one piece from each end
        runs = sorted((s.pos0, s.count, r) for r in rs for s in segs[r] if s.doc == d)
        assert sum(c for _, c, _ in runs) == lengths[d]
        assert all(p + c == q for (p, c, _), (q, _, _) in itertools.pairwise(runs)), runs
        order = [r for *_, r in runs]
        if len(rs) > 1 and order == [r for r, _ in itertools.groupby(order)] and len(order) == 2 * len(rs):
            assert order == order[: len(rs)] + order[: len(rs)][::-1], order
        assert all(order.count(r) <= 2 for r in rs), order
    cut_short = [d for d, rs in holders.items() if lengths[d] < 4 * 128 and len(rs) > 1]
    assert len(cut_short) <= world - 1, "a short document is cut only to fill a rank's last tokens"
    work = [sum(_run_cost(s.pos0, s.count) for s in ss) for ss in segs]  # the layout's cost model
    assert max(work) <= 1.1 * sum(work) / world, work
    one = (0, world * n_local)  # one document: zigzag over every rank
    _, h = _holders(one, world)
    assert h[0] == list(range(world))
    equal = tuple(range(0, 8 * 8192 + 1, 1024))  # 1k documents, 8 ranks: nothing travels
    assert all(len(doc_segments("balanced", equal, r, 8)) == 8 for r in range(8))
    plan = simulate_plans(8, 8192, "balanced", True, (-1, -1), torch.tensor(equal, dtype=torch.int32))[0]
    assert plan.reach == (0,) * 8 and plan.n_steps == 1, plan.reach
    assert not gather_plan("balanced", equal, 0, 8, True, (-1, -1)).moves, "the all-gather sends nothing"
    n_sent = 0
    for r in range(world):  # the rows of documents held by several ranks, to the ranks that read them
        plan = gather_plan("balanced", cu, r, world, True, (-1, -1))
        want = [s.local0 + i for s in segs[r] if len(holders[s.doc]) > 1 for i in range(s.count)]
        assert plan.own.tolist() == want
        for d in range(world):
            reads = {s.doc for s in segs[d]}
            want_d = [
                s.local0 + i
                for s in segs[r]
                if len(holders[s.doc]) > 1 and s.doc in reads
                for i in range(s.count)
            ]
            assert plan.send[d].tolist() == want_d, (r, d)
            assert plan.own[plan.home[d]].tolist() == want_d, "where each row's gradient comes back"
            assert gather_plan("balanced", cu, d, world, True, (-1, -1)).recv[r] == len(want_d)
        n_sent += sum(len(x) for d, x in enumerate(plan.send) if d != r)
        assert plan.write_once and plan.covers_all, "each row written once, in the input dtype"
    assert n_sent < (world - 1) * world * n_local
    assert not gather_plan("stripe", cu, 0, world, True, (-1, -1)).write_once


@pytest.mark.parametrize("world", [2, 4, 8])
def test_balanced_layout_pieces_fill_kernel_tiles(world):
    """Long-tailed documents: few are cut, their pieces are whole query tiles, and the slowest
    rank's work (pairs rounded to tiles) is close to a fair share."""
    rng = random.Random(world)
    lens, left = [], world * 8192
    while left > 0:
        lens.append(min(left, max(64, int(4096 / 3 * rng.paretovariate(1.5)))))
        left -= lens[-1]
    cu = tuple(itertools.accumulate(lens, initial=0))
    segs, holders = _holders(cu, world)
    n_runs = sum(len(ss) for ss in segs)
    assert n_runs < 2 * world * len(lens), (n_runs, "zigzag makes", 2 * world * len(lens))
    pieces = [s for ss in segs for s in ss if len(holders[s.doc]) > 1 and s.pos0 + s.count < lens[s.doc]]
    whole_tiles = sum(s.count % 128 == 0 for s in pieces)
    assert whole_tiles >= 0.6 * len(pieces), [s.count for s in pieces]
    tiled = [sum(-(-s.count // 128) * 128 * (s.pos0 + s.count / 2) for s in ss) for ss in segs]
    fair = sum(-(-n // 128) * 128 * n / 2 for n in lens) / world
    assert max(tiled) <= 1.15 * fair, [round(t / fair, 3) for t in tiled]


@pytest.mark.parametrize("method", ["ring", "allgather"])
@pytest.mark.parametrize("world", [2, 3])
def test_balanced_layout_with_long_documents_matches_oracle(world, method):
    _long_documents_case(world, method, (dict(causal=True), dict(causal=True, window_size=(300, 0))))


def _long_documents_case(world, method, masks):
    """Long documents spread over ranks in tile-multiple pieces (so the all-gather method runs a
    rank's two runs of a document as one two-part sequence) against the oracle."""
    torch.manual_seed(world)
    cu = _long_and_short(world, 512 * world, seed=7)
    T = cu[-1].item()
    q, k, v = torch.randn(T, 2, 8), torch.randn(T, 1, 8), torch.randn(T, 1, 8)
    dout = torch.randn_like(q)
    for mask in masks:
        part = [[shard_for(x, r, world, 0, "balanced", cu) for r in range(world)] for x in (q, k, v, dout)]
        outs, lses, _ = simulate_ring_attn(*part[:3], "balanced", cu_seqlens=cu, method=method, **mask)
        dqs, dks, dvs, _ = simulate_ring_attn_backward(
            part[3], *part[:3], outs, lses, "balanced", cu_seqlens=cu, method=method, **mask
        )
        ref, _, rgrads = _reference(q, k, v, cu, dout, **mask)
        got = [unshard_from(xs, 0, "balanced", cu) for xs in (outs, dqs, dks, dvs)]
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, (ref, *rgrads), strict=True):
            assert_matches(f"balanced/{method} W{world} {mask} {name}", g, r, None, 2)


def test_single_document_equals_the_padded_ring(small_blocks):
    """One document of 2W * m tokens: the packed zigzag shards are the padded zigzag shards, and the
    two rings give the same result."""
    W, S = 4, 32
    q, k, v = torch.randn(1, S, 4, 8), torch.randn(1, S, 2, 8), torch.randn(1, S, 2, 8)
    cu = torch.tensor([0, S], dtype=torch.int32)
    padded = [[shard_for(x, r, W, 1, "zigzag") for r in range(W)] for x in (q, k, v)]
    packed = [[shard_for(x[0], r, W, 0, "zigzag", cu) for r in range(W)] for x in (q, k, v)]
    assert all(
        torch.equal(a[0], b)
        for xs, ys in zip(padded, packed, strict=True)
        for a, b in zip(xs, ys, strict=True)
    )
    want, _, _ = simulate_ring_attn(*padded, "zigzag", causal=True)
    for method in METHODS:
        got, _, _ = simulate_ring_attn(*packed, "zigzag", causal=True, cu_seqlens=cu, method=method)
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(a[0], b, atol=2e-6, rtol=2e-6)
    for layout in ("zigzag", "balanced"):  # the ring method runs as the padded ring itself
        mine = [[shard_for(x[0], r, W, 0, layout, cu) for r in range(W)] for x in (q, k, v)]
        got, _, _ = simulate_ring_attn(*mine, layout, causal=True, cu_seqlens=cu)
        assert all(torch.equal(a[0], b) for a, b in zip(want, got, strict=True)), layout


def _single_document_ranks(rank, world):
    torch.manual_seed(0)
    S = 8 * world
    q, k, v = torch.randn(1, S, 4, 8), torch.randn(1, S, 2, 8), torch.randn(1, S, 2, 8)
    cu = torch.tensor([0, S], dtype=torch.int32)
    with rf.use_backend("torch"):
        mine = [rf.shard(x, dim=1, layout="zigzag").requires_grad_() for x in (q, k, v)]
        want = rf.zigzag_ring_flash_attn_func(*mine, causal=True)
        want_grads = torch.autograd.grad(want.sum(), mine)
        same = {}
        for layout in ("zigzag", "balanced"):
            packed = [rf.shard(x[0], dim=0, layout=layout, cu_seqlens=cu).requires_grad_() for x in (q, k, v)]
            got = rf.ring_flash_attn_varlen_func(*packed, cu, S, causal=True, layout=layout)
            grads = torch.autograd.grad(got.sum(), packed)
            same[layout] = torch.equal(got, want[0]) and all(
                torch.equal(a, b[0]) for a, b in zip(grads, want_grads, strict=True)
            )
    return same


def test_single_document_runs_the_padded_ring_on_real_ranks():
    """ring_flash_attn_varlen_func on one document (zigzag or balanced shards) runs the padded
    zigzag ring: the same output and gradients, bit for bit."""
    for rank, same in enumerate(spawn(_single_document_ranks, 2, timeout=120)):
        assert all(same.values()), (rank, same)


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
    from ringflash.parallel.method_cost import gathered_rows, pair_counts

    cu, world = (0, 1, 700, 1500, 1520, 3000, 4096), 4
    for window, per_doc in (
        ((-1, 0), lambda n: n * (n + 1) // 2),
        ((50, 0), lambda n: sum(min(i, 50) + 1 for i in range(n))),
    ):
        pairs = pair_counts(layout, cu, world, True, window)
        assert sum(map(sum, pairs)) == sum(per_doc(b - a) for a, b in itertools.pairwise(cu)), window
    recv = gathered_rows(layout, cu, world)
    if layout != "stripe":  # the all-gather runs stripe as the ring's pieces over the whole stream
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


def test_packed_plans_are_kept_and_gradient_mode_is_read_per_call():
    """The packed plan of a call signature is built once; whether a backward follows is read anew
    on every call (never kept with the tensors: that would go stale and hold them alive)."""
    from ringflash.parallel import ring_attn

    ring_attn._cached_doc_plan.cache_clear()
    args = ("balanced", (0, 40, 64), 0, 2, True, (-1, 0))
    assert ring_attn._cached_doc_plan(*args) is ring_attn._cached_doc_plan(*args)
    q = torch.randn(4, 2, 8, requires_grad=True)
    assert ring_attn._grads(q, q, q)
    with torch.no_grad():
        assert not ring_attn._grads(q, q, q)
    assert not hasattr(ring_attn._grads, "cache_info")


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


def _kv_messages(world, n_local, cu, layout):
    """K/V posts per rank of the simulated forward ring (plain, one block per step)."""
    plans = simulate_plans(world, n_local, layout, True, (-1, -1), cu)
    counts = [0] * world

    def counting(loop, r):
        answer = None
        try:
            while True:
                req = loop.send(answer)
                if isinstance(req, Post) and req.tag == TAG_KV and req.tensors:
                    counts[r] += 1
                answer = yield req
        except StopIteration as stop:
            return stop.value

    x = torch.randn(world * n_local, 2, 8)
    loops = []
    for r, p in enumerate(plans):
        xl = shard_for(x, r, world, 0, layout, cu)
        backend = rf.backends.get_backend("torch")
        loops.append(counting(ring_fwd_loop(backend, xl, xl, xl, p, 0.3, 0.0, True, 1), r))
    run_simulated(loops)
    return counts, plans


def test_short_documents_make_the_ring_a_neighbour_exchange():
    """Documents shorter than a shard: each block goes one hop (to the rank its last document
    reaches into), never around the ring; a long document sends its blocks farther, and only those."""
    W, n = 6, 10
    short = torch.tensor([0, 4, 9, 15, 22, 27, 33, 38, 45, 52, 58, 60], dtype=torch.int32)
    counts, plans = _kv_messages(W, n, short, "contiguous")
    assert max(p.reach[r] for p in plans for r in range(W)) == 1
    assert counts == [1] * (W - 1) + [0], counts  # the last rank's block has nowhere to go
    one_long = torch.tensor([0, 3, 45, 60], dtype=torch.int32)  # tokens 3..44 span ranks 0..4
    counts, plans = _kv_messages(W, n, one_long, "contiguous")
    assert plans[0].reach == (4, 3, 2, 1, 1, 0), plans[0].reach
    assert counts == [1, 2, 3, 4, 1, 0], counts  # each rank forwards only what still has to go on
    full, _ = _kv_messages(W, n, torch.tensor([0, 60], dtype=torch.int32), "zigzag")
    assert full == [W - 1] * W


def _run_cases(rank, world, cases, device="cpu", heads_k_stride=None):
    torch.manual_seed(0)
    failures = {}
    for cid, (layout, method, mask, seed) in cases.items():
        try:
            rng = random.Random(seed)
            cu = _docs(rng, world, 12).to(device)
            T = cu[-1].item()
            q, k, v = (torch.randn(T, h, 8, device=device) for h in (4, 2, 2))
            dout = torch.randn_like(q)
            with rf.use_backend("torch"):
                full = [t.clone().requires_grad_() for t in (q, k, v)]
                want, want_lse, _ = rf.flash_attn_varlen_func(
                    *full, cu, cu, T, T, return_attn_probs=True, **MASKS[mask]
                )
                want_grads = torch.autograd.grad(want, full, dout)
                mine = [rf.shard(t, dim=0, layout=layout, cu_seqlens=cu).requires_grad_() for t in (q, k, v)]
                out, lse, _ = rf.ring_flash_attn_varlen_func(
                    *mine,
                    cu,
                    T,
                    layout=layout,
                    method=method,
                    return_attn_probs=True,
                    heads_k_stride=heads_k_stride,
                    **MASKS[mask],
                )
                grads = torch.autograd.grad(out, mine, rf.shard(dout, dim=0, layout=layout, cu_seqlens=cu))
            idx = doc_positions(layout, tuple(cu.tolist()), rank, world).to(device)
            assert_matches("out", out, want[idx].double(), None, 2)
            assert_matches("lse", lse, want_lse[:, idx].double(), None, 2)
            for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
                assert_matches(name, g, w[idx].double(), None, 2)
        except Exception as e:  # noqa: BLE001 - reported per case to the parent
            failures[cid] = repr(e)
    return failures


REAL_CASES = {
    f"{layout}-{method}-{mask}": (layout, method, mask, i)
    for i, (layout, method, mask) in enumerate(itertools.product(LAYOUTS, METHODS, MASKS))
}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_real_ranks_match_one_process(world):
    results = spawn(_run_cases, world, REAL_CASES, timeout=300)
    failures = [f"rank {r} {cid}: {msg}" for r, res in enumerate(results) for cid, msg in res.items()]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("heads_k_stride", [None, 1])
def test_real_ranks_match_one_process_nccl(world, heads_k_stride):
    """The same cases over NCCL, one GPU per rank (the all-gather's uneven all-to-all, whole and
    in pieces of one KV head), the blockwise backend in float32."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    results = spawn(_run_cases, world, REAL_CASES, "cuda", heads_k_stride, timeout=600, backend="nccl")
    failures = [f"rank {r} {cid}: {msg}" for r, res in enumerate(results) for cid, msg in res.items()]
    assert not failures, "\n".join(failures)


def _bad(rank, world):
    q = torch.randn(6, 2, 8)
    msgs = {}
    cu = torch.tensor([0, 5, 12] if rank == 0 else [0, 7, 12], dtype=torch.int32)
    for name, call in (
        ("cu differs", lambda: rf.ring_flash_attn_varlen_func(q, q, q, cu, 7, layout="zigzag")),
        (
            "method",
            lambda: rf.ring_flash_attn_varlen_func(q, q, q, cu, 7, method="gather" if rank else "ring"),
        ),
        (
            "layout",
            lambda: rf.ring_flash_attn_varlen_func(
                q[:5], q[:5], q[:5], torch.tensor([0, 10], dtype=torch.int32), 10, layout="zag"
            ),
        ),
        (
            "stride",  # rank 1 asks for pieces of 3 of the 2 KV heads
            lambda: rf.ring_flash_attn_varlen_func(
                q,
                q,
                q,
                torch.tensor([0, 12], dtype=torch.int32),
                12,
                method="allgather",
                heads_k_stride=rank * 3 or 1,
            ),
        ),
        (
            "strides differ",
            lambda: rf.ring_flash_attn_varlen_func(
                q,
                q,
                q,
                torch.tensor([0, 12], dtype=torch.int32),
                12,
                method="allgather",
                heads_k_stride=rank + 1,
            ),
        ),
        (
            "gradients",  # "auto" would price a backward on one rank only
            lambda: rf.ring_flash_attn_varlen_func(
                q.clone().requires_grad_(rank == 0),
                q,
                q,
                torch.tensor([0, 5, 12], dtype=torch.int32),
                7,
                method="auto",
            ),
        ),
    ):
        try:
            call()
            msgs[name] = "no error"
        except ValueError as e:
            msgs[name] = str(e)
    odd = torch.randn(5, 2, 8)  # 15 tokens over 3 ranks is fine; 10 over ... checked below
    try:
        rf.shard(odd, dim=0, layout="zigzag", cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
        msgs["not divisible"] = "no error"
    except ValueError as e:
        msgs["not divisible"] = str(e)
    return msgs


def test_bad_packed_input_raises_on_every_rank():
    for rank, msgs in enumerate(spawn(_bad, 2, timeout=120)):
        assert "disagree on cu_seqlens (rank 0: [0, 5, 12], rank 1: [0, 7, 12])" in msgs["cu differs"], (
            rank,
            msgs,
        )
        assert "unknown method 'gather'" in msgs["method"], (rank, msgs)
        assert "unknown layout 'zag'" in msgs["layout"], (rank, msgs)
        assert "disagree on gradients (rank 0: True, rank 1: False)" in msgs["gradients"], (rank, msgs)
        want = "rank 1: heads_k_stride must be None or a positive divisor of the KV heads (2): got 3"
        assert want in msgs["stride"], (rank, msgs)
        assert "disagree on heads_k_stride (rank 0: 1, rank 1: 2)" in msgs["strides differ"], (rank, msgs)
        assert "does not divide by the world size 2" in msgs["not divisible"], (rank, msgs)


_TRITON_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import torch
import ringflash as rf
from test_packed import _long_documents_case, _sim_case, _two_part_case, _written_gradients_case
with rf.use_backend("triton"):
    for layout, method, world, mask in (
        ("zigzag", "ring", 3, dict(causal=True)),
        ("zigzag", "allgather", 2, dict(causal=True, window_size=(5, 0))),
        ("stripe", "ring", 2, dict()),
        ("contiguous", "allgather", 3, dict(causal=True)),
        ("balanced", "allgather", 2, dict(causal=True)),
    ):
        _sim_case(world, 8, layout, method, mask, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        _written_gradients_case(rf.backends.get_backend("triton"), dtype)
    err = _two_part_case(rf.backends.get_backend("triton"))
    assert err < 1e-4, err
    _long_documents_case(2, "allgather", [dict(causal=True)])
print("ok")
"""


def _written_gradients_case(backend, dtype, device="cpu"):
    """``attn_bwd`` with given buffers and ``accumulate=(False, True)``: dQ written in the buffer's
    dtype, dK/dV added; the spacer sequences' rows (no keys / no queries) keep what they held."""
    torch.manual_seed(0)
    cu_q, cu_k = [0, 5, 9, 9, 16], [0, 7, 7, 12, 20]  # sequence 1: no keys; sequence 2: no queries
    q, k, v = (torch.randn(n, h, 8, dtype=dtype, device=device) for n, h in ((16, 4), (20, 2), (20, 2)))
    dout = torch.randn(16, 4, 8, dtype=dtype, device=device)
    kw = dict(
        softmax_scale=8**-0.5,
        causal=True,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=7,
        max_seqlen_k=8,
    )
    out, lse = backend.attn_fwd(q, k, v, **kw)
    want = backend.attn_bwd(dout, q, k, v, out, lse, **kw)
    dq = torch.full(q.shape, 7.0, dtype=dtype, device=device)
    dk, dv = torch.ones(k.shape, device=device), torch.ones(v.shape, device=device)
    backend.attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, accumulate=(False, True), **kw)
    assert (dq[5:9] == 7).all(), "rows of a sequence with no keys are left as they are"
    assert (dk[7:12] == 1).all() and (dv[7:12] == 1).all(), "keys of a sequence with no queries too"
    rows, keys = [*range(5), *range(9, 16)], [*range(7), *range(12, 20)]
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dq[rows].float(), want[0][rows].float(), **tol)
    torch.testing.assert_close(dk[keys] - 1, want[1][keys].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dv[keys] - 1, want[2][keys].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gradients_written_into_given_buffers(dtype):
    _written_gradients_case(rf.backends.get_backend("torch"), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_gradients_written_into_given_buffers_cuda():
    for dtype in (torch.float32, torch.bfloat16):
        _written_gradients_case(rf.backends.get_backend("triton"), dtype, "cuda")


def test_packed_calls_through_the_triton_kernels_under_the_interpreter():
    """The packed calls' spacer sequences (no keys, or no queries) through the Triton kernels."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=repo)
    r = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def _two_part_case(backend, device="cpu", dtype=torch.float32):
    """A packed call with a two-part sequence (a rank's head and tail runs of one document against
    the document's keys, ``diag_offset`` rows ``(diag, split, diag2)``), an ordinary causal sequence
    and a spacer, through ``backend``: output, LSE and gradients against the float64 oracle of the
    same masks. Returns the largest error relative to the oracle's largest value."""
    torch.manual_seed(0)
    # Sequence 0: head rows at positions 128..255, tail rows at 384..483, keys 0..483 of the
    # document. Sequence 1: 50 rows at positions 30..79 of a 80-key document. Sequence 2: a spacer.
    cu_q, cu_k = [0, 228, 278, 278], [0, 484, 564, 570]
    diag = torch.tensor([[128, 128, 256], [30, 50, 30], [0, 0, 0]], dtype=torch.int32, device=device)
    T, Tk = cu_q[-1], cu_k[-1]
    q, k, v = (torch.randn(n, h, 16, device=device).to(dtype) for n, h in ((T, 4), (Tk, 2), (Tk, 2)))
    dout = torch.randn(T, 4, 16, device=device).to(dtype)
    kw = dict(
        softmax_scale=0.25,
        causal=True,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=228,
        max_seqlen_k=484,
        diag_offset=diag,
    )
    out, lse = backend.attn_fwd(q, k, v, **kw)
    dq, dk, dv = backend.attn_bwd(dout, q, k, v, out, lse, **kw)
    leaves = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    outs, lses = [], []
    for b in range(2):
        d, split, d2 = diag[b].tolist()
        rows = torch.arange(cu_q[b + 1] - cu_q[b])
        reach = torch.where(rows < split, rows + d, rows + d2)
        seen = torch.arange(cu_k[b + 1] - cu_k[b])[None, :] <= reach[:, None]
        qb = leaves[0][cu_q[b] : cu_q[b + 1]]
        kb, vb = (x[cu_k[b] : cu_k[b + 1]].repeat_interleave(2, 1) for x in leaves[1:])
        s = torch.einsum("qhd,khd->hqk", qb, kb) * 0.25
        s = s.masked_fill(~seen, -math.inf)
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vb))
    want = torch.cat(outs)
    grads = torch.autograd.grad(want, leaves, dout.double().cpu())
    want, lses = want.detach(), [x.detach() for x in lses]
    errs = [
        (out.double().cpu() - want).abs().max() / want.abs().max(),
        (lse.cpu()[:, :278] - torch.cat(lses, 1)).abs().max(),
    ]
    for got, w in zip((dq, dk, dv), grads, strict=True):
        errs.append((got.double().cpu()[: w.shape[0]] - w).abs().max() / w.abs().max())
    return max(float(e) for e in errs)


def test_two_part_sequences_match_the_oracle():
    """The blockwise backend's two-part diagonals (``varlen_diag``) against the float64 oracle."""
    assert _two_part_case(rf.backends.get_backend("torch")) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_part_sequences_through_the_triton_kernels_cuda():
    assert _two_part_case(rf.backends.get_backend("triton"), "cuda", torch.bfloat16) < 2e-2


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
        same[f"{layout}-{mask}"] = [torch.equal(a, b) for a, b in zip(*results, strict=True)]
    return same


def test_allgather_in_pieces_of_heads_equals_one_exchange():
    """Pieces of KV heads (each piece's calls overlap the next piece's transfer on a GPU) compute
    every head exactly as one exchange does: bitwise the same outputs, LSE and gradients."""
    for rank, cases in enumerate(spawn(_pieces_ranks, 3, timeout=300)):
        assert len(cases) == len(LAYOUTS) * len(MASKS), cases
        for case, same in cases.items():
            assert all(same), (rank, case, same)


def test_simulated_allgather_in_pieces_of_heads_equals_one_exchange():
    """The simulator runs the pieces one after another: the same results bit for bit."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 40, 41, 70, 96], dtype=torch.int32)
    full = [torch.randn(96, h, 8) for h in (4, 2, 2, 4)]
    parts = [[shard_for(x, r, 3, 0, "balanced", cu) for r in range(3)] for x in full]
    got = []
    with rf.use_backend("torch"):
        for stride in (None, 1):
            kw = dict(causal=True, cu_seqlens=cu, method="allgather", heads_k_stride=stride)
            outs, lses, _ = simulate_ring_attn(*parts[:3], "balanced", **kw)
            grads = simulate_ring_attn_backward(parts[3], *parts[:3], outs, lses, "balanced", **kw)[:3]
            got.append([*outs, *lses, *(g for gs in grads for g in gs)])
    assert all(torch.equal(a, b) for a, b in zip(*got, strict=True))


def test_allgather_real_ranks_equal_the_simulation():
    """Real gloo ranks and the simulated ring messages run the same exchange and the same sums: the
    same outputs and gradients bit for bit; each rank receives exactly the gathered keys it reads."""
    for rank, (same, received, gathered) in enumerate(spawn(_allgather_ranks, 3, timeout=120)):
        assert same, rank
        assert received == gathered, (rank, received, gathered)
