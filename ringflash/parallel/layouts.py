"""Sequence layouts and the per-step compute plan of the ring.

A layout says which global token positions each of the ``W`` ranks holds. Every layout gives each
rank ``L = S / W`` tokens, described as *segments*: runs of local tokens whose global positions form
an arithmetic progression ``global0 + i * stride``:

    contiguous  rank r holds [r*L, (r+1)*L)                         one segment, stride 1
    zigzag      2W chunks of C = L/2; rank r holds chunks r, 2W-1-r  two segments, stride 1
    stripe      token t goes to rank t % W (stripes of one token)    one segment, stride W

Between a query segment (global ``gq + i*P``) and a key segment (``gk + j*P``) the global mask
``LO <= pos_k - pos_q <= HI`` (``HI = 0`` for causal, ``window_right`` or +inf otherwise,
``LO = -window_left`` or -inf) is exactly a band on local indices:

    ceil((LO + gq - gk) / P)  <=  j - i  <=  floor((HI + gq - gk) / P)

which the local kernels express as a diag offset plus a window (``ringflash.masking``). So every
ring step is a handful of ordinary local attention calls with exact masks; blocks whose band is
empty are skipped, and blocks that are fully visible run unmasked. For stripe with causal this is
``diag = 0`` when the key rank ``s <= r`` and ``diag = -1`` when ``s > r`` (keys of later ranks at
the same local index sit later in the sequence).

The plan for step ``t`` of rank ``r`` pairs r's queries with the keys of rank ``(r - t) mod W`` (K/V
travel from rank r to r+1 each step). Steps past the last one that any rank needs (a sliding
window that does not reach that far back) are dropped: neither computed nor communicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..masking import is_fully_masked, is_masked_free

LAYOUTS = ("contiguous", "zigzag", "stripe")
DOC_LAYOUTS = (*LAYOUTS, "balanced")  # a packed stream's layouts (``doc_layouts``)


@dataclass(frozen=True)
class Segment:
    """Local tokens ``[local0, local0 + count)`` at global positions ``global0 + i * stride``."""

    local0: int
    count: int
    global0: int
    stride: int


@dataclass
class Piece:
    """One local attention call of a ring step: ``q[q0:q1]`` against ``k[k0:k1]`` with a mask.

    ``causal``/``diag``/``window`` follow ``ringflash.masking`` in the piece's own local indices.
    For packed (varlen) pieces ``cu_q``/``cu_k`` are the piece-relative cumulative lengths and
    ``diag`` one offset per sequence.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    diag: int | list[int]
    window: tuple[int, int]
    full: bool = False
    cu_q: list[int] | None = None
    cu_k: list[int] | None = None
    tensors: dict = field(default_factory=dict, repr=False)  # device copies, filled lazily


@dataclass
class Plan:
    """What one rank computes at each ring step; ``steps[t]`` pairs it with rank ``(rank - t) % W``.

    ``reach[b]`` is how many hops the K/V block of rank ``b`` travels (every rank's plan holds the
    same table): rank ``r`` receives a block at step ``t`` only while ``t <= reach[(r - t) % W]``.
    A regular plan sends every block ``n_steps - 1`` hops; a packed stream of short documents
    sends blocks no further than the farthest rank that one of their documents reaches.
    """

    rank: int
    world: int
    steps: list[list[Piece]]
    reach: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.reach:
            self.reach = (len(self.steps) - 1,) * self.world

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def regular(self) -> bool:
        """Every block travels the same number of hops (``n_steps - 1``)."""
        return all(h == self.n_steps - 1 for h in self.reach)

    def holds(self, t: int) -> bool:
        """Whether this rank holds a K/V block at step ``t`` (the block of rank ``rank - t``)."""
        return t == 0 or (t < self.n_steps and t <= self.reach[(self.rank - t) % self.world])

    def sends(self, t: int) -> bool:
        """Whether the block this rank holds at step ``t`` goes on to the next rank."""
        return self.holds(t) and t + 1 <= self.reach[(self.rank - t) % self.world]


def check_layout(layout: str | None, packed: bool = False) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of ``LAYOUTS`` (of ``DOC_LAYOUTS`` for a packed
    stream, which adds ``"balanced"``)."""
    allowed = DOC_LAYOUTS if packed else LAYOUTS
    if layout in allowed:
        return
    if layout is None:
        raise ValueError(
            "layout is required: the one the attention function takes its shards in (ring_flash_attn_func: "
            "'contiguous', zigzag_ring_flash_attn_func: 'zigzag', stripe_flash_attn_func: 'stripe'; "
            "ring_flash_attn_varlen_func and the transformers backend: their own layout argument, "
            f"'contiguous' by default); one of {allowed}"
        )
    if layout in DOC_LAYOUTS:
        raise ValueError(
            f"layout {layout!r} places whole documents on ranks: it is for packed streams (pass "
            f"cu_seqlens); a padded sequence takes one of {LAYOUTS}"
        )
    raise ValueError(f"unknown layout {layout!r}: expected one of {allowed}")


def segments(layout: str, rank: int, world: int, n_local: int) -> list[Segment]:
    """The segments of rank ``rank``'s ``n_local`` tokens in ``layout``."""
    check_layout(layout)
    if layout == "contiguous" or world == 1:
        return [Segment(0, n_local, rank * n_local, 1)]
    if layout == "zigzag":
        c = n_local // 2
        return [Segment(0, c, rank * c, 1), Segment(c, c, (2 * world - 1 - rank) * c, 1)]
    return [Segment(0, n_local, rank, world)]


