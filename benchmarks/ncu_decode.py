"""One decoding shape's kernels for a profiler: the library's split kernel, then SDPA's cuDNN
backend, each called ``--reps`` times inside an NVTX range named ``profile`` after a warm-up.

    ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
        --section LaunchStats --section Occupancy python3 benchmarks/ncu_decode.py --batch 16

Shapes as in ``bench_decode.py`` (bf16, Hq=32, Hk=8, D=128, full caches)."""

from __future__ import annotations

import argparse

import torch
from bench_decode import _inputs, ours_fn, sdpa_fn
from torch.nn.attention import SDPBackend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    q, kc, vc, lens = _inputs(args.batch, args.context)
    ours = ours_fn(q, kc, vc, lens)
    cudnn, how = sdpa_fn(q, kc, vc, SDPBackend.CUDNN_ATTENTION)
    assert cudnn is not None, "no cuDNN attention here"
    for _ in range(3):
        ours(), cudnn()
    torch.cuda.synchronize()
    for name, fn in (("ours", ours), (f"cudnn ({how})", cudnn)):
        for _ in range(args.reps):
            torch.cuda.nvtx.range_push("profile")
            fn()
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"profiled: {name} x {args.reps}")


if __name__ == "__main__":
    main()
