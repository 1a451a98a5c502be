"""The attention calls of packed documents, each timed alone: one device's call on the whole stream
against the simulated ranks' calls, per visible query-key pair (``bench_packed.py --calls``).

The ranks' calls are recorded while the simulator runs them (the backend's ``attn_fwd`` and
``attn_bwd``), then each is timed again on its own (``bench_timing.bench_ms``). Their sum against
the one call's is the cost of the split into smaller calls alone: no data movement around them,
no overlap of two streams, no imbalance between ranks. Per visible pair, the calls on shared
documents (two-part sequences: a rank's two runs of a document against its gathered keys) and
those on whole documents (plain sequences) show which kind of call a split makes slower.
"""

from __future__ import annotations

import contextlib
import math

import torch
from bench_timing import bench_ms

import ringflash as rf
from ringflash.backends import backend_for
from ringflash.parallel import shard_for
from ringflash.parallel.method_cost import band_pairs
from ringflash.parallel.simulate import simulate_ring_attn, simulate_ring_attn_backward


@contextlib.contextmanager
def recorded(backend, calls: list):
    """Append ``(pass, args, kwargs)`` of every ``attn_fwd``/``attn_bwd`` call of ``backend``
    inside the block to ``calls`` (the calls still run)."""
    fwd, bwd = backend.attn_fwd, backend.attn_bwd

    def rec_fwd(*args, **kw):
        calls.append(("fwd", args, kw))
        return fwd(*args, **kw)

    def rec_bwd(*args, **kw):
        calls.append(("bwd", args, kw))
        return bwd(*args, **kw)

    backend.attn_fwd, backend.attn_bwd = rec_fwd, rec_bwd
    try:
        yield
    finally:
        del backend.attn_fwd, backend.attn_bwd  # the class's methods again


def visible_pairs(kind: str, args: tuple, kw: dict) -> int:
    """Query-key pairs that a call's mask lets through (one per position pair, not per head): each
    sequence's rows against its keys around its diagonal (packed: ``diag_offset`` one per
    sequence, or two-part rows ``(diag, split, diag2)``; padded: one offset; none: bottom-right),
    under the causal flag and ``window_size``."""
    q, k = (args[0], args[1]) if kind == "fwd" else (args[1], args[2])
    diag = kw.get("diag_offset")
    diag = None if diag is None else torch.as_tensor(diag).cpu().long()
    if kw.get("cu_seqlens_q") is not None:
        cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
        seqs = [(cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]) for b in range(len(cu_q) - 1)]
    else:
        seqs = [(q.shape[1], k.shape[1])] * q.shape[0]
    left, right = kw.get("window_size", (-1, -1))
    right = 0 if kw.get("causal") else right
    total = 0
    for b, (lq, lk) in enumerate(seqs):
        if diag is None:
            parts = [(0, lq, lk - lq)]
        elif diag.dim() == 2:  # rows from ``split`` on take the second diagonal
            split = min(max(int(diag[b, 1]), 0), lq)
            parts = [(0, split, int(diag[b, 0])), (split, lq, int(diag[b, 2]))]
        else:
            parts = [(0, lq, int(diag.reshape(-1)[b if diag.numel() > 1 else 0]))]
        for r0, r1, d in parts:  # row r0 + i sees key j iff lo <= j - i <= hi
            lo = d + r0 - left if left >= 0 else -math.inf
            hi = d + r0 + right if right >= 0 else math.inf
            total += band_pairs(lo, hi, r1 - r0, lk)
    return total


def _rank_of(kind: str, args: tuple, q_shards) -> int | None:
    """The virtual rank whose query shard a recorded call reads (its storage), None if none."""
    q = args[0] if kind == "fwd" else args[1]
    at = q.untyped_storage().data_ptr()
    return next((r for r, s in enumerate(q_shards) if s.untyped_storage().data_ptr() == at), None)


