"""The program order of the attention kernels (``ringflash.kernels.common._tile_order``), run by
Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before Triton loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import json, sys
import torch
import triton
import triton.language as tl
from ringflash.kernels.common import _tile_order

@triton.jit
def k(OUT, n_tiles, width, GROUPED: tl.constexpr, REVERSE: tl.constexpr):
    tile, head = _tile_order(n_tiles, width, GROUPED, REVERSE)
    pid = tl.program_id(0)
    tl.store(OUT + 2 * pid, tile)
    tl.store(OUT + 2 * pid + 1, head)

res = []
for n_tiles, n_heads, width, grouped, reverse in json.loads(sys.argv[1]):
    out = torch.full((n_tiles * n_heads, 2), -1, dtype=torch.int32)
    k[(n_tiles * n_heads,)](out, n_tiles, width, GROUPED=grouped, REVERSE=reverse)
    res.append(out.tolist())
print(json.dumps(res))
"""

CASES = [
    # n_tiles, n_heads, sched_width, grouped, reverse
    (4, 6, 32, True, True),  # one group of all 6 heads
    (4, 7, 12, True, True),  # groups of 3 heads; the last holds 1
    (5, 3, 1, True, False),  # groups of one head: head-major
    (1, 5, 100, True, True),  # one tile per head
    (3, 4, 32, False, True),  # not grouped: head-major, tiles last to first
    (6, 5, 12, True, False),  # groups of 2; the last holds 1
    (8, 4, 4, True, True),  # 32 programs > 6 * sched_width: head-major
]


@pytest.fixture(scope="module")
def orders():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i", range(len(CASES)), ids=[str(c) for c in CASES])
def test_tile_order(orders, i):
    n_tiles, n_heads, width, grouped, reverse = CASES[i]
    got = [tuple(x) for x in orders[i]]
    # Every (tile, head) exactly once.
    assert sorted(got) == [(t, h) for t in range(n_tiles) for h in range(n_heads)], got
    group = min(n_heads, -(-width // n_tiles)) if grouped and n_tiles * n_heads <= 6 * width else 1
    rank = [(n_tiles - 1 - t) if reverse else t for t, _ in got]
    pos = 0
    for g0 in range(0, n_heads, group):
        heads = list(range(g0, min(g0 + group, n_heads)))
        span = got[pos : pos + len(heads) * n_tiles]
        # A group's programs are contiguous and cover exactly its heads...
        assert sorted({h for _, h in span}) == heads, (g0, span)
        # ...tile rank by tile rank (longest first under REVERSE), heads in order inside a rank.
        ranks = rank[pos : pos + len(span)]
        assert ranks == sorted(ranks), (g0, span)
        assert [h for _, h in span] == heads * n_tiles, (g0, span)
        pos += len(span)
    assert pos == len(got)
