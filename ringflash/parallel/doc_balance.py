"""The ``balanced`` layout of packed documents: where each document's tokens go.

Documents stay whole on one rank where they can. Most work first, each document goes whole to the
least-loaded rank with room, or, if its causal work would unbalance the ranks (or it is longer
than a shard), is spread in zigzag over the fewest ranks that even it out: with m holders it is cut
into 2m pieces, tile multiples where it is long enough, and holder i takes the i-th piece from each
end. A document with no room as planned fills the ranks with the most room the same way. The
placement tries several thresholds for "would unbalance" and keeps the one whose slowest rank has
the least work under a cost model (``_run_cost`` per run of queries, and the K/V rows a spread
document's holders exchange: ``_share_costs``), then evens it out by trades (``_rebalance``).
``doc_layouts.doc_segments`` turns the result into each rank's segments.
"""

from __future__ import annotations

import bisect
import functools
import itertools


def _run_cost(pos0: int, count: int) -> float:
    """GPU work of ``count`` queries at document positions ``pos0 ..`` under a causal mask, in
    query-key pairs: the pairs they see with the query count rounded up to a kernel tile (a short
    run still costs a tile), plus the backward's pass over the run's keys ``[0, pos0 + count)``,
    whose cost per key does not shrink with the run (``_KEY_COST`` pairs per key)."""
    return -(-count // _TILE) * _TILE * (pos0 + (count + 1) / 2) + _KEY_COST * (pos0 + count)


_TILE = 128  # the attention kernels' query tile on a GPU
_KEY_COST = 125  # pairs per key of a run's backward pass over its keys (fitted: docs/ring.md, "Layouts")
# Pair-equivalents of a K/V row that a rank receives (put in stream order, forward and backward,
# and its float32 dK/dV written) and that it sends (gathered for the exchange twice, its dK/dV
# summed back): fitted to the H100's per-rank time beyond the attention calls under the all-gather
# (``bench_packed.py --calls``, 8 ranks: about 24 ns a received row and 9 ns a sent one).
_RECV_ROW_COST = 150
_SEND_ROW_COST = 60
_MIN_PIECE = 128  # a document is spread over m ranks only if its zigzag pieces hold this many tokens
# A document whose work exceeds this fraction of a rank's fair share is spread over more ranks; the
# layout tries each and keeps the one whose slowest rank has the least work.
_SPREAD_CAPS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
_EVEN = 1.005  # a slowest rank this close to the fair share ends the search
_REBALANCE_STEPS = 32  # trades of ``_rebalance`` at most
_TRADE_RANKS = 4  # the least loaded ranks that a step of ``_rebalance`` tries to trade with
_TRADE_DOCS = 6  # documents of each side that a trade making a new holder considers


def _zigzag_split(n: int, shares: list[int]) -> list[list[tuple[int, int]]]:
    """``(pos0, count)`` runs of a document of ``n`` tokens spread over holders that take
    ``shares`` tokens each: holder ``i`` takes the ``i``-th piece from the start and the ``i``-th
    from the end (zigzag over the holders), halves of a tile multiple where the share allows, so
    that every holder's causal work is close to its share of tokens times ``n / 2``."""
    heads = [s // 2 // _TILE * _TILE if s >= 2 * _TILE else s // 2 for s in shares]
    runs, pos = [[] for _ in shares], 0
    for i, h in enumerate(heads):
        runs[i].append((pos, h))
        pos += h
    for i in reversed(range(len(shares))):
        runs[i].append((pos, shares[i] - heads[i]))
        pos += shares[i] - heads[i]
    out = []
    for rr in runs:  # the middle holder's two pieces touch: one run
        rr = [x for x in rr if x[1]]
        if len(rr) == 2 and rr[0][0] + rr[0][1] == rr[1][0]:
            rr = [(rr[0][0], rr[0][1] + rr[1][1])]
        out.append(rr)
    return out


def _equal_shares(n: int, m: int) -> list[int]:
    """``m`` shares of ``n`` tokens, tile multiples where ``n`` allows, largest first."""
    unit = _TILE if n >= 2 * m * _TILE else 1
    q, extra = divmod(n // unit, m)
    shares = [(q + (i < extra)) * unit for i in range(m)]
    shares[0] += n - unit * (n // unit)
    return shares


def _holders_wanted(n: int, world: int, n_local: int, cap: float) -> int:
    """The fewest ranks that bring a document of ``n`` tokens under ``cap`` work per rank (and
    its tokens under a shard each), while its zigzag pieces keep ``_MIN_PIECE`` tokens."""
    m = 1
    while m < world and n // (2 * (m + 1)) >= _MIN_PIECE and (_run_cost(0, n) / m > cap or n > m * n_local):
        m += 1
    return m


def _place(lengths: list[int], world: int, n_local: int, wanted: tuple[int, ...]):
    """Documents, most work first, each whole on the least-loaded rank with room, or spread in
    zigzag over ``wanted[d]`` ranks (the least loaded with room); a document with no room as
    planned is spread over the ranks with the most room, filling them. Returns the slowest rank's
    work and the placement ``{doc: (holders, shares)}`` (tokens per holder, in zigzag order)."""
    room, load, placed = [n_local] * world, [0.0] * world, {}

    def put(d, holders, shares):
        placed[d] = (holders, shares)
        _add_costs(load, lengths[d], placed[d])
        for r, share in zip(holders, shares, strict=True):
            room[r] -= share

    for d in sorted((d for d in range(len(lengths)) if lengths[d]), key=lambda d: -lengths[d]):
        n, m = lengths[d], wanted[d]
        by_load = sorted(range(world), key=lambda r: (load[r], -room[r]))
        holders, shares = [], _equal_shares(n, m)
        for share in shares:
            r = next((r for r in by_load if r not in holders and room[r] >= share), None)
            if r is None:
                break
            holders.append(r)
        if len(holders) == m:
            put(d, holders, shares)
            continue
        holders, shares, left = [], [], n
        for r in sorted(range(world), key=lambda r: (-room[r], load[r])):
            if not left or not room[r]:
                break
            holders.append(r)
            shares.append(min(room[r], left))
            left -= shares[-1]
        put(d, holders, shares)
    return max(load), placed


def _holder_costs(n: int, holders: list[int], shares: list[int]) -> dict[int, float]:
    """``{rank: work}`` of a document of ``n`` tokens split in zigzag over ``holders``
    (``_share_costs``)."""
    return dict(zip(holders, _share_costs(n, tuple(shares)), strict=True))


@functools.lru_cache(maxsize=4096)
def _share_costs(n: int, shares: tuple[int, ...]) -> tuple[float, ...]:
    """The work of each of the holders of a document of ``n`` tokens that take ``shares`` tokens
    in zigzag: its runs' attention (``_run_cost``) and, for a document on several ranks, the rows
    each holder receives and sends (``_RECV_ROW_COST``, ``_SEND_ROW_COST``): under a causal mask
    a holder reads the others' keys up to its own last query. Cached: the placement search asks
    for the same splits many times."""
    split = _zigzag_split(n, list(shares))
    out = [sum(_run_cost(pos0, count) for pos0, count in runs) for runs in split]
    if len(shares) > 1:
        # Every position before a holder's reach is some holder's: it receives reach - share rows.
        reach = [max((p + c for p, c in runs), default=0) for runs in split]
        ends = sorted(reach)
        below = [0, *itertools.accumulate(ends)]
        for i, (runs, share, end) in enumerate(zip(split, shares, reach, strict=True)):
            # ... and sends, of each run (p, c), min(c, reach - p) rows to every other holder
            sent = -share
            for p, c in runs:
                lo, hi = bisect.bisect_right(ends, p), bisect.bisect_left(ends, p + c)
                sent += below[hi] - below[lo] - p * (hi - lo) + c * (len(ends) - hi)
            out[i] += _RECV_ROW_COST * (end - share) + _SEND_ROW_COST * sent
    return tuple(out)


def _add_costs(load: list[float], n: int, place, sign: int = 1) -> None:
    """Add (``sign`` -1: take away) to each rank's ``load`` its work of a document of ``n``
    tokens placed ``(holders, shares)``."""
    for r, w in _holder_costs(n, *place).items():
        load[r] += sign * w


def _placed_costs(lengths: list[int], placed: dict, world: int) -> list[float]:
    """Each rank's work under the placement ``{doc: (holders, shares)}`` (``_holder_costs``)."""
    load = [0.0] * world
    for d, place in placed.items():
        _add_costs(load, lengths[d], place)
    return load


def _rebalance(lengths: list[int], placed: dict, world: int) -> dict:
    """Even out the placement's work by trades: the slowest rank ``a`` gives a tile multiple of
    tokens of a long document to a less loaded rank ``b`` and takes as many of a shorter document
    from ``b`` (each token of a zigzag share costs about half its document's length, so the trade
    moves work from ``a`` to ``b`` and keeps every rank's tokens). Trades between documents that
    both ranks already hold come first (no more K/V travel); only when none helps may a rank become
    a new holder of a document, with a share of ``2 * _MIN_PIECE`` tokens at least (its K/V then
    travel to it). The trade that lowers the slowest rank's work most, repeated while one does
    (``_REBALANCE_STEPS`` at most)."""
    load = _placed_costs(lengths, placed, world)
    for _ in range(_REBALANCE_STEPS):
        best = _first_trade(lengths, placed, load)
        if best is None:
            break
        load, traded = best
        placed.update(traded)
    return placed


def _first_trade(lengths, placed: dict, load: list[float]):
    """The slowest rank's trade (``_best_trade``) with the least loaded rank that has one, trades
    between documents both hold tried first: ``(new loads, {doc: (holders, shares)})`` or None."""
    a = load.index(max(load))
    for fresh in (False, True):
        for b in sorted(range(len(load)), key=lambda r: load[r])[:_TRADE_RANKS]:
            trade = None if b == a else _best_trade(lengths, placed, load, a, b, fresh)
            if trade is not None:
                return trade
    return None


def _best_trade(lengths, placed: dict, load: list[float], a: int, b: int, fresh: bool):
    """The trade from rank ``a`` to ``b`` (``_rebalance``) that lowers the slowest rank's work
    most, or None: ``(new loads, {doc: (holders, shares)})``. ``fresh``: trades that make a rank a
    new holder of a document, else those between documents that both hold."""
    best = None
    on_a = [d for d, (holders, _) in placed.items() if a in holders]
    on_b = [d for d, (holders, _) in placed.items() if b in holders]
    if fresh:  # the longest documents of a for the shortest of b: the trades that move most work
        on_a = sorted(on_a, key=lambda d: -lengths[d])[:_TRADE_DOCS]
        on_b = sorted(on_b, key=lambda d: lengths[d])[:_TRADE_DOCS]
    for j, k in itertools.product(on_a, on_b):
        if lengths[j] <= lengths[k]:
            continue
        (hj, sj), (hk, sk) = placed[j], placed[k]
        if fresh != (b not in hj or a not in hk):
            continue
        most = min(sj[hj.index(a)], sk[hk.index(b)]) - 2 * _MIN_PIECE
        ideal = int((load[a] - load[b]) / (lengths[j] - lengths[k]))
        for delta in {ideal // _TILE * _TILE, -(-ideal // _TILE) * _TILE}:
            if not 0 < delta <= most or (fresh and delta < 2 * _MIN_PIECE):
                continue
            traded = {j: _shifted(placed[j], a, b, delta), k: _shifted(placed[k], b, a, delta)}
            new = list(load)
            for d, now in traded.items():
                _add_costs(new, lengths[d], placed[d], -1)
                _add_costs(new, lengths[d], now)
            if max(new) < max(load) and (best is None or max(new) < max(best[0])):
                best = (new, traded)
    return best


def _shifted(place, giver: int, taker: int, delta: int):
    """``(holders, shares)`` of a document after ``giver`` hands ``delta`` of its tokens to
    ``taker`` (appended as the last holder if it holds none)."""
    holders, shares = list(place[0]), list(place[1])
    if taker not in holders:
        holders.append(taker)
        shares.append(0)
    shares[holders.index(giver)] -= delta
    shares[holders.index(taker)] += delta
    return holders, shares


def _greedy(lengths: list[int], world: int) -> tuple[float, dict]:
    """``_place`` under each threshold of ``_SPREAD_CAPS``, fewest spread documents first: the
    slowest rank's work and the placement of the one whose slowest rank has the least."""
    n_local = sum(lengths) // world
    fair = sum(_run_cost(0, n) for n in lengths) / world
    spreads = {tuple(_holders_wanted(n, world, n_local, cap * fair) for n in lengths) for cap in _SPREAD_CAPS}
    best = None
    for wanted in sorted(spreads, key=sum):
        got = _place(lengths, world, n_local, wanted)
        best = got if best is None or got[0] < best[0] else best
        if best[0] <= _EVEN * fair:  # as even as it gets: spreading more only adds pieces
            break
    return best


@functools.lru_cache(maxsize=128)
def _balanced(cu: tuple[int, ...], world: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Per rank, its ``(doc, pos0, count)`` runs in local order, for the ``balanced`` layout."""
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    slowest, placed = _greedy(lengths, world)
    if slowest > _EVEN * sum(_run_cost(0, n) for n in lengths) / world:
        placed = _rebalance(lengths, placed, world)
    runs = [[] for _ in range(world)]
    for d, (holders, shares) in placed.items():
        for r, pieces in zip(holders, _zigzag_split(lengths[d], shares), strict=True):
            runs[r] += [(d, pos0, count) for pos0, count in pieces]
    return tuple(tuple(sorted(rr)) for rr in runs)