def _timed(calls: list, who: str, reps: int, q_shards=()) -> list[dict]:
    backend = None
    out = []
    for kind, args, kw in calls:
        backend = backend or backend_for(args[0])
        run = backend.attn_fwd if kind == "fwd" else backend.attn_bwd
        ms = bench_ms(lambda run=run, args=args, kw=kw: run(*args, **kw), rep=reps)
        diag = kw.get("diag_offset")
        two_part = isinstance(diag, torch.Tensor) and diag.dim() == 2
        rank = _rank_of(kind, args, q_shards)
        pairs = visible_pairs(kind, args, kw)
        out.append(dict(who=who, pass_=kind, two_part=two_part, ms=ms, pairs=pairs, rank=rank))
    return out


def call_table(q, k, v, dout, cu, world: int, layout: str, method: str, stride: int, reps: int = 50):
    """Rows ``(calls, pass, kind, ms alone, Mpairs, ps a pair, against the one call)`` for the one
    call on the stream and the ranks' calls, and the sums per pass; and ``{pass: [ms]}``, each
    rank's calls alone summed (a rank's time beyond them is the data it moves and its calls'
    overlap lost or won)."""
    backend = backend_for(q)
    cud = cu.to(q.device)
    longest = int((cu[1:] - cu[:-1]).max())
    one_kw = dict(softmax_scale=q.shape[-1] ** -0.5, causal=True, cu_seqlens_q=cud, cu_seqlens_k=cud)
    one_kw.update(max_seqlen_q=longest, max_seqlen_k=longest)
    one, ranks = [], []
    with rf.skip_value_checks():
        with recorded(backend, one):
            out, lse = backend.attn_fwd(q, k, v, **one_kw)
            backend.attn_bwd(dout, q, k, v, out, lse, **one_kw)
        # own storage per rank, so that each recorded call names its rank (``_rank_of``)
        shards = [
            [shard_for(x, r, world, 0, layout, cu).clone() for r in range(world)] for x in (q, k, v, dout)
        ]
        mask = dict(causal=True, cu_seqlens=cu, method=method, heads_k_stride=stride)
        with recorded(backend, ranks):
            outs, lses = simulate_ring_attn(*shards[:3], layout, **mask)[:2]
            simulate_ring_attn_backward(shards[3], *shards[:3], outs, lses, layout, **mask)
        timed = _timed(one, "one call", reps) + _timed(ranks, "ranks", reps, shards[0])
    per_rank = {p: [0.0] * world for p in ("fwd", "bwd")}
    for t in timed:
        if t["who"] == "ranks" and t["rank"] is not None:
            per_rank[t["pass_"]][t["rank"]] += t["ms"]
    groups: dict[tuple, list[dict]] = {}
    for t in timed:
        kind = "two-part" if t["two_part"] else "plain"
        groups.setdefault((t["who"], t["pass_"], kind), []).append(t)
        groups.setdefault((t["who"], t["pass_"], "all"), []).append(t)
    per_pair = {}
    rows = []
    for (who, pass_, kind), ts in groups.items():
        ms, pairs = sum(t["ms"] for t in ts), sum(t["pairs"] for t in ts)
        ps = ms * 1e9 / max(pairs, 1)
        if who == "one call" and kind == "all":
            per_pair[pass_] = (ps, ms)
        rows.append(dict(who=who, pass_=pass_, kind=kind, calls=len(ts), ms=ms, mpairs=pairs / 1e6, ps=ps))
    for r in rows:
        base_ps, base_ms = per_pair[r["pass_"]]
        r["per_pair_vs_one"] = r["ps"] / base_ps
        r["sum_vs_one"] = r["ms"] / base_ms if r["kind"] == "all" else float("nan")
    return sorted(rows, key=lambda r: (r["pass_"], r["who"] != "one call", r["kind"])), per_rank


CALL_COLUMNS = [
    ("pass", "pass_", ""),
    ("calls of", "who", ""),
    ("sequences", "kind", ""),
    ("calls", "calls", ""),
    ("ms alone", "ms", ".3f"),
    ("Mpairs", "mpairs", ".1f"),
    ("ps/pair", "ps", ".2f"),
    ("per pair vs one", "per_pair_vs_one", ".3f"),
    ("sum vs one", "sum_vs_one", ".3f"),
]
