"""Where a ring rank's time goes: every distinct local call of a layout's ring, timed on its own.

For world size ``W`` and a layout, each rank's plan (``ringflash.parallel.layouts.build_plan``)
makes a few local attention calls per ring step ("pieces"). This script times every distinct
piece shape (queries x keys x mask) alone, in two modes:

- ``ring``: as the ring runs it: the forward merges into a float32 ``(out, lse)`` state in place
  (accumulate mode), the backward adds into float32 ``dq`` / ``dk`` / ``dv``;
- ``plain``: the same call with fresh outputs (16-bit out; fresh gradients), as one local call.

and prints each piece's achieved TFLOP/s (``4 * Hq * D`` FLOPs per visible query-key pair
forward, 2.5x that backward) next to the whole-sequence causal call's. A ring step at the whole
call's rate costs nothing; the gap between ``ring`` and ``plain`` is the float32 state's cost, and
the gap between ``plain`` and the whole call is the smaller call's own loss.

    python benchmarks/bench_ring_pieces.py --world 8 --layout zigzag
"""

from __future__ import annotations

import argparse
import math

import torch
from bench_ring import _time

from ringflash.backends import backend_for
from ringflash.masking import diag_bounds
from ringflash.parallel.layouts import build_plan


def visible_pairs(nq: int, nk: int, causal: bool, diag: int, window: tuple[int, int]) -> int:
    """Query-key pairs a piece computes: ``lo <= j - i <= hi`` inside ``[0, nq) x [0, nk)``."""
    lo, hi = diag_bounds(diag, causal, window)
    i = torch.arange(nq, dtype=torch.float64)
    first = torch.clamp(i + lo, min=0) if math.isfinite(lo) else torch.zeros_like(i)
    last = torch.clamp(i + hi, max=nk - 1) if math.isfinite(hi) else torch.full_like(i, nk - 1)
    return int(torch.clamp(last - first + 1, min=0).sum().item())


def distinct_pieces(layout: str, world: int, n_local: int):
    """``{(q1-q0, k1-k0, causal, diag, window): (count over ranks and steps, a piece)}``."""
    seen: dict = {}
    for rank in range(world):
        for step in build_plan(layout, rank, world, n_local, True, (-1, -1)).steps:
            for pc in step:
                key = (pc.q1 - pc.q0, pc.k1 - pc.k0, pc.causal, pc.diag, pc.window)
                n, first = seen.get(key, (0, pc))
                seen[key] = (n + 1, first)
    return seen


def piece_times(be, q, k, v, dout, key, scale, reps):
    """Seconds of one piece: (fwd ring, fwd plain, bwd ring, bwd plain)."""
    nq, nk, causal, diag, window = key
    qp, dop = q[:, :nq], dout[:, :nq]
    kp, vp = k[:, :nk], v[:, :nk]
    kw = dict(softmax_scale=scale, causal=causal, window_size=window, diag_offset=diag)
    out32 = torch.zeros(qp.shape, dtype=torch.float32, device=q.device)
    lse32 = torch.zeros(q.shape[0], q.shape[2], nq, dtype=torch.float32, device=q.device)
    out, lse = be.attn_fwd(qp, kp, vp, **kw)
    kw_b = dict(kw, delta=be.attn_bwd_delta(dop, out))  # the ring computes it once, before its loop
    grads = [torch.zeros(x.shape, dtype=torch.float32, device=q.device) for x in (qp, kp, vp)]
    f_ring = _time(lambda: be.attn_fwd(qp, kp, vp, out=out32, lse=lse32, **kw), q.device, reps)
    f_plain = _time(lambda: be.attn_fwd(qp, kp, vp, **kw), q.device, reps)
    dq, dk, dv = grads
    b_ring = _time(
        lambda: be.attn_bwd(dop, qp, kp, vp, out, lse, dq=dq, dk=dk, dv=dv, **kw_b), q.device, reps
    )
    b_plain = _time(lambda: be.attn_bwd(dop, qp, kp, vp, out, lse, **kw_b), q.device, reps)
    return f_ring, f_plain, b_ring, b_plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run")
    a = p.parse_args()
    if a.tiny:
        a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim, a.reps = 64, 4, 2, 32, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, W, Hq, Hk, D = a.tokens_per_rank, a.world, a.heads, a.kv_heads, a.head_dim
    S, scale = W * L, D**-0.5
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(1, S, h, D, generator=g).to(device, dtype) for h in (Hq, Hk, Hk, Hq))
    be = backend_for(q)
    unit = 4 * Hq * D
    full_pairs = visible_pairs(S, S, True, 0, (-1, -1))
    kw = dict(softmax_scale=scale, causal=True)
    t_f = _time(lambda: be.attn_fwd(q, k, v, **kw), device, a.reps)
    out, lse = be.attn_fwd(q, k, v, **kw)
    t_b = _time(lambda: be.attn_bwd(dout, q, k, v, out, lse, **kw), device, a.reps)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {a.layout} W={W}, {L} tokens per rank, Hq={Hq} Hk={Hk} D={D}, {dtype}, {name}")
    rate_f, rate_b = unit * full_pairs / t_f / 1e12, 2.5 * unit * full_pairs / t_b / 1e12
    print(f"# whole sequence S={S} causal: fwd {rate_f:.0f} TFLOP/s ({t_f * 1e3:.3f} ms), ", end="")
    print(f"bwd {rate_b:.0f} TFLOP/s ({t_b * 1e3:.3f} ms)")
    print("#   nq    nk causal   diag  count | fwd TFLOP/s: ring plain (ring ms) | bwd: ring plain (ring ms)")
    total = [0.0, 0.0, 0.0, 0.0]
    work = 0
    for key, (count, _) in sorted(distinct_pieces(a.layout, W, L).items(), key=lambda kv: -kv[1][0]):
        pairs = visible_pairs(*key)
        ts = piece_times(be, q, k, v, dout, key, scale, a.reps)
        for i, t in enumerate(ts):
            total[i] += count * t
        work += count * pairs
        fr, fp, br, bp = (unit * pairs * (1 if i < 2 else 2.5) / t / 1e12 for i, t in enumerate(ts))
        nq, nk, causal, diag, _ = key
        row = f"  {nq:5d} {nk:5d} {causal!s:>6} {diag:6d} {count:6d} | {fr:17.0f} {fp:5.0f}"
        print(row + f" ({ts[0] * 1e3:7.3f}) | {br:9.0f} {bp:5.0f} ({ts[2] * 1e3:7.3f})")
    # Every piece of every rank once, at its measured time, against W whole-sequence calls' worth:
    # the ring's efficiency if ranks were perfectly balanced and communication were free.
    f_ring, f_plain, b_ring, b_plain = (t / tot for t, tot in zip((t_f, t_f, t_b, t_b), total, strict=True))
    print(f"# whole call / all pieces of all ranks: fwd ring {f_ring:.3f}, plain {f_plain:.3f}; ", end="")
    print(f"bwd ring {b_ring:.3f}, plain {b_plain:.3f}")
    print(f"# (work check: pieces cover {work / full_pairs:.4f} of the whole causal square)")


if __name__ == "__main__":
    main()