def local_len_error(layout: str, world: int, n_local: int) -> str | None:
    """Why ``n_local`` tokens per rank do not fit ``layout`` (None when they do)."""
    if layout == "zigzag" and world > 1 and n_local % 2:
        return (
            f"zigzag needs an even number of tokens per rank (2 chunks each, the sequence split into "
            f"2 * world_size = {2 * world} chunks), got {n_local} per rank"
        )
    return None


def check_global_total(total: int, world: int, n_local: int, across: str) -> None:
    """Raise ``ValueError`` unless a packed call's ``cu_seqlens`` (ending at ``total``) describe the
    whole stream of ``world`` ranks holding ``n_local`` tokens each (``across``: "the ring", ...):
    the mistake it catches is passing the cu_seqlens of this rank's shard."""
    if total != world * n_local:
        raise ValueError(
            f"cu_seqlens must describe the whole packed stream across {across} (global cu_seqlens): "
            f"its total is {total}, but world_size * local tokens = {world} * {n_local} = "
            f"{world * n_local}. Pass the global cu_seqlens, not the cu_seqlens of this rank's shard."
        )


def positions(layout: str, rank: int, world: int, n_local: int) -> torch.Tensor:
    """Global positions (int64) of rank ``rank``'s local tokens, in local order."""
    parts = [
        seg.global0 + seg.stride * torch.arange(seg.count) for seg in segments(layout, rank, world, n_local)
    ]
    return torch.cat(parts)


