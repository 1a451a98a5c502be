"""Benchmark: the backward's dQ kernel on a second stream beside the dK/dV kernel (``kernels.bwd``).

The two kernels write different tensors. Launched one after the other on one stream, dQ waits
for the last wave of dK/dV, in which most SMs idle (under a causal mask the dK/dV programs differ
up to 2x in length). With ``CONCURRENT_DQ`` (the default) dQ's programs start on the SMs that
free up, in launches of up to ``CONCURRENT_DQ_MAX_WAVES`` dK/dV programs (of 128 keys) per SM
(``--max-waves``: another limit; larger launches run one after the other, so their rows compare
the same code). Both ways run the same autotuned tiles, interleaved over ``--rounds`` rounds
(median of rounds).

Rows: the Llama-3-8B attention shape (32 q / 8 KV heads, head dim 128, bf16, batch 1), plain
calls causal 4k-32k, MHA and batch 8 at 8k, non-causal 8k; then the zigzag ring's pieces in the
ring's mode (gradients added into float32 buffers): its own block (8k causal) and its two remote
step shapes (4k x 8k and 8k x 4k, unmasked). TFLOP/s: ``4 * sq * sk * hq * d`` (halved when
causal) x 2.5.

    python benchmarks/bench_bwd_overlap.py [--rounds 3] [--max-waves 64]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton
from bench_timing import interleaved_medians, with_setting

from ringflash import kernels
from ringflash.kernels import bwd

D = 128
ROWS = (
    # (label, batch, q len, k len, q heads, kv heads, causal, ring mode)
    ("4k causal", 1, 4096, 4096, 32, 8, True, False),
    ("8k causal", 1, 8192, 8192, 32, 8, True, False),
    ("16k causal", 1, 16384, 16384, 32, 8, True, False),
    ("32k causal", 1, 32768, 32768, 32, 8, True, False),
    ("8k causal MHA", 1, 8192, 8192, 32, 32, True, False),
    ("8k causal B=8", 8, 8192, 8192, 32, 8, True, False),
    ("8k full", 1, 8192, 8192, 32, 8, False, False),
    ("ring 8k causal", 1, 8192, 8192, 32, 8, True, True),
    ("ring 4k x 8k", 1, 4096, 8192, 32, 8, False, True),
    ("ring 8k x 4k", 1, 8192, 4096, 32, 8, False, True),
)


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _row(b, sq, sk, hq, hk, causal, ring, rounds):
    """Backward TFLOP/s: one stream, two streams."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, do = (torch.randn(b, sq, hq, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, sk, hk, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    scale = D**-0.5
    out, lse = kernels.attn_fwd(q, k, v, softmax_scale=scale, causal=causal)
    grads = {}
    if ring:
        zeros = lambda t: torch.zeros(t.shape, dtype=torch.float32, device="cuda")  # noqa: E731
        grads = dict(dq=zeros(q), dk=zeros(k), dv=zeros(v), delta=kernels.attn_bwd_delta(do, out))

    def step():
        return kernels.attn_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, **grads)

    fns = [with_setting(bwd, "CONCURRENT_DQ", on, step) for on in (False, True)]
    for f in fns:  # compile and autotune outside the timing
        f()
    med = interleaved_medians([lambda f=f: _bench(f) for f in fns], rounds)
    flops = 2.5 * 4 * b * sq * sk * hq * D / (2 if causal else 1)
    return [flops / (t * 1e-3) / 1e12 for t in med]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-waves", type=int, default=bwd.CONCURRENT_DQ_MAX_WAVES)
    a = ap.parse_args()
    bwd.CONCURRENT_DQ_MAX_WAVES = a.max_waves
    versions = f"torch {torch.__version__} | triton {triton.__version__}"
    print(f"# {torch.cuda.get_device_name()} | {versions} | {datetime.date.today()}")
    print(f"# row | bwd TFLOP/s one stream / dQ beside dK/dV up to {a.max_waves} waves (ratio)")
    for label, b, sq, sk, hq, hk, causal, ring in ROWS:
        one, two = _row(b, sq, sk, hq, hk, causal, ring, a.rounds)
        torch.cuda.empty_cache()
        print(f"{label:>15} | {one:6.1f} / {two:6.1f} ({two / one:.3f}x)")


if __name__ == "__main__":
    main()
