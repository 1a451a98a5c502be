"""Host (Python) time of one ``flash_attn_with_kvcache`` step on the Triton path, kernels stubbed.

A decode step's GPU work is tens of microseconds, so an eager decoding loop is bound by the host
time of each call: argument checks, launch preparation and the Triton launch itself. This script
times everything up to the launch of the split-KV kernel, with that launch replaced by a stub, so
it runs on any machine (CPU tensors, no GPU, no interpreter): it tracks the library's own share of
the host time. The Triton launcher's share needs a GPU (``bench_decode.py``'s eager rows).

Usage: ``PYTHONPATH=. python benchmarks/bench_host_decode.py [--steps 3000]`` (B=1, 4k cache,
32 q / 8 KV heads, d 128, bf16, one appended token, causal). Prints us per step with the value
checks on and inside ``skip_value_checks()``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend takes CPU tensors (its launch is stubbed)

import torch  # noqa: E402

from ringflash import skip_value_checks, use_backend  # noqa: E402
from ringflash.decode import flash_attn_with_kvcache  # noqa: E402
from ringflash.kernels import decode as kd  # noqa: E402


class _StubLaunch:
    """Stands in for the split-KV kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    a = ap.parse_args()
    kd._decode_split_kernel = _StubLaunch()
    B, S, HQ, HK, D = 1, 4096, 32, 8, 128
    q = torch.randn(B, 1, HQ, D, dtype=torch.bfloat16)
    kc = torch.randn(B, S, HK, D, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k = torch.randn(B, 1, HK, D, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((B,), S - 1, dtype=torch.int32)

    def per_step():
        for _ in range(200):  # warm-up
            flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
        return (time.perf_counter() - t0) / a.steps * 1e6

    with use_backend("triton"):
        checked = per_step()
        with skip_value_checks():
            unchecked = per_step()
    print(
        f"torch {torch.__version__}; host time per decode step, split-KV launch stubbed (B=1, 4k, 32/8 heads)"
    )
    print(f"value checks on: {checked:6.1f} us   inside skip_value_checks(): {unchecked:6.1f} us")


if __name__ == "__main__":
    main()
