"""The ring loop in one process (virtual ranks), the per-step plans, and bf16 drift with world size."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import assert_matches, max_err

import ringflash.parallel as rp
from ringflash.backends import use_backend
from ringflash.parallel.layouts import build_plan, step_pieces
from ringflash.reference import attention_ref, attention_varlen_ref


def _sim(q, k, v, dout, world, layout, dim=1, cu=None, **kw):
    """Shard, run the simulated ring fwd+bwd, and gather the results."""

    def sh(x):
        return [rp.shard_for(x, r, world, dim, layout) for r in range(world)]

    qs, ks, vs = sh(q), sh(k), sh(v)
    outs, lses, _ = rp.simulate_ring_attn(qs, ks, vs, layout, cu_seqlens=cu, **kw)
    dqs, dks, dvs, _ = rp.simulate_ring_attn_backward(
        sh(dout), qs, ks, vs, outs, lses, layout, cu_seqlens=cu, **kw
    )
    return [rp.unshard_from(x, dim, layout) for x in (outs, dqs, dks, dvs)] + [lses]


def _ref(q, k, v, dout, cu=None, upcast=True, **kw):
    xs = [
        x.detach().clone().requires_grad_()
        for x in ((q, k, v) if not upcast else (q.double(), k.double(), v.double()))
    ]
    if cu is None:
        out, lse = attention_ref(*xs, upcast=upcast, **kw)
    else:
        out, lse = attention_varlen_ref(*xs, cu, cu, upcast=upcast, **kw)
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, xs[0].grad, xs[1].grad, xs[2].grad


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("world", [4, 5])
@pytest.mark.parametrize(
    "mask", [dict(causal=True), dict(causal=True, window_size=(9, 0)), dict(window_size=(4, 7))], ids=str
)
def test_simulated_ring_matches_oracle(layout, world, mask, small_blocks):
    """Forward and backward of every layout and mask."""
    L = 10
    q, k, v = (
        torch.randn(2, world * L, 4, 16),
        torch.randn(2, world * L, 2, 16),
        torch.randn(2, world * L, 2, 16),
    )
    dout = torch.randn_like(q)
    with use_backend("torch"):
        out, dq, dk, dv, _ = _sim(q, k, v, dout, world, layout, **mask)
    ref, _, rdq, rdk, rdv = _ref(q, k, v, dout, **mask)
    for name, got, want in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_matches(f"{layout} W{world} {name}", got, want, None, 2)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("prefetch", [2, 3, 9])
def test_forward_prefetch_matches_oracle(layout, prefetch, small_blocks):
    """Ranks holding several K/V blocks and computing them together (fused calls over keys laid
    end to end, partial last groups, more blocks asked for than the ring has) give the oracle's
    forward, and the backward from that forward is exact too."""
    world, L = 5, 10
    q, k, v = (
        torch.randn(2, world * L, 4, 16),
        torch.randn(2, world * L, 2, 16),
        torch.randn(2, world * L, 2, 16),
    )
    dout = torch.randn_like(q)
    sh = lambda x: [rp.shard_for(x, r, world, 1, layout) for r in range(world)]  # noqa: E731
    for mask in (dict(causal=True), dict(causal=True, window_size=(12, 0)), dict(window_size=(4, 7)), dict()):
        with use_backend("torch"):
            outs, lses, _ = rp.simulate_ring_attn(sh(q), sh(k), sh(v), layout, prefetch=prefetch, **mask)
            dqs, dks, dvs, _ = rp.simulate_ring_attn_backward(
                sh(dout), sh(q), sh(k), sh(v), outs, lses, layout, **mask
            )
        ref, rlse, rdq, rdk, rdv = _ref(q, k, v, dout, **mask)
        got = [rp.unshard_from(x, 1, layout) for x in (outs, dqs, dks, dvs)]
        for name, g, want in zip(("out", "dq", "dk", "dv"), got, (ref, rdq, rdk, rdv), strict=True):
            assert_matches(f"{layout} p{prefetch} {mask} {name}", g, want, None, 2)
        lse = rp.unshard_from([x.transpose(1, 2) for x in lses], 1, layout).transpose(1, 2)
        assert_matches(f"{layout} p{prefetch} {mask} lse", lse, rlse, None, 2)


def test_forward_prefetch_varlen(small_blocks):
    world, L = 4, 11
    cu = torch.tensor([0, 4, 4, 20, 21, 40, 44], dtype=torch.int32)
    q, k, v = torch.randn(world * L, 4, 8), torch.randn(world * L, 1, 8), torch.randn(world * L, 1, 8)
    for mask in (dict(causal=True), dict()):
        qs, ks, vs = ([x[r * L : (r + 1) * L] for r in range(world)] for x in (q, k, v))
        outs, lses, _ = rp.simulate_ring_attn(qs, ks, vs, cu_seqlens=cu, prefetch=2, **mask)
        ref, rlse, *_ = _ref(q, k, v, torch.randn_like(q), cu=cu, **mask)
        assert_matches(f"varlen p2 {mask} out", torch.cat(outs), ref, None, 2)
        assert_matches(f"varlen p2 {mask} lse", torch.cat(lses, -1), rlse, None, 2)


def test_forward_prefetch_fuses_steps_into_fewer_calls():
    """Zigzag, causal, W=8: every remote step of a rank is one unmasked call over half a block.
    Held several at a time, steps of the same kind (keys of an earlier rank, or of a later one)
    become one call over their keys together, with the same result."""
    from ringflash.backends import backend_for
    from ringflash.comm.ring import run_simulated
    from ringflash.parallel.ring_loop import ring_fwd_loop

    W, L = 8, 16
    base = backend_for(torch.zeros(1))

    class Counting:
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(base, name)

        def attn_fwd(self, *a, **kw):
            self.calls += 1
            return base.attn_fwd(*a, **kw)

    qs, ks, vs = ([torch.randn(1, L, 2, 8) for _ in range(W)] for _ in range(3))
    plans = [build_plan("zigzag", r, W, L, True, (-1, -1)) for r in range(W)]
    calls, results = {}, {}
    for prefetch in (1, 2, 7):
        backends = [Counting() for _ in range(W)]
        loops = [
            ring_fwd_loop(be, q, k, v, p, 0.3, 0.0, False, prefetch)
            for be, q, k, v, p in zip(backends, qs, ks, vs, plans, strict=True)
        ]
        results[prefetch], _ = run_simulated(loops)
        calls[prefetch] = [be.calls for be in backends]
    assert calls[1] == [W] * W  # the own block and 7 steps
    # Two at a time: the own block and 4 groups, one of which may mix the two kinds.
    assert all(c <= 6 for c in calls[2]) and sum(calls[2]) < sum(calls[1])
    # All at once: the own block, the earlier ranks' keys, the later ranks' keys.
    assert calls[7] == [2] + [3] * (W - 2) + [2]
    for prefetch in (2, 7):
        for (o, lse), (o1, lse1) in zip(results[prefetch], results[1], strict=True):
            torch.testing.assert_close(o, o1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse, lse1, rtol=1e-5, atol=1e-6)


def test_simulated_varlen_documents_cross_shards():
    world, L = 4, 11
    cu = torch.tensor([0, 4, 4, 20, 21, 40, 44], dtype=torch.int32)  # docs span 1-2 shard edges
    q, k, v = torch.randn(world * L, 4, 8), torch.randn(world * L, 1, 8), torch.randn(world * L, 1, 8)
    dout = torch.randn_like(q)
    for mask in (dict(causal=True), dict(causal=True, window_size=(6, 0)), dict()):
        out, dq, dk, dv, lses = _sim(q, k, v, dout, world, "contiguous", dim=0, cu=cu, **mask)
        ref, rlse, rdq, rdk, rdv = _ref(q, k, v, dout, cu=cu, **mask)
        assert_matches(f"varlen {mask} lse", torch.cat(lses, -1), rlse, None, 2)
        for name, got, want in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
            assert_matches(f"varlen {mask} {name}", got, want, None, 2)


def test_causal_plans_skip_masked_blocks_and_balance_work():
    W, L = 4, 8
    for r in range(W):
        plan = build_plan("contiguous", r, W, L, True, (-1, -1))
        assert plan.n_steps == W
        assert [len(s) > 0 for s in plan.steps] == [t <= r for t in range(W)], (
            f"rank {r}: masked steps computed"
        )
        zig = build_plan("zigzag", r, W, L, True, (-1, -1))
        for t in range(1, W):  # every later step: one unmasked call over half of the block
            (pc,) = zig.steps[t]
            assert pc.full and (pc.q1 - pc.q0) * (pc.k1 - pc.k0) == L * L // 2, (r, t, pc)


def test_zigzag_causal_own_block_is_one_call():
    """Zigzag keeps global order locally (chunk r, then chunk 2W-1-r), so the causal mask of a
    rank's own block is plain causal on its local tokens: one call, not one per chunk pair."""
    for W in (2, 4, 8):
        for r in range(W):
            (pc,) = build_plan("zigzag", r, W, 16, True, (-1, -1)).steps[0]
            assert (pc.q0, pc.q1, pc.k0, pc.k1, pc.causal, pc.diag, pc.window) == (
                0,
                16,
                0,
                16,
                True,
                0,
                (-1, 0),
            )


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
def test_every_step_mask_is_exact(layout):
    """The union of a step's pieces (each its own band) is exactly the global mask of that block,
    for causal/full masks and windows; pieces never overlap."""
    W, L = 4, 12
    masks = [(True, (-1, -1)), (False, (-1, -1)), (True, (7, 0)), (False, (5, 9)), (True, (30, 0))]
    for causal, window in masks:
        pos = [rp.layouts.positions(layout, r, W, L) for r in range(W)]
        for r in range(W):
            for s in range(W):
                d = pos[s][None, :] - pos[r][:, None]  # global key - query position
                want = torch.ones(L, L, dtype=torch.bool)
                if causal:
                    want &= d <= 0
                if window[0] >= 0:
                    want &= d >= -window[0]
                if window[1] >= 0 and not causal:
                    want &= d <= window[1]
                got = torch.zeros(L, L, dtype=torch.int64)
                for pc in step_pieces(layout, r, s, W, L, causal, window):
                    i = torch.arange(pc.q1 - pc.q0)[:, None]
                    j = torch.arange(pc.k1 - pc.k0)[None, :]
                    lo = pc.diag - pc.window[0] if pc.window[0] >= 0 else -math.inf
                    hi = (
                        (pc.diag + pc.window[1] if pc.window[1] >= 0 else math.inf)
                        if not pc.causal
                        else pc.diag
                    )
                    m = (
                        torch.ones_like(j - i, dtype=torch.bool)
                        if pc.full
                        else ((j - i) >= lo) & ((j - i) <= hi)
                    )
                    got[pc.q0 : pc.q1, pc.k0 : pc.k1] += m.long()
                assert got.max() <= 1, f"{layout} {causal} {window} r{r} s{s}: pieces overlap"
                assert torch.equal(got.bool(), want), f"{layout} causal={causal} window={window} r{r} s{s}"


