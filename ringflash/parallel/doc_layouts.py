"""Layouts of a packed stream of documents over ``W`` ranks.

A packed stream of ``T`` tokens holds documents ``[cu[d], cu[d+1])``. Each rank holds ``T / W``
of its tokens, described as *document segments*: runs of local tokens of one document whose
positions in the document form an arithmetic progression ``pos0 + i * stride``.

    contiguous  rank r holds stream tokens [r*T/W, (r+1)*T/W): each document it meets is one
                segment (documents may cross shards).
    zigzag      every document is cut into 2W pieces as equal as possible (sizes differ by at
                most one); rank r holds pieces r and 2W-1-r of every document, document by
                document: [doc0 piece r, doc0 piece 2W-1-r, doc1 piece r, ...]. Which pieces get
                a document's extra tokens rotates from one document to the next, so every rank
                holds T / W tokens whenever W divides T, whatever the documents' lengths.
    stripe      stream token p goes to rank p % W: inside a document, every W-th token, starting
                where the stream's stripe falls (one segment of stride W per document).
    balanced    documents stay whole on one rank where they can: the long ones (those whose causal
                work would unbalance the ranks) are cut into 2W pieces as in zigzag, and the
                others are dealt whole to the ranks, most work first, each to the rank with the
                least work that still has room; a document that fits no rank's room is cut into
                consecutive parts over the ranks with the most room. Every rank holds its tokens
                in document order. Short documents then need no communication at all.

Zigzag and stripe balance causal work per document, as the padded layouts do per sequence; a
document shorter than 2W (or W) tokens leaves some pieces empty, which is fine. Balanced keeps the
kernel calls long (a zigzag piece of a 1k document over 8 ranks is 64 tokens). Only the total must
divide by W.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from .layouts import DOC_LAYOUTS, Piece, Plan, _band, _mask_args, trim


@dataclass(frozen=True)
class DocSegment:
    """Local tokens ``[local0, local0 + count)`` of document ``doc`` at positions ``pos0 + i * stride``
    of that document (its own token indices, 0 at its first token)."""

    doc: int
    local0: int
    count: int
    pos0: int
    stride: int


def total_error(world: int, total: int, layout: str) -> str | None:
    """Why a packed stream of ``total`` tokens cannot be sharded over ``world`` ranks (None if it can)."""
    if total % world:
        return (
            f"the packed stream holds {total} tokens, which does not divide by the world size {world}: "
            f"pad the stream (e.g. with a last document of padding tokens whose labels are -100) to a "
            f"multiple of {world}"
        )
    return None


def _zigzag_pieces(lengths: list[int], world: int) -> list[list[int]]:
    """Piece sizes ``[2W]`` of every document: as equal as possible, the extra tokens going to the
    pieces that follow the previous document's extras (so every rank ends up with as many)."""
    n_pieces, start, sizes = 2 * world, 0, []
    for n in lengths:
        base, extra = divmod(n, n_pieces)
        got = [base] * n_pieces
        for j in range(extra):
            got[(start + j) % n_pieces] += 1
        start = (start + extra) % n_pieces
        sizes.append(got)
    return sizes


def _zigzag_runs(sizes: list[int], rank: int, world: int) -> list[tuple[int, int]]:
    """``(pos0, count)`` of rank ``rank``'s two zigzag pieces of a document cut into ``sizes``
    (pieces ``r`` and ``2W-1-r``, the empty ones left out), in position order."""
    offsets = [0, *itertools.accumulate(sizes)]
    return [(offsets[j], sizes[j]) for j in (rank, 2 * world - 1 - rank) if sizes[j]]


def _run_cost(pos0: int, count: int) -> float:
    """Causal work of ``count`` queries at document positions ``pos0 ..``: the pairs they see, the
    query count rounded up to a kernel tile (a short run still costs a tile)."""
    return -(-count // _TILE) * _TILE * (pos0 + (count + 1) / 2)


_TILE = 64
_MIN_PIECE = 128  # a document is cut into zigzag pieces only if they hold this many tokens each
# Documents whose causal work exceeds this fraction of a rank's fair share are candidates for
# cutting into zigzag pieces; the layout keeps the candidate set that balances best.
_SPLIT_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625)
_GOOD_ENOUGH = 1.03  # the slowest rank's work over the fair share that stops the search


