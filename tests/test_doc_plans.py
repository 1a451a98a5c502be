"""Plans of a packed stream that a rank derives without building the other ranks' plans: the ring
plan (``doc_layouts.build_doc_plan``) builds the pieces of its own steps only and learns how far
each K/V block travels from whether the other ranks' queries see it (``_sees``); the all-gather's
received rows (``gather_plan.received_rows``, for ``method="auto"``) are counted, not gathered.
Both must agree with building every rank's plan."""

from __future__ import annotations

import itertools
import random

import pytest

from ringflash.parallel import doc_layouts as dl
from ringflash.parallel.gather_plan import gather_plan, received_rows
from ringflash.parallel.layouts import trim


def _cases(world: int, layout: str, seed: int):
    """``(cu, causal, window)``: random packed streams that ``layout`` can shard over ``world``
    ranks (documents of 1 token up to longer than a shard), each under four masks."""
    rng = random.Random(seed)
    for _ in range(6):
        lens, left = [], world * rng.choice([8, 64, 200])
        while left > 0:
            lens.append(min(left, rng.randint(1, 3 * left // 2 + 1)))
            left -= lens[-1]
        cu = tuple(itertools.accumulate(lens, initial=0))
        if not dl.total_error(world, cu[-1], layout):
            for causal, window in ((True, (-1, -1)), (False, (-1, -1)), (True, (5, 0)), (False, (3, 9))):
                yield cu, causal, window


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe", "balanced"])
def test_sees_is_whether_pairs_exist_and_plans_match_building_every_rank(world, layout):
    for cu, causal, window in _cases(world, layout, world * 7 + len(layout)):
        for r, s in itertools.product(range(world), repeat=2):
            got = dl._sees(layout, cu, r, s, world, causal, window)
            assert got == bool(dl._pairs(layout, cu, r, s, world, causal, window)), (cu, r, s)
        every = [
            [
                dl._calls(dl._coalesce_full(dl._pairs(layout, cu, r, (r - t) % world, world, causal, window)))
                for t in range(world)
            ]
            for r in range(world)
        ]
        for rank in range(world):
            want = trim(every, rank, world, reach=True)
            got = dl.build_doc_plan(layout, cu, rank, world, causal, window)
            assert got.reach == want.reach and len(got.steps) == len(want.steps), (cu, rank)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe", "balanced"])
def test_received_rows_are_the_all_gather_plans_rows(world, layout):
    for cu, causal, window in _cases(world, layout, world * 11 + len(layout)):
        plans = [gather_plan(layout, cu, r, world, causal, window) for r in range(world)]
        want = [sum(p.recv) - p.recv[r] for r, p in enumerate(plans)]
        assert received_rows(layout, cu, world, causal, window) == want, (cu, causal, window)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe", "balanced"])
def test_pair_counts_all_at_once_equal_counting_segment_by_segment(world, layout):
    """``method_cost.pair_counts`` (every segment pair in one pass of tensor arithmetic) against
    ``band_pairs`` of each pair of segments of one document in turn."""
    from ringflash.parallel.layouts import _band
    from ringflash.parallel.method_cost import band_pairs, pair_counts

    for cu, causal, window in _cases(world, layout, world * 13 + len(layout)):
        segs = [dl.doc_segments(layout, cu, r, world) for r in range(world)]
        want = [[0] * world for _ in range(world)]
        for r, t in itertools.product(range(world), repeat=2):
            for sq in segs[r]:
                for sk in segs[(r - t) % world]:
                    if sk.doc == sq.doc:
                        lo, hi = _band(sq.pos0, sk.pos0, sq.stride, causal, window)
                        want[r][t] += band_pairs(lo, hi, sq.count, sk.count)
        assert pair_counts(layout, cu, world, causal, window) == want, (cu, causal, window)