def test_stripe_causal_diag_is_zero_or_minus_one():
    """Token t on rank t % W: rank r's queries see rank s's keys j <= i when s <= r, else j < i."""
    W, L = 4, 6
    for r in range(W):
        for s in range(W):
            (pc,) = step_pieces("stripe", r, s, W, L, True, (-1, -1))
            assert pc.causal and pc.diag == (0 if s <= r else -1), (r, s, pc)
            i = torch.arange(L)[:, None]
            j = torch.arange(L)[None, :]
            want = (j * W + s) <= (i * W + r)  # the global causal mask on this block
            assert torch.equal(want, (j - i) <= pc.diag)


def test_window_drops_hops_outside_it():
    W, L = 8, 16
    # Query r*L sees keys down to r*L - left: 1 + ceil(left / L) shards.
    for window, steps in (((L, 0), 2), ((L + 1, 0), 3), ((2 * L, 0), 3), ((2 * L + 1, 0), 4), ((-1, -1), W)):
        plans = [build_plan("contiguous", r, W, L, True, window) for r in range(W)]
        assert all(p.n_steps == steps for p in plans), (window, [p.n_steps for p in plans])
    # Fewer hops and still exact (the dK/dV of the last step go straight back to their owner).
    q, k, v = torch.randn(1, W * L, 2, 8), torch.randn(1, W * L, 2, 8), torch.randn(1, W * L, 2, 8)
    dout = torch.randn_like(q)
    out, dq, dk, dv, _ = _sim(q, k, v, dout, W, "contiguous", causal=True, window_size=(L + 3, 0))
    ref, _, rdq, rdk, rdv = _ref(q, k, v, dout, causal=True, window_size=(L + 3, 0))
    for name, got, want in (("out", out, ref), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_matches(f"window {name}", got, want, None, 2)


def test_backward_own_partial_stays_home():
    """dK/dV sums start at the first rank after a block's owner: W - 1 dK/dV messages per rank
    (the last one home), not W. The own block runs after the last message is posted and before
    the home sum is awaited."""
    import types

    from ringflash import blockwise
    from ringflash.comm import Post, run_simulated
    from ringflash.parallel.ring_loop import TAG_DKV, TAG_HOME, TAG_KV, ring_bwd_loop
    from ringflash.parallel.simulate import simulate_plans

    W, L = 4, 8
    logs = [[] for _ in range(W)]

    def recording(loop, log):
        answer = None
        try:
            while True:
                req = loop.send(answer)
                log.append(("post", req.tag, req.shift) if isinstance(req, Post) else ("wait",))
                answer = yield req
        except StopIteration as stop:
            return stop.value

    def logging_backend(log):
        def attn_bwd(dout, q, k, *args, **kwargs):
            log.append(("bwd", q.shape[1], k.data_ptr()))
            return blockwise.attn_bwd(dout, q, k, *args, **kwargs)

        return types.SimpleNamespace(attn_bwd=attn_bwd, attn_bwd_delta=blockwise.attn_bwd_delta)

    xs = [torch.randn(1, L, 2, 8) for _ in range(W)]
    plans = simulate_plans(W, L, "zigzag", causal=True)
    loops = []
    for r in range(W):
        out, lse = blockwise.attn_fwd(xs[r], xs[r], xs[r], softmax_scale=0.3, causal=True)
        be = logging_backend(logs[r])
        loop = ring_bwd_loop(be, xs[r], xs[r], xs[r], xs[r], out, lse, plans[r], 0.3, 0.0, False)
        loops.append(recording(loop, logs[r]))
    run_simulated(loops)
    for r, log in enumerate(logs):
        posts = [e[1:] for e in log if e[0] == "post"]
        assert posts.count((TAG_KV, 1)) == W - 1
        # Each block's sum travels W - 2 hops, then goes home (one ahead), and one comes home.
        assert [p for p in posts if p[0] == TAG_DKV] == [(TAG_DKV, 1)] * (W - 2)
        assert [p for p in posts if p[0] == TAG_HOME] == [(TAG_HOME, 1), (TAG_HOME, 1)]
        own = xs[r].data_ptr()
        assert log[0] == ("post", TAG_KV, 1) and log[1] == ("wait",), log[:2]
        # The own block runs after the home receive is posted and before it is awaited.
        assert log[-5:-1] == [("post", TAG_HOME, 1), ("post", TAG_HOME, 1), ("bwd", L, own), ("wait",)], log[
            -5:
        ]


def test_profile_times_every_rank():
    W, L = 4, 8
    qs = [torch.randn(1, L, 2, 8) for _ in range(W)]
    outs, lses, prof = rp.simulate_ring_attn(qs, qs, qs, "zigzag", causal=True, profile=True, prefetch=1)
    assert len(prof.segments) == W and all(len(s) == len(prof.segments[0]) for s in prof.segments)
    assert 0 < prof.ring_time() <= sum(prof.rank_time(r) for r in range(W))
    # Ranks wait only for the messages they receive: never longer than all ranks in lockstep, never
    # shorter than the busiest rank.
    assert max(prof.rank_time(r) for r in range(W)) <= prof.ring_time() <= prof.lockstep_time() + 1e-12
    # Every segment after the first starts after a Post (None) or a receive from the rank behind.
    for r, deps in enumerate(prof.after):
        assert deps[0] is None and all(d is None or d[0] == (r - 1) % W for d in deps)
        assert any(d is not None for d in deps)
    # Holding two blocks: the first two come from the ranks one and two behind, later ones from
    # two behind.
    *_, prof = rp.simulate_ring_attn(qs, qs, qs, "zigzag", causal=True, profile=True, prefetch=2)
    for r, deps in enumerate(prof.after):
        senders = [d[0] for d in deps if d is not None]
        assert senders == [(r - 1) % W, (r - 2) % W, (r - 2) % W], (r, deps)


def test_ring_time_follows_the_messages():
    """Two ranks, segments [post, compute, receive]: rank 1's third segment needs rank 0's message,
    posted at the end of rank 0's slow second segment; rank 0's needs rank 1's, posted early."""
    from ringflash.comm import SimProfile

    segs = [[1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]
    after = [[None, None, (1, 0)], [None, None, (0, 1)]]
    prof = SimProfile(segs, after)
    # rank 0 ends at 7; rank 1 waits for rank 0's post at t=6, then runs 1 more: 7.
    assert prof.ring_time() == 7.0
    assert prof.lockstep_time() == 7.0
    # Rank 1 now waits only for rank 0's first segment: each rank runs alone, the slowest sets it.
    prof = SimProfile(segs, [[None, None, (1, 0)], [None, None, (0, 0)]])
    assert (
        prof.ring_time() == 7.0
        and SimProfile([[1.0, 5.0], [5.0, 1.0]], [[None, None]] * 2).ring_time() == 6.0
    )
    assert SimProfile([[1.0, 5.0], [5.0, 1.0]]).ring_time() == 10.0  # nothing recorded: lockstep
    with pytest.raises(ValueError, match="never posted"):
        SimProfile([[1.0, 1.0]], [[None, (0, 5)]]).ring_time()


def test_bf16_error_does_not_grow_with_world_size():
    """Partials merge in float32: the bf16 error at 8 ranks stays that of 2 ranks (and flash-attn's rule)."""
    S = 256
    q, k, v = (torch.randn(1, S, 4, 32).to(torch.bfloat16) for _ in range(3))
    dout = torch.randn(1, S, 4, 32).to(torch.bfloat16)
    ref = _ref(q, k, v, dout, causal=True)
    plain = _ref(q, k, v, dout, upcast=False, causal=True)  # plain PyTorch in bf16
    errs = {}
    for world in (2, 8):
        got = _sim(q, k, v, dout, world, "zigzag", causal=True)
        errs[world] = [max_err(g, r) for g, r in zip(got[:4], (ref[0], *ref[2:]), strict=True)]
        wants, plains = (ref[0], *ref[2:]), (plain[0], *plain[2:])
        for name, g, r, p, f in zip(
            ("out", "dq", "dk", "dv"), got[:4], wants, plains, (2, 3, 3, 3), strict=True
        ):
            assert g.dtype == torch.bfloat16
            assert_matches(f"W{world} {name}", g, r, p, f)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert errs[8][i] <= 1.5 * errs[2][i] + 1e-3, (
            f"{name}: error {errs[8][i]:.3g} at 8 ranks vs {errs[2][i]:.3g} at 2"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_simulated_ring_cuda_triton(layout, prefetch):
    """The simulated ring at a real head size through the Triton kernels (bf16, GQA, causal):
    forward with ``prefetch`` blocks held at once, and the backward, against the float64 oracle
    (2x / 3x plain PyTorch's bf16 error)."""
    world, L = 4, 512
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, world * L, h, 128, generator=g).to("cuda", torch.bfloat16) for h in (8, 2, 2, 8)
    )
    sh = lambda x: [rp.shard_for(x, r, world, 1, layout) for r in range(world)]  # noqa: E731
    outs, lses, _ = rp.simulate_ring_attn(sh(q), sh(k), sh(v), layout, causal=True, prefetch=prefetch)
    dqs, dks, dvs, _ = rp.simulate_ring_attn_backward(
        sh(dout), sh(q), sh(k), sh(v), outs, lses, layout, causal=True
    )
    got = [rp.unshard_from(x, 1, layout) for x in (outs, dqs, dks, dvs)]
    ref = _ref(q, k, v, dout, causal=True)
    plain = _ref(q, k, v, dout, upcast=False, causal=True)
    for i, (name, f) in enumerate((("out", 2), ("dq", 3), ("dk", 3), ("dv", 3))):
        j = 0 if i == 0 else i + 1
        assert_matches(f"{layout} p{prefetch} {name}", got[i], ref[j], plain[j], f)
