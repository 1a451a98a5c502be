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
    balanced    documents stay whole on one rank where they can; the others are spread in
                zigzag over the fewest ranks that balance the work (``doc_balance``). Every rank
                holds its tokens in document order. Short documents then need no communication at
                all.

Zigzag and stripe balance causal work per document, as the padded layouts do per sequence; a
document shorter than 2W (or W) tokens leaves some pieces empty, which is fine. Balanced keeps the
kernel calls long (a zigzag piece of a 1k document over 8 ranks is 64 tokens). Only the total must
divide by W.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ..backends import SPLIT_TILE
from .doc_balance import _balanced
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


def padded_layout(layout: str, cu: tuple[int, ...], world: int) -> str | None:
    """The padded layout whose shards of one sequence are ``layout``'s shards of the packed stream
    ``cu``, when the stream is a single document: its ring then runs as the padded ring of one
    sequence (the same pairs, one plan with the padded layouts' tuned steps). None otherwise."""
    if len(cu) != 2 or world == 1:
        return None
    if layout in ("contiguous", "stripe"):
        return layout
    if cu[-1] % (2 * world):  # the padded zigzag needs equal pieces
        return None
    for r in range(world):
        if not doc_positions(layout, cu, r, world).equal(doc_positions("zigzag", cu, r, world)):
            return None
    return "zigzag"


# ------------------------------------------------------------------------------ the ring's plan


def _pairs(layout, cu, q_rank, k_rank, world, causal, window):
    """``(q0, nq, k0, nk, (causal, diag, window, full))`` for every pair of a query segment and a
    key segment of one document that sees anything (the band of ``layouts._band``)."""
    return list(_visible_pairs(layout, cu, q_rank, k_rank, world, causal, window))


def _sees(layout, cu, q_rank, k_rank, world, causal, window) -> bool:
    """Whether ``_pairs`` has any pair: stops at the first one."""
    return next(_visible_pairs(layout, cu, q_rank, k_rank, world, causal, window), None) is not None


def _visible_pairs(layout, cu, q_rank, k_rank, world, causal, window):
    """Yields the pairs of ``_pairs`` in order."""
    segs_q, segs_k = doc_segments(layout, cu, q_rank, world), doc_segments(layout, cu, k_rank, world)
    by_doc: dict[int, list[DocSegment]] = {}
    for s in segs_k:
        by_doc.setdefault(s.doc, []).append(s)
    if q_rank == k_rank and layout != "stripe" and causal and window[0] < 0:
        # A rank's own segments of one document in local order are in position order, so the
        # causal mask between them is the local diagonal: one pair per document.
        for ss in by_doc.values():
            first, last = ss[0], ss[-1]
            n = last.local0 + last.count - first.local0
            yield (first.local0, n, first.local0, n, (True, 0, (-1, 0), False))
        return
    for sq in segs_q:
        for sk in by_doc.get(sq.doc, ()):
            lo, hi = _band(sq.pos0, sk.pos0, sq.stride, causal, window)
            args = _mask_args(lo, hi, sq.count, sk.count)
            if args is not None:
                yield (sq.local0, sq.count, sk.local0, sk.count, args)


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


def _two_part(pairs):
    """Pairs in order, each causal pair merged with the next when the two are a rank's two runs of
    one document against the same first key (touching query runs, the second after the first in
    the document): one sequence with a two-part diagonal (``kernels.launch_args.varlen_diag``), over the
    second run's keys, so the backward's dK/dV pass runs over the shared keys once instead of once
    per run. Only where the first run's length and last visible key fall on tile boundaries."""
    out = []
    for p in pairs:
        if out:
            q0, nq, k0, nk, (causal, diag, window, full) = out[-1]
            causal2, diag2, window2, full2 = p[4]
            if (
                causal and causal2 and window == window2 == (-1, 0) and not (full or full2)
                and isinstance(diag, int) and q0 + nq == p[0] and k0 == p[2] and nk <= p[3]
                and nq % SPLIT_TILE == 0 and (diag + nq) % SPLIT_TILE == 0 and diag2 >= diag + nq
            ):  # fmt: skip
                out[-1] = (q0, nq + p[1], k0, p[3], (True, (diag, nq, diag2 - nq), window, False))
                continue
        out.append(p)
    return out


def _calls(pairs) -> list[Piece]:
    """Pack pairs into packed (varlen) calls: in one call query runs and key runs must increase
    and never overlap (programs of a call write their rows at once). The runs between a call's
    pairs become sequences with no keys (or no queries), which cost nothing. A pair's diagonal
    may be two-part (``_two_part``)."""
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
    # Other ranks' steps only tell how far each block travels (``trim``): whether they see it.
    per_rank = [
        [
            _calls(_coalesce_full(_pairs(layout, cu, r, (r - t) % world, world, causal, window)))
            if r == rank
            else [True] * _sees(layout, cu, r, (r - t) % world, world, causal, window)
            for t in range(world)
        ]
        for r in range(world)
    ]
    return trim(per_rank, rank, world, reach=True)
