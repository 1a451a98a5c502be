"""The balanced layout's rebalancing (``doc_layouts._rebalance``): after the greedy placement, the
slowest rank hands tokens of a long document it shares with a less loaded rank over for as many
of a shorter one, which evens out the layout's cost model without moving tokens to new holders."""

from __future__ import annotations

import itertools
import random

import pytest

from ringflash.parallel import doc_layouts as dl

# A long-tailed stream of 8 x 8192 tokens (bench_packed's, seed 0) whose greedy placement leaves
# its slowest rank at 1.041x the mean work.
LONGTAIL_8 = (4719, 3515, 1964, 1667, 2200, 1929, 3790, 1737, 2102, 2447, 6705, 2180, 1702, 3494, 2595, 1654)
LONGTAIL_8 += (6785, 14351)


def _tokens(placed, world):
    tokens = [0] * world
    for holders, shares in placed.values():
        for r, s in zip(holders, shares, strict=True):
            tokens[r] += s
    return tokens


def test_rebalancing_evens_out_a_long_tailed_stream():
    lengths, world = list(LONGTAIL_8), 8
    placed = dl._greedy(lengths, world)[1]
    before = dl._placed_costs(lengths, placed, world)
    holders = {d: list(h) for d, (h, _) in placed.items()}
    after_placed = dl._rebalance(lengths, {d: (list(h), list(s)) for d, (h, s) in placed.items()}, world)
    after = dl._placed_costs(lengths, after_placed, world)
    mean = sum(before) / world
    assert max(before) > 1.04 * mean and max(after) < 1.03 * mean, (max(before) / mean, max(after) / mean)
    assert _tokens(after_placed, world) == [sum(lengths) // world] * world
    assert {d: list(h) for d, (h, _) in after_placed.items()} == holders, "no token moves to a new holder"
    segs = [
        dl.doc_segments("balanced", tuple(itertools.accumulate(lengths, initial=0)), r, world)
        for r in range(8)
    ]
    work = [sum(dl._run_cost(s.pos0, s.count) for s in ss) for ss in segs]
    assert max(work) == pytest.approx(max(after)), "the layout is the rebalanced placement"


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_rebalancing_never_slows_the_slowest_rank(world):
    rng = random.Random(world)
    for _ in range(20):
        lens, left = [], world * 2048
        while left > 0:
            lens.append(min(left, max(1, int(700 * rng.paretovariate(1.3)))))
            left -= lens[-1]
        placed = dl._greedy(lens, world)[1]
        before = dl._placed_costs(lens, placed, world)
        after_placed = dl._rebalance(lens, {d: (list(h), list(s)) for d, (h, s) in placed.items()}, world)
        after = dl._placed_costs(lens, after_placed, world)
        assert max(after) <= max(before) + 1e-6
        assert _tokens(after_placed, world) == [sum(lens) // world] * world
        assert all(min(s) > 0 for _, s in after_placed.values())
