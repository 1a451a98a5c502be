"""Benchmark: the order in which the attention kernels' programs start (``kernels.common._tile_order``).

Under a causal mask a row block's work grows with its index (forward, dQ) or falls with it (dK/dV):
up to twice the mean. In head-major order (every block of head 0, then of head 1, ...) the longest
blocks of the last heads start near the end of the launch and run on few SMs while the rest idle.
The library now takes heads in small groups and, inside a group, starts the longest blocks first
(``SCHED_PER_SM`` programs per SM span a group); ``SCHED_PER_SM = 0`` restores head-major order.
Both orders run the same autotuned tiles, interleaved over ``--rounds`` rounds (median of rounds),
so clock drift hits both alike.

Rows: the Llama-3-8B attention shape (32 q / 8 KV heads, head dim 128, bf16, batch 1) causal at 8k
(a zigzag ring rank's own block) to 64k; MHA (32 / 32) at 8k; batch 8 at 8k (256 heads: many
groups); and non-causal 8k as a control (one order: its blocks are equal, so nothing changes).
TFLOP/s: forward ``4 * s * s * hq * d`` (halved when causal), backward 2.5x that.

    python benchmarks/bench_tile_order.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton
from bench_timing import interleaved_medians, with_setting

from ringflash import kernels
from ringflash.kernels import common

ROWS = (
    # (label, batch, seqlen, q heads, kv heads, causal)
    ("8k causal", 1, 8192, 32, 8, True),
    ("16k causal", 1, 16384, 32, 8, True),
    ("32k causal", 1, 32768, 32, 8, True),
    ("64k causal", 1, 65536, 32, 8, True),
    ("8k causal MHA", 1, 8192, 32, 32, True),
    ("8k causal B=8", 8, 8192, 32, 8, True),
    ("4k causal", 1, 4096, 32, 8, True),
    ("8k full", 1, 8192, 32, 8, False),
)
D = 128


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}"
        f" | {datetime.date.today()} | new order: {common.SCHED_PER_SM} programs per SM per group"
    )
    print("# row | fwd TFLOP/s head-major / grouped (ratio) | bwd TFLOP/s head-major / grouped (ratio)")
    for label, b, s, hq, hk, causal in ROWS:
        tf = _row(b, s, hq, hk, causal, a.rounds)
        torch.cuda.empty_cache()
        print(
            f"{label:>14} | fwd {tf[0]:6.1f} / {tf[1]:6.1f} ({tf[1] / tf[0]:.3f}x)"
            f" | bwd {tf[2]:6.1f} / {tf[3]:6.1f} ({tf[3] / tf[2]:.3f}x)"
        )


def _row(b, s, hq, hk, causal, rounds):
    """TFLOP/s: forward head-major, forward grouped, backward head-major, backward grouped."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, D, generator=g).to("cuda", torch.bfloat16) for h in (hq, hk, hk, hq))
    scale = D**-0.5
    out, lse = kernels.attn_fwd(q, k, v, softmax_scale=scale, causal=causal)

    def fwd():
        return kernels.attn_fwd(q, k, v, softmax_scale=scale, causal=causal)

    def bwd():
        return kernels.attn_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal)

    order = lambda per_sm, fn: with_setting(common, "SCHED_PER_SM", per_sm, fn)  # noqa: E731
    fns = [order(0, fwd), order(common.SCHED_PER_SM, fwd), order(0, bwd), order(common.SCHED_PER_SM, bwd)]
    for f in fns:  # compile and autotune outside the timing
        f()
    med = interleaved_medians([lambda f=f: _bench(f) for f in fns], rounds)
    flops = 4 * b * s * s * hq * D / (2 if causal else 1)
    return [flops * (1 if i < 2 else 2.5) / (t * 1e-3) / 1e12 for i, t in enumerate(med)]


if __name__ == "__main__":
    main()