def _deal(lengths, whole, room, load):
    """Deal documents ``whole`` (indices, most work first) to ranks with ``room`` tokens left and
    ``load`` work so far: each to the least-loaded rank with room for it, or, when none has, in
    consecutive parts to the ranks with the most room. Returns ``[(rank, doc, pos0, count)]``."""
    placed = []
    for d in whole:
        n = lengths[d]
        fits = [r for r in range(len(room)) if room[r] >= n]
        if fits:
            r = min(fits, key=lambda r: (load[r], -room[r]))
            placed.append((r, d, 0, n))
            room[r] -= n
            load[r] += _run_cost(0, n)
            continue
        pos = 0
        while pos < n:
            r = max(range(len(room)), key=lambda r: (room[r], -load[r]))
            c = min(room[r], n - pos)
            placed.append((r, d, pos, c))
            room[r] -= c
            load[r] += _run_cost(pos, c)
            pos += c
    return placed


@functools.lru_cache(maxsize=128)
def _balanced(cu: tuple[int, ...], world: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Per rank, its ``(doc, pos0, count)`` runs in local order, for the ``balanced`` layout."""
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    n_local = cu[-1] // world
    by_work = sorted((d for d in range(len(lengths)) if lengths[d]), key=lambda d: -lengths[d])
    fair = sum(_run_cost(0, n) for n in lengths) / world
    best, tried = None, set()
    cuttable = [d for d in by_work if lengths[d] >= 2 * world * _MIN_PIECE]
    for frac in (math.inf, *_SPLIT_FRACTIONS):
        split = [d for d in cuttable if _run_cost(0, lengths[d]) > frac * fair]
        if tuple(split) in tried:
            continue
        tried.add(tuple(split))
        room, load, placed = [n_local] * world, [0.0] * world, []
        pieces = _zigzag_pieces([lengths[d] for d in split], world)
        for d, sizes in zip(split, pieces, strict=True):
            for r in range(world):
                for pos0, count in _zigzag_runs(sizes, r, world):
                    placed.append((r, d, pos0, count))
                    room[r] -= count
                    load[r] += _run_cost(pos0, count)
        if min(room) < 0:  # the zigzag extras of the cut documents overfill a rank: not this set
            continue
        cut = set(split)
        placed += _deal(lengths, [d for d in by_work if d not in cut], room, load)
        if best is None or max(load) < best[0]:
            best = (max(load), split, placed)
        if best[0] <= _GOOD_ENOUGH * fair:  # fewer cut documents: fewer transfers and longer calls
            break
    runs = [[] for _ in range(world)]
    for r, d, pos0, count in best[2]:
        runs[r].append((d, pos0, count))
    return tuple(tuple(sorted(rr)) for rr in runs)


@functools.lru_cache(maxsize=128)
def doc_segments(layout: str, cu: tuple[int, ...], rank: int, world: int) -> tuple[DocSegment, ...]:
    """The segments of rank ``rank``'s tokens, in local order, for the packed stream ``cu``."""
    if layout not in DOC_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {DOC_LAYOUTS}")
    total = cu[-1]
    err = total_error(world, total, layout)
    if err:
        raise ValueError(err)
    n_local = total // world
    segs, local = [], 0
    if layout == "contiguous" or world == 1:
        lo, hi = rank * n_local, (rank + 1) * n_local
        for d, (a, b) in enumerate(itertools.pairwise(cu)):
            s, e = max(a, lo), min(b, hi)
            if s < e:
                segs.append(DocSegment(d, s - lo, e - s, s - a, 1))
        return tuple(segs)
    if layout == "zigzag":
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        for d, sizes in enumerate(_zigzag_pieces(lengths, world)):
            for pos0, count in _zigzag_runs(sizes, rank, world):
                segs.append(DocSegment(d, local, count, pos0, 1))
                local += count
        return tuple(segs)
    if layout == "balanced":
        for d, pos0, count in _balanced(cu, world)[rank]:
            segs.append(DocSegment(d, local, count, pos0, 1))
            local += count
        return tuple(segs)
    for d, (a, b) in enumerate(itertools.pairwise(cu)):
        first = (rank - a) % world  # first position i of the document with (a + i) % W == rank
        if first < b - a:
            count = (b - a - first + world - 1) // world
            segs.append(DocSegment(d, local, count, first, world))
            local += count
    return tuple(segs)


def doc_positions(layout: str, cu: tuple[int, ...], rank: int, world: int) -> torch.Tensor:
    """Stream indices (int64) of rank ``rank``'s local tokens, in local order."""
    parts = [
        cu[s.doc] + s.pos0 + s.stride * torch.arange(s.count) for s in doc_segments(layout, cu, rank, world)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


# ------------------------------------------------------------------------------ the ring's plan


def _pairs(layout, cu, q_rank, k_rank, world, causal, window):
    """``(q0, nq, k0, nk, (causal, diag, window, full))`` for every pair of a query segment and a
    key segment of one document that sees anything (the band of ``layouts._band``)."""
    segs_q, segs_k = doc_segments(layout, cu, q_rank, world), doc_segments(layout, cu, k_rank, world)
    by_doc: dict[int, list[DocSegment]] = {}
    for s in segs_k:
        by_doc.setdefault(s.doc, []).append(s)
    own_band = q_rank == k_rank and layout != "stripe" and causal and window[0] < 0
    pairs = []
    if own_band:
        # A rank's own segments of one document in local order are in position order, so the
        # causal mask between them is the local diagonal: one pair per document.
        for ss in by_doc.values():
            first, last = ss[0], ss[-1]
            n = last.local0 + last.count - first.local0
            pairs.append((first.local0, n, first.local0, n, (True, 0, (-1, 0), False)))
        return pairs
    for sq in segs_q:
        for sk in by_doc.get(sq.doc, ()):
            lo, hi = _band(sq.pos0, sk.pos0, sq.stride, causal, window)
            args = _mask_args(lo, hi, sq.count, sk.count)
            if args is not None:
                pairs.append((sq.local0, sq.count, sk.local0, sk.count, args))
    return pairs


def _coalesce_full(pairs):
    """Fully visible pairs that share a key run and touch along queries (or the reverse) become one."""
    out = []
    for p in pairs:
        if out and p[4][3] and out[-1][4][3]:
            q0, nq, k0, nk, args = out[-1]
            if (k0, nk) == (p[2], p[3]) and q0 + nq == p[0]:
                out[-1] = (q0, nq + p[1], k0, nk, args)
                continue
            if (q0, nq) == (p[0], p[1]) and k0 + nk == p[2]:
                out[-1] = (q0, nq, k0, nk + p[3], args)
                continue
        out.append(p)
    return out


def _calls(pairs) -> list[Piece]:
    """Pack pairs into packed (varlen) calls: in one call query runs and key runs must increase
    and never overlap (programs of a call write their rows at once). The runs between a call's
    pairs become sequences with no keys (or no queries), which cost nothing."""
    kinds: dict[tuple, list] = {}
    has_causal = any(a[0] and a[2] == (-1, 0) for *_, a in pairs)
    for q0, nq, k0, nk, (causal, diag, window, full) in sorted(pairs):
        if full and has_causal:  # a causal call with a diagonal past every key: nothing masked
            causal, diag, window = True, nk, (-1, 0)
        kinds.setdefault((causal, window), []).append((q0, nq, k0, nk, diag))
    pieces = []
    for (causal, window), items in kinds.items():
        calls: list[list] = []
        for item in items:
            for call in calls:
                last = call[-1]
                if item[0] >= last[0] + last[1] and item[2] >= last[2] + last[3]:
                    call.append(item)
                    break
            else:
                calls.append([item])
        for call in calls:
            q_base, k_base = call[0][0], call[0][2]
            cu_q, cu_k, diags = [0], [0], []
            for q0, nq, k0, nk, diag in call:
                for gap_q, gap_k in ((q0 - q_base - cu_q[-1], 0), (0, k0 - k_base - cu_k[-1])):
                    if gap_q or gap_k:
                        cu_q.append(cu_q[-1] + gap_q)
                        cu_k.append(cu_k[-1] + gap_k)
                        diags.append(0)
                cu_q.append(cu_q[-1] + nq)
                cu_k.append(cu_k[-1] + nk)
                diags.append(diag)
            full = not causal and window == (-1, -1)
            pieces.append(
                Piece(
                    q_base,
                    q_base + cu_q[-1],
                    k_base,
                    k_base + cu_k[-1],
                    causal,
                    diags,
                    window,
                    full,
                    cu_q,
                    cu_k,
                )
            )
    return pieces


@functools.lru_cache(maxsize=64)
def build_doc_plan(
    layout: str, cu: tuple[int, ...], rank: int, world: int, causal: bool, window: tuple[int, int]
) -> Plan:
    """The ring plan of ``rank`` for the packed stream ``cu`` sharded in ``layout``.

    Cached: a plan's pieces keep their index tensors on the device, so a repeated stream copies
    nothing from the host. Each step pairs every local document segment with the segments of the
    same document in the visiting K/V block; a step that shares no visible pair is skipped, and a
    K/V block travels only as far as the last rank that needs it (``Plan.reach``).
    """
    per_rank = [
        [
            _calls(_coalesce_full(_pairs(layout, cu, r, (r - t) % world, world, causal, window)))
            for t in range(world)
        ]
        for r in range(world)
    ]
    return trim(per_rank, rank, world, reach=True)
