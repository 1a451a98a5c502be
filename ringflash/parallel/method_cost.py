"""``method="auto"`` for packed documents: ring or all-gather by a cost model of every rank's work.

For each rank the model counts, from the layout's document segments (the same on every rank, so
every rank picks the same method):

- ``pairs_t``: the query-key pairs it computes against the K/V block of rank ``r - t`` (step ``t``
  of the ring; the all-gather computes the same pairs, all at once);
- the bytes it receives: a K/V shard per hop that a block travels to it (ring), or the rows of the
  shared documents it reads (all-gather, ``gather_plan``'s ``recv``);
- the float32 state the ring reads and writes on every step (its output and LSE), which the
  all-gather, writing each row once, does not.

and prices them with a compute rate (attention pairs per second), the device's memory bandwidth and
the group's link bandwidth (measured once per group by timing an all-to-all, ``link_bandwidth``)::

    ring(r)      = sum over steps t of  max(pairs_t * f / rate, hop_t * m / link) + state * f / memory
    allgather(r) = max(C, X) + min(C, X) / P,  C = recv * m / link,  X = sum over t of pairs_t * f / rate

The ring overlaps a hop's transfer with the step's compute. The all-gather exchanges in ``P``
pieces of KV heads, each piece's calls running while the next travels: one piece's share of the
shorter of the two stays exposed (``P = 1``: ``C + X``; the local documents' calls, which run
beside the first piece, are left out). With gradients, ``f`` and ``m``
take the backward too: ``f = 1 + 2.5`` (a backward costs ~2.5 forwards) and ``m = 1 + 1 + 2`` (K/V
again and their float32 dK/dV back: both methods move them, per hop or per gathered row). The
slower of the slowest ranks loses. Calls' tile efficiency is not modelled: the figures in
benchmarks/RESULTS.md ("Packed documents simulated on one GPU") show where it matters.
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.distributed as dist

from ..backends import device_throughput
from .doc_layouts import doc_segments
from .gather_plan import received_rows
from .layouts import _band

_BACKWARD_FLOPS = 2.5  # a backward's pairs cost about 2.5 forwards (recompute, dQ, dK/dV)
_PAIR_RATE_PER_SM = (
    2.6e10  # attention pairs x heads per second per SM of head dim 128 (~450 TFLOP/s on 132 SMs)
)
_CPU_PAIR_RATE = 2e9  # the blockwise backend on a few cores, head dim 128
_CPU_MEMORY = 2e10  # bytes per second
_H100_MEMORY = 3.35e12  # where a driver does not report the memory clock
_PROBE_BYTES = 8 << 20  # per rank, for the link probe


def band_pairs(lo: float, hi: float, nq: int, nk: int) -> int:
    """``#{(i, j): 0 <= i < nq, 0 <= j < nk, lo <= j - i <= hi}`` in closed form (``lo``/``hi``
    may be infinite)."""
    one = torch.tensor([nq, nk], dtype=torch.int64)
    return int(_band_pairs(lo, hi, one[:1], one[1:]))


def _band_pairs(lo, hi, nq: torch.Tensor, nk: torch.Tensor) -> torch.Tensor:
    """``band_pairs`` elementwise over int64 tensors ``nq``, ``nk`` and bounds ``lo``, ``hi``
    (tensors or integers, or infinite for every element)."""
    # unbounded sides: bounds past the runs change nothing
    lo = -nq if isinstance(lo, float) and lo == -math.inf else torch.maximum(torch.as_tensor(lo), -nq)
    hi = nk if isinstance(hi, float) and hi == math.inf else torch.minimum(torch.as_tensor(hi), nk)

    def below(c):  # #{(i, j): j - i <= c} = sum over i of clamp(i + c + 1, 0, nk)
        a = torch.clamp(-c, min=0).minimum(nq)  # rows before a see no key
        b = torch.maximum(a, nk - c - 1).minimum(nq)  # rows from b see every key
        return (b - a) * (a + b + 2 * c + 1) // 2 + (nq - b) * nk

    return torch.where((nq > 0) & (nk > 0) & (lo <= hi), below(hi) - below(lo - 1), 0)


def pair_counts(layout: str, cu: tuple[int, ...], world: int, causal: bool, window) -> list[list[int]]:
    """``[r][t]``: the query-key pairs rank ``r``'s queries see in rank ``(r - t) % W``'s keys:
    ``band_pairs`` of every pair of segments of one document (``layouts._band``), for all pairs
    at once (tens of thousands at 16 ranks)."""
    segs = [(r, s) for r in range(world) for s in doc_segments(layout, cu, r, world) if s.count]
    segs.sort(key=lambda x: x[1].doc)
    if not segs:
        return [[0] * world for _ in range(world)]
    rank, doc, pos0, count, stride = (
        torch.tensor(col, dtype=torch.int64)
        for col in zip(*((r, s.doc, s.pos0, s.count, s.stride) for r, s in segs), strict=True)
    )
    # every (query segment, key segment) pair of one document: segments are grouped by document
    _, sizes = torch.unique_consecutive(doc, return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)  # each segment's group start
    per_q = torch.repeat_interleave(sizes, sizes)  # key segments each query segment meets
    q = torch.repeat_interleave(torch.arange(len(segs)), per_q)
    k = (
        torch.repeat_interleave(first, per_q)
        + torch.arange(len(q))
        - torch.repeat_interleave(torch.cumsum(per_q, 0) - per_q, per_q)
    )
    lo, hi = _band(pos0[q], pos0[k], stride[q], causal, window)
    seen = _band_pairs(lo, hi, count[q], count[k])
    cell = rank[q] * world + (rank[q] - rank[k]) % world
    out = torch.zeros(world * world, dtype=torch.int64).index_add_(0, cell, seen)
    return out.view(world, world).tolist()


def method_costs(
    layout: str,
    cu: tuple[int, ...],
    world: int,
    causal: bool,
    window,
    reach: tuple[int, ...],
    shape: tuple[int, int, int, int],
    backward: bool,
    rates: tuple[float, float, float],
    pieces: int = 1,
) -> dict[str, float]:
    """Modelled seconds of the slowest rank per method (module docstring).

    Args:
        reach: the ring plan's hops per block (``Plan.reach``).
        shape: ``(Hq, Hk, D, bytes per element)`` of the call.
        rates: ``(pairs x heads per second, memory bytes per second, link bytes per second)``.
        pieces: how many pieces of KV heads the all-gather exchanges in.
    """
    hq, hk, d, elt = shape
    pair_rate, memory, link = rates
    flops = (1 + _BACKWARD_FLOPS) if backward else 1.0
    moved = 4.0 if backward else 1.0
    n_local = cu[-1] // world
    row = 2 * hk * d * elt  # a K row and a V row
    state = n_local * hq * (d + 1) * 4 * 2  # float32 output and LSE, read and written per step
    pairs = pair_counts(layout, cu, world, causal, window)
    recv = received_rows(layout, cu, world, causal, window)
    ring = ag = 0.0
    for r in range(world):
        t_ring, work = 0.0, 0.0
        for t in range(world):
            travels = t > 0 and t <= reach[(r - t) % world]
            if not pairs[r][t] and not travels:
                continue
            compute = pairs[r][t] * hq * flops / pair_rate
            hop = n_local * row * moved / link if travels else 0.0
            t_ring += max(compute, hop) + state * flops / memory
            work += compute
        ring = max(ring, t_ring)
        exchange = recv[r] * row * moved / link
        ag = max(ag, max(exchange, work) + min(exchange, work) / pieces)
    return {"ring": ring, "allgather": ag}


def compute_rates(device: torch.device, head_dim: int) -> tuple[float, float]:
    """``(pairs x heads per second, memory bytes per second)`` of ``device`` at ``head_dim``: from
    its SM count and memory clock on CUDA, nominal figures for the blockwise backend elsewhere."""
    got = device_throughput(device)
    if got is None:
        return _CPU_PAIR_RATE * 128 / head_dim, _CPU_MEMORY
    sms, memory = got
    return _PAIR_RATE_PER_SM * sms * 128 / head_dim, memory or _H100_MEMORY


_LINKS: dict[tuple, float] = {}


def link_bandwidth(group, world: int, device: torch.device) -> float:
    """Bytes per second that each rank of ``group`` receives in an all-to-all, measured once per
    group and device (three timed all-to-alls of ``_PROBE_BYTES`` per rank after a warm-up; the
    slowest rank's time, agreed by an all-reduce, so every rank holds the same figure). A
    collective: every rank of the group calls it together."""
    key = (tuple(dist.get_process_group_ranks(group)) if group is not None else (), str(device))
    if key in _LINKS:
        return _LINKS[key]
    n = _PROBE_BYTES // world * world
    x = torch.zeros(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for i in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dist.all_to_all_single(y, x, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor([sorted(times)[1]], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    _LINKS[key] = n * (world - 1) / world / max(float(slowest), 1e-9)
    return _LINKS[key]


def choose_method(
    layout: str,
    cu: tuple[int, ...],
    world: int,
    causal: bool,
    window,
    reach: tuple[int, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    backward: bool,
    link,
    pieces: int = 1,
) -> str:
    """``method="auto"``: the cheaper method of ``method_costs`` for this call's shapes on ``q``'s
    device. ``link``: bytes per second per rank, or a function that measures it (called only
    when the model needs it: ``link_bandwidth`` is a collective). ``pieces``: the all-gather's
    pieces of KV heads (``allgather.head_pieces``). Stripe and a single rank stay
    on the ring (the all-gather runs stripe as the ring's own pieces over the whole stream)."""
    if world == 1 or layout == "stripe":
        return "ring"
    if not any(reach):  # no block travels: the all-gather exchanges nothing and writes rows once
        return "allgather"
    rates = (*compute_rates(q.device, q.shape[-1]), link() if callable(link) else link)
    shape = (q.shape[-2], k.shape[-2], q.shape[-1], q.element_size())
    costs = _costs(layout, cu, world, causal, tuple(window), tuple(reach), shape, backward, rates, pieces)
    return "allgather" if costs["allgather"] < costs["ring"] else "ring"


_costs = functools.lru_cache(maxsize=64)(method_costs)

__all__ = ["band_pairs", "choose_method", "link_bandwidth", "method_costs", "pair_counts"]