def _band(gq: int, gk: int, stride: int, causal: bool, window: tuple[int, int]) -> tuple[float, float]:
    """Bounds on local ``j - i`` between a query run at ``gq`` and a key run at ``gk`` (infinite
    where unbounded); elementwise for int64 tensors of ``gq``, ``gk`` and ``stride``."""
    left, right = window
    x = gq - gk
    hi = 0 if causal else (right if right >= 0 else math.inf)
    lo = -left if left >= 0 else -math.inf
    hi_l = math.inf if hi == math.inf else (hi + x) // stride  # floor
    lo_l = -math.inf if lo == -math.inf else -((-lo - x) // stride)  # ceil
    return lo_l, hi_l


ORDER_TILE = 128  # the rows a program takes, as far as ordering sequences by their heaviest one goes


def seq_order(pc: Piece) -> list[list[int]] | None:
    """The order in which the kernels' programs should take a packed piece's sequences: row 0
    for query tiles (forward, dQ), row 1 for key tiles (dK/dV), each sequence ranked by its
    heaviest tile (the most keys one tile of ``ORDER_TILE`` query rows sees; the most queries one
    tile of keys is seen by), heaviest first. In stream order a packed call's longest programs
    (the end of a long document) may start in its last wave and run alone; heaviest first, the
    short ones fill in behind them. None when stream order is already that order (one sequence,
    or sorted)."""
    if pc.cu_q is None or len(pc.cu_q) < 3:
        return None
    causal, window = pc.causal, pc.window
    rows = []
    for i in range(len(pc.cu_q) - 1):
        nq, nk = pc.cu_q[i + 1] - pc.cu_q[i], pc.cu_k[i + 1] - pc.cu_k[i]
        d = pc.diag[i] if isinstance(pc.diag, list) else pc.diag
        d_last = d[2] if isinstance(d, tuple) else d  # a two-part diagonal's later rows see further
        d_first = d[0] if isinstance(d, tuple) else d
        right = 0 if causal else window[1]
        hi = d_last + right if right >= 0 else math.inf
        lo = d_first - window[0] if window[0] >= 0 else -math.inf
        rows.append((_heaviest(nq, nk, lo, hi), _heaviest(nk, nq, -hi, -lo)))
    stream = list(range(len(rows)))
    order = [sorted(stream, key=lambda i, side=side: -rows[i][side]) for side in (0, 1)]
    return None if order == [stream, stream] else order


def _heaviest(n_rows: int, n_cols: int, lo: float, hi: float) -> int:
    """The most columns ``j`` that one tile of ``ORDER_TILE`` rows sees, row ``i`` seeing ``lo <=
    j - i <= hi`` (bounds that may be infinite), over the tiles of ``n_rows`` rows."""
    best = 0
    for a in range(0, n_rows, ORDER_TILE):
        b = min(n_rows, a + ORDER_TILE) - 1
        first = 0 if lo == -math.inf else max(0, a + lo)
        last = n_cols - 1 if hi == math.inf else min(n_cols - 1, b + hi)
        best = max(best, last - first + 1)
    return int(best)


def _mask_args(lo: float, hi: float, nq: int, nk: int):
    """``(causal, diag, window, full)`` for a local band, or None when nothing is visible."""
    if lo > hi or is_fully_masked(lo, hi, 0, nq, 0, nk):
        return None
    if is_masked_free(lo, hi, 0, nq, 0, nk):
        return False, 0, (-1, -1), True
    if hi != math.inf:
        return True, int(hi), ((int(hi - lo) if lo != -math.inf else -1), 0), False
    return False, int(lo), (0, -1), False


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge fully visible pieces that share a query (key) range and touch along keys (queries)."""
    changed = True
    while changed:
        changed = False
        for a in pieces:
            for b in pieces:
                if a is b or not (a.full and b.full):
                    continue
                if (a.q0, a.q1) == (b.q0, b.q1) and a.k1 == b.k0:
                    a.k1 = b.k1
                elif (a.k0, a.k1) == (b.k0, b.k1) and a.q1 == b.q0:
                    a.q1 = b.q1
                else:
                    continue
                pieces.remove(b)
                changed = True
                break
            if changed:
                break
    return pieces


def _one_band(blocks) -> tuple[float, float] | None:
    """One band ``L <= J - I <= H`` on local indices that gives exactly the visibility of every
    block ``(sq, sk, lo, hi)`` (segment pair and its own band), or None when there is none.

    Inside a block, the visible pairs are those whose ``J - I`` lies in the block's band shifted to
    local indices and clipped to the diagonals the block spans (every such diagonal crosses it), so
    two bands agree on a block exactly when their clipped intervals are equal (or both empty).
    """
    clipped = []
    for sq, sk, lo, hi in blocks:
        shift = sk.local0 - sq.local0
        dmin, dmax = sk.local0 - (sq.local0 + sq.count - 1), (sk.local0 + sk.count - 1) - sq.local0
        a, b = max(lo + shift, dmin), min(hi + shift, dmax)
        clipped.append((dmin, dmax, (a, b) if a <= b else None))
    seen = [c for _, _, c in clipped if c is not None]
    if not seen:
        return None
    lo_all, hi_all = min(a for a, _ in seen), max(b for _, b in seen)
    for dmin, dmax, c in clipped:
        a, b = max(lo_all, dmin), min(hi_all, dmax)
        if (c is None) != (a > b) or (c is not None and c != (a, b)):
            return None
    return lo_all, hi_all


def step_pieces(
    layout: str, q_rank: int, k_rank: int, world: int, n_local: int, causal: bool, window: tuple[int, int]
) -> list[Piece]:
    """The local attention calls between ``q_rank``'s queries and ``k_rank``'s keys.

    When one band on local indices gives exactly the step's mask (zigzag's own block under a
    causal mask: local order is global order), the step is ONE call over all local tokens: one
    launch and one pass over the float32 state instead of one per segment pair.
    """
    pieces, blocks = [], []
    segs_q, segs_k = segments(layout, q_rank, world, n_local), segments(layout, k_rank, world, n_local)
    for sq in segs_q:
        for sk in segs_k:
            lo, hi = _band(sq.global0, sk.global0, sq.stride, causal, window)
            blocks.append((sq, sk, lo, hi))
            args = _mask_args(lo, hi, sq.count, sk.count)
            if args is None:
                continue
            c, d, w, full = args
            pieces.append(
                Piece(sq.local0, sq.local0 + sq.count, sk.local0, sk.local0 + sk.count, c, d, w, full)
            )
    if len(pieces) > 1 and all(sq.stride == 1 for sq in segs_q):
        band = _one_band(blocks)
        if band is not None:
            # Bounds at the rectangle's extreme diagonals constrain nothing: leave them open, so
            # the kernels get a plain causal (or full) mask where that is what the band is.
            lo = -math.inf if band[0] <= -(n_local - 1) else band[0]
            hi = math.inf if band[1] >= n_local - 1 else band[1]
            args = _mask_args(lo, hi, n_local, n_local)  # q and k both start at local 0
            if args is not None:
                return [Piece(0, n_local, 0, n_local, *args)]
    return _coalesce(pieces)


def trim(per_rank: list[list[list[Piece]]], rank: int, world: int, reach: bool = False) -> Plan:
    """Keep steps up to the last one that any rank needs (all ranks must agree on the count).

    With ``reach``, each block travels only as far as the last rank that needs it (``Plan.reach``).
    """
    n = 1
    hops = [0] * world
    for r, steps in enumerate(per_rank):
        for t, ps in enumerate(steps):
            if ps and t:
                n = max(n, t + 1)
                b = (r - t) % world
                hops[b] = max(hops[b], t)
    return Plan(rank, world, per_rank[rank][:n], tuple(hops) if reach else ())


def build_plan(
    layout: str, rank: int, world: int, n_local: int, causal: bool, window: tuple[int, int]
) -> Plan:
    """The ring plan of ``rank`` for a padded batch with ``n_local`` tokens per rank."""
    per_rank = [
        [step_pieces(layout, r, (r - t) % world, world, n_local, causal, window) for t in range(world)]
        for r in range(world)
    ]
    return trim(per_rank, rank, world)
