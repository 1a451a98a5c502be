"""``bench_packed.py --calls``: the ranks' recorded attention calls let through exactly the pairs of
the one call on the whole stream, whatever the layout and method (so its per-pair comparison
compares the same work)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_packed  # noqa: E402
from packed_calls import call_table, visible_pairs  # noqa: E402


@pytest.mark.parametrize(
    "dist,world,layout,method",
    [
        ("one", 2, "zigzag", "ring"),
        ("longtail", 3, "zigzag", "ring"),
        ("longtail", 4, "contiguous", "ring"),
        ("longtail", 4, "balanced", "allgather"),
    ],
)
def test_ranks_calls_see_the_one_calls_pairs(dist, world, layout, method):
    cu = bench_packed.documents(dist, world * 256, seed=1)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(int(cu[-1]), h, 16, generator=g) for h in (4, 2, 2, 4))
    rows, per_rank = call_table(q, k, v, dout, cu, world, layout, method, 2, reps=1)
    sums = {(r["pass_"], r["who"]): r["mpairs"] for r in rows if r["kind"] == "all"}
    assert len(sums) == 4
    for p in ("fwd", "bwd"):
        assert sums[(p, "ranks")] == pytest.approx(sums[(p, "one call")], abs=1e-12), p
    for p in ("fwd", "bwd"):  # every rank's call is named to its rank
        ranks_ms = [r["ms"] for r in rows if r["who"] == "ranks" and r["pass_"] == p and r["kind"] == "all"]
        assert sum(per_rank[p]) == pytest.approx(ranks_ms[0]), p
        assert len(per_rank[p]) == world
    per_call = {r["kind"] for r in rows if r["who"] == "ranks"}
    assert "all" in per_call and per_call & {"plain", "two-part"}


def test_visible_pairs_counts_the_mask():
    """Causal bottom-right, a two-part diagonal, a window, a padded call with an offset."""
    q, k = torch.empty(1, 4, 1, 8), torch.empty(1, 6, 1, 8)
    assert visible_pairs("fwd", (q, k), dict(causal=True)) == 3 + 4 + 5 + 6
    assert visible_pairs("fwd", (q, k), dict(causal=False)) == 24
    assert visible_pairs("fwd", (q, k), dict(causal=True, window_size=(1, 0))) == 4 * 2
    assert visible_pairs("fwd", (q, k), dict(causal=True, diag_offset=0)) == 1 + 2 + 3 + 4
    cu_q, cu_k = torch.tensor([0, 4]), torch.tensor([0, 8])
    two = torch.tensor([[0, 2, 4]])  # rows 0-1 on diagonal 0, rows 2-3 on diagonal 4
    kw = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, diag_offset=two)
    assert visible_pairs("fwd", (q[0], k[0]), kw) == 1 + 2 + 7 + 8


@pytest.mark.parametrize("world,layout", [(3, "balanced"), (4, "zigzag"), (4, "contiguous")])
def test_exchanged_rows_balance(world, layout):
    """Every row one rank sends another receives: the ranks' received and sent rows sum alike,
    and the ring reports none."""
    cu = bench_packed.documents("longtail", world * 512, seed=2)
    recv, sent = bench_packed.exchanged_rows(cu, world, layout, "allgather")
    assert len(recv) == len(sent) == world
    assert sum(recv) == sum(sent) > 0
    assert bench_packed.exchanged_rows(cu, world, layout, "ring") is None
