"""Communication per rank of Ulysses, ring and hybrid (USP) sequence parallelism, by arithmetic.

Runs anywhere (no GPU): it counts the bytes each rank sends for one attention layer, exactly as
ringflash's implementations move them, and the time they take at a given link bandwidth.
Default shape: Llama-3-8B attention (32 q heads, 8 kv heads, head dim 128, bf16), 8k tokens per
rank, batch 1.

Per rank, with L tokens per rank, e = bytes per element, D head dim, W = U * R ranks:

    Ulysses over U ranks (KV heads repeated f = lcm(Hk, U) / Hk times before the all-to-all):
        an all-to-all sends (U-1)/U of its local input
        fwd: q, k, v in + out back        (U-1)/U * L*D*e * (Hq + 2*Hk*f + Hq)
        bwd: dout in + dq, dk, dv back    the same volume again
    Ring over R ranks, each rank holding L*U tokens of Hk*f/U kv heads (the hybrid's ring shard):
        fwd: K and V travel R-1 hops      (R-1) * 2 * L*U * (Hk*f/U) * D * e
        bwd: K, V again (R-1 hops) + float32 dK, dV (R hops: the last one sends them home)
             (R-1) * 2 * L*Hk*f*D*e + R * 2 * L*Hk*f*D*4
    Pure Ulysses is U = W, R = 1; pure ring is U = 1, R = W; the hybrid is the product.

Ulysses' all-to-all is on the critical path (it cannot overlap the attention that needs its
result); ring P2P is posted before each step's compute, so it is hidden when one step's transfer
takes less than one step's compute. The compute column assumes a causal attention throughput of
``--tflops`` (FLOPs: fwd 4 * S * L * Hq * D / 2 per rank for causal; bwd 2.5x fwd).

    python benchmarks/bench_parallel.py                       # worlds 8, 16, 32, 64 at 450 GB/s
    python benchmarks/bench_parallel.py --tokens-per-rank 32768 --bandwidth 50   # inter-node IB
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GB = 1e9


@dataclass
class Volume:
    name: str
    u: int
    r: int
    kv_repeat: int
    a2a_fwd: float  # bytes per rank
    ring_fwd: float
    a2a_bwd: float
    ring_bwd: float
    ring_step_fwd: float  # bytes of one ring hop (to compare with one step's compute)


def volumes(hq: int, hk: int, d: int, e: int, tokens: int, u: int, r: int, name: str) -> Volume | None:
    """Bytes per rank for Ulysses degree ``u`` x ring degree ``r``; None when the heads cannot split."""
    if hq % u:
        return None
    f = math.lcm(hk, u) // hk
    a2a = (u - 1) / u * tokens * d * e * (2 * hq + 2 * hk * f)
    kv_hop = 2 * (tokens * u) * (hk * f / u) * d * e  # this rank's K and V of its ring shard
    ring_fwd = (r - 1) * kv_hop
    ring_bwd = (r - 1) * kv_hop + (r * kv_hop * 4 / e if r > 1 else 0.0)
    return Volume(name, u, r, f, a2a, ring_fwd, a2a, ring_bwd, kv_hop if r > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bytes", type=int, default=2, help="bytes per element (bf16: 2)")
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--node", type=int, default=8, help="GPUs per node (the hybrid's Ulysses degree)")
    p.add_argument("--bandwidth", type=float, default=450.0, help="GB/s per rank")
    p.add_argument("--tflops", type=float, default=400.0, help="attention TFLOP/s per rank (compute column)")
    a = p.parse_args()
    hq, hk, d, e, n = a.q_heads, a.kv_heads, a.head_dim, a.bytes, a.tokens_per_rank
    bw = a.bandwidth * GB
    print(
        f"one attention layer: Hq={hq} Hk={hk} D={d}, {e} bytes/element, {n} tokens per rank, batch 1; "
        f"link {a.bandwidth:g} GB/s per rank; compute at {a.tflops:g} TFLOP/s (causal)"
    )
    head = (
        f"{'W':>4} {'method':<18} {'UxR':>7} {'kv x':>4} {'a2a fwd MB':>10} {'ring fwd MB':>11} "
        f"{'fwd ms':>7} {'fwd+bwd MB':>10} {'fwd+bwd ms':>10} {'exposed ms':>10} {'attn ms':>8}"
    )
    print(head)
    print("-" * len(head))
    for w in a.worlds:
        s = n * w
        flops_fwd = 4 * s * n * hq * d / 2  # causal, per rank
        t_fwd = flops_fwd / (a.tflops * 1e12)
        t_all = 3.5 * t_fwd
        g = math.gcd(hq, w)
        cands = [("ulysses", w, 1), ("ring", 1, w)]
        if a.node < w and w % a.node == 0:
            cands.append((f"hybrid node={a.node}", a.node, w // a.node))
        if g not in (1, w, a.node):
            cands.append(("hybrid gcd", g, w // g))
        for name, u, r in cands:
            v = volumes(hq, hk, d, e, n, u, r, name)
            if v is None:
                print(f"{w:>4} {name:<18} {f'{u}x{r}':>7} {'-':>4}   n/a: {hq} q heads do not divide by {u}")
                continue
            fwd = v.a2a_fwd + v.ring_fwd
            tot = fwd + v.a2a_bwd + v.ring_bwd
            # Exposed: the all-to-alls are serial; each ring hop hides behind one step's compute.
            exposed = (v.a2a_fwd + v.a2a_bwd) / bw
            if r > 1:
                hop_f, hop_b = v.ring_step_fwd / bw, v.ring_step_fwd * (1 + 4 / e) / bw
                exposed += (r - 1) * max(0.0, hop_f - t_fwd / r) + (r - 1) * max(0.0, hop_b - 2.5 * t_fwd / r)
                exposed += v.ring_step_fwd * 2 / e / bw  # the last dK/dV hop home waits for the last step
            print(
                f"{w:>4} {name:<18} {f'{u}x{r}':>7} {v.kv_repeat:>4} {v.a2a_fwd / 1e6:>10.1f} "
                f"{v.ring_fwd / 1e6:>11.1f} {fwd / bw * 1e3:>7.2f} {tot / 1e6:>10.1f} "
                f"{tot / bw * 1e3:>10.2f} {exposed * 1e3:>10.2f} {t_all * 1e3:>8.2f}"
            )
    print(
        "\nfwd ms / fwd+bwd ms: all bytes at the link bandwidth. exposed ms: all-to-all time (serial) plus "
        "ring time not hidden behind the per-step attention compute. attn ms: fwd+bwd attention compute."
    )


if __name__ == "__main__":
    main()
