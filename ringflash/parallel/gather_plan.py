"""The all-gather method's plan for one rank: which calls it makes and which rows it exchanges.

A document held by several ranks is *shared*: every rank that holds queries of it receives the keys
those queries can see (``_reach``: under a causal mask none past the rank's last query in the
document; under a window none before its first query's reach), in stream order, so that each
local query run of a document meets the document's keys in one sequence of a packed call. A
document whole on one rank is *local*: its calls read the rank's own K/V. ``gather_plan`` gives a
rank's calls on each kind, the rows it sends to and receives from every rank, and where the
gradients of its sent rows come back (``ringflash.parallel.allgather`` runs the plan).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch

from .doc_layouts import DocSegment, _calls, _coalesce_full, _pairs, _two_part, doc_segments
from .layouts import Piece, _band, _mask_args


@dataclass(frozen=True)
class GatherPlan:
    """One rank's all-gather plan.

    ``local``: calls on the rank's own K/V (documents whole on this rank). ``shared``: calls on the
    gathered K/V. ``send[d]``: this rank's local rows that rank ``d`` reads (rows of documents held
    by several ranks; ``send[rank]``: those it reads itself), in the order ``d`` places them;
    ``recv[s]``: how many rows it receives from rank ``s``. The exchange's blocks are a
    destination's K rows then its V rows. ``own``: the local rows of shared documents (the union
    of ``send``); ``home[d]``: the position in ``own`` of each row of ``send[d]``, where its
    gradient comes back. ``moves``: some rank sends a row (the same on every rank, so every rank
    joins the collective or none does). ``src``: ``[2, n]``, for every gathered key (the shared
    documents that this rank holds queries of, in stream order), its K row and its V row in the
    received blocks (None: stripe, whose received blocks in rank order are the gathered keys).
    ``write_once``: no local row is in two calls' sequences; ``covers_all``: moreover every local
    row is in one; ``keys_once``: no gathered key is in two sequences (a document's two runs on
    this rank are one sequence), so the backward writes the gathered keys' dK/dV instead of adding;
    ``keys_covered``: moreover every gathered key is in one (causal masks: a rank gathers each
    document's keys up to its last query only), so no gathered key's dK/dV needs a zero fill.
    """

    local: tuple[Piece, ...]
    shared: tuple[Piece, ...]
    send: tuple[torch.Tensor, ...]
    recv: tuple[int, ...]
    own: torch.Tensor
    home: tuple[torch.Tensor, ...]
    moves: bool
    src: torch.Tensor | None
    write_once: bool = False
    covers_all: bool = False
    keys_once: bool = False
    keys_covered: bool = False
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, key, device: torch.device, make) -> torch.Tensor:
        """The index tensor ``make()`` (derived from the plan) on ``device``, made and copied there
        once under ``key``: a copy from the host on every call would wait for the device."""
        key = (key, str(device))
        if key not in self.copies:
            self.copies[key] = make().to(device)
        return self.copies[key]


def _spans(layout: str, cu: tuple[int, ...], world: int) -> list[int]:
    """How many ranks hold tokens of each document."""
    holders = [set() for _ in range(len(cu) - 1)]
    for r in range(world):
        for s in doc_segments(layout, cu, r, world):
            if s.count:
                holders[s.doc].add(r)
    return [len(h) for h in holders]


@functools.lru_cache(maxsize=64)
def gather_plan(layout: str, cu: tuple[int, ...], rank: int, world: int, causal: bool, window) -> GatherPlan:
    """This rank's calls on its own and on the gathered keys, and the rows it exchanges."""
    n_local = cu[-1] // world
    if layout == "stripe" and world > 1:
        pieces = []
        for s in range(world):  # the ring's pairs with the block of rank s, shifted into place
            pairs = []
            for sq in doc_segments(layout, cu, rank, world):
                for sk in doc_segments(layout, cu, s, world):
                    if sk.doc != sq.doc:
                        continue
                    args = _mask_args(*_band(sq.pos0, sk.pos0, sq.stride, causal, window), sq.count, sk.count)
                    if args is not None:
                        pairs.append((sq.local0, sq.count, s * n_local + sk.local0, sk.count, args))
            pieces += _calls(_coalesce_full(pairs))
        every = torch.arange(n_local)
        return GatherPlan(
            (), tuple(pieces), (every,) * world, (n_local,) * world, every, (every,) * world, True, None
        )
    shared = [n > 1 for n in _spans(layout, cu, world)]
    segs_of = [[s for s in doc_segments(layout, cu, r, world) if s.count] for r in range(world)]
    # The keys each rank reads of each shared document it holds queries of: ``reach[d][doc]``,
    # positions [k0, k1) in the document (causal: up to its last query; a window: from its first
    # query's reach), so a rank receives no key that none of its queries sees past its reach.
    reach = [_reach(segs, shared, cu, causal, window) for segs in segs_of]
    segs = segs_of[rank]
    mine = {s.local0 for s in segs if not shared[s.doc]}
    own_pairs = [p for p in _pairs(layout, cu, rank, rank, world, causal, window) if p[0] in mine]
    local = _calls(_coalesce_full(own_pairs))
    start, at = {}, 0  # each read document's first gathered row (its key k0 of reach)
    for d, (k0, k1) in sorted(reach[rank].items()):
        start[d] = at - k0
        at += k1 - k0

    def rows_for(r: int, d: int) -> list[DocSegment]:  # rank r's rows that rank d reads
        return [x for s in segs_of[r] if s.doc in reach[d] for x in _clip(s, *reach[d][s.doc])]

    send = tuple(_rows(rows_for(rank, d)) for d in range(world))
    recv = tuple(sum(s.count for s in rows_for(r, rank)) for r in range(world))
    own = _rows([s for s in segs if shared[s.doc]])
    where = torch.full((n_local,), -1, dtype=torch.int64)
    where[own] = torch.arange(len(own))
    home = tuple(where[x] for x in send)
    src, block = torch.empty((2, at), dtype=torch.int64), 0
    for r in range(world):  # rank r's block: its K rows for this rank, then its V rows
        i = 0
        for s in rows_for(r, rank):
            dest = start[s.doc] + s.pos0
            src[0, dest : dest + s.count] = torch.arange(block + i, block + i + s.count)
            src[1, dest : dest + s.count] = src[0, dest : dest + s.count] + recv[r]
            i += s.count
        block += 2 * recv[r]
    pairs = []
    for sq in segs:
        if not shared[sq.doc]:
            continue
        k0, k1 = _keys_seen(sq, cu[sq.doc + 1] - cu[sq.doc], causal, window)
        if k0 >= k1:
            continue
        args = _mask_args(*_band(sq.pos0, k0, 1, causal, window), sq.count, k1 - k0)
        if args is not None:
            pairs.append((sq.local0, sq.count, start[sq.doc] + k0, k1 - k0, args))
    pairs = _two_part(pairs)  # a document's two runs on this rank: one sequence
    q_runs = sorted((p[0], p[0] + p[1]) for p in [*pairs, *own_pairs])
    once = all(a[1] <= b[0] for a, b in itertools.pairwise(q_runs))  # no row in two calls
    covers = once and sum(b - a for a, b in q_runs) == n_local
    k_runs = sorted((p[2], p[2] + p[3]) for p in pairs)
    keys_once = all(a[1] <= b[0] for a, b in itertools.pairwise(k_runs))
    keys_covered = keys_once and sum(b - a for a, b in k_runs) == at
    return GatherPlan(
        tuple(local),
        tuple(_calls(pairs)),
        send,
        recv,
        own,
        home,
        any(shared),
        src,
        once,
        covers,
        keys_once,
        keys_covered,
    )


def received_rows(layout: str, cu: tuple[int, ...], world: int, causal: bool, window) -> list[int]:
    """Rows each rank receives from the others (``sum(recv)`` less its own, of every rank's
    ``gather_plan``), counted without building the plans: a rank reads every key of each shared
    document it holds queries of within its reach, and holds some of them itself."""
    n_local = cu[-1] // world
    if layout == "stripe" and world > 1:
        return [n_local * (world - 1)] * world
    shared = [n > 1 for n in _spans(layout, cu, world)]
    out = []
    for r in range(world):
        segs = [s for s in doc_segments(layout, cu, r, world) if s.count]
        reach = _reach(segs, shared, cu, causal, window)
        own = sum(x.count for s in segs if s.doc in reach for x in _clip(s, *reach[s.doc]))
        out.append(sum(k1 - k0 for k0, k1 in reach.values()) - own)
    return out


def _keys_seen(sq: DocSegment, n_doc: int, causal: bool, window) -> tuple[int, int]:
    """Positions ``[k0, k1)`` in its document of the keys that the queries of ``sq`` (stride 1)
    can see."""
    lo, hi = _band(sq.pos0, 0, 1, causal, window)  # keys at their positions in the document
    k0 = 0 if lo == -math.inf else max(0, int(lo))
    k1 = n_doc if hi == math.inf else min(n_doc, sq.count + int(hi))
    return k0, k1


def _reach(segs, shared, cu, causal, window) -> dict[int, tuple[int, int]]:
    """``{doc: (k0, k1)}``: for every shared document a rank holds queries of, the positions of
    the keys they can see (the hull over its segments of the document)."""
    reach = {}
    for s in segs:
        if shared[s.doc]:
            k0, k1 = _keys_seen(s, cu[s.doc + 1] - cu[s.doc], causal, window)
            a, b = reach.get(s.doc, (k0, k1))
            reach[s.doc] = (min(a, k0), max(b, k1))
    return reach


def _clip(s: DocSegment, k0: int, k1: int) -> list[DocSegment]:
    """The part of segment ``s`` (stride 1) at positions ``[k0, k1)`` of its document."""
    a, b = max(k0 - s.pos0, 0), min(k1 - s.pos0, s.count)
    return [DocSegment(s.doc, s.local0 + a, b - a, s.pos0 + a, 1)] if a < b else []


def _rows(segs) -> torch.Tensor:
    """The local rows of ``segs``, in their order."""
    if not segs:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(s.local0, s.local0 + s.count) for s in segs])


def _sizes(plan: GatherPlan) -> tuple[list[int], list[int]]:
    """Rows this rank sends to and receives from each rank in the exchange of K and V (a block is
    K rows, then as many V rows)."""
    return [2 * len(x) for x in plan.send], [2 * n for n in plan.recv]


__all__ = ["GatherPlan", "gather_plan", "received_rows"]
