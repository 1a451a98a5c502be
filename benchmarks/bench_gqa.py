"""Benchmark: grouped-query attention (GQA) at the Llama-3-8B attention shape, forward and backward.

32 query heads / 8 KV heads, head dim 128, bf16, causal, one sequence of 8k / 16k / 32k tokens
(batch 1: the shape one rank of a sequence-parallel run holds). Columns:

- ``ours``: the Triton kernels (the dK/dV kernel visits the query heads of its group one after
  another). With ``benchmarks/variants/dkdv_gqa_heads_inner.patch`` applied, ``heads-inner`` times
  the variant that visits them inside each query block, in the same run (``n/a`` otherwise);
- ``MHA``: our kernels with the KV heads repeated to 32 (same FLOPs, no grouping): what GQA costs;
- ``fa2`` / ``cudnn``: PyTorch SDPA's backends with ``enable_gqa=True`` (``n/a`` when the backend
  refuses it).

Timings: ``triton.testing.do_bench`` medians, the variants interleaved over ``--rounds`` rounds
(median of rounds) so clock drift hits every column alike. TFLOP/s: forward ``4 * s * s * hq * d
/ 2`` (causal), backward 2.5x that.

    python benchmarks/bench_gqa.py [--seqlens 8192 16384 32768] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton
from bench_timing import interleaved_medians, with_setting
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import kernels
from ringflash.kernels import bwd as kbwd

HQ, HK, D = 32, 8, 128


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _bwd_with(order_inner: bool, fn):
    """``fn`` with the variant patch's head order set (the library's own order without the patch)."""
    if not hasattr(kbwd, "GQA_HEADS_INNER"):
        return fn
    return with_setting(kbwd, "GQA_HEADS_INNER", order_inner, fn)


def _sdpa_bwd(q, k, v, dout, backend):
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    do = dout.transpose(1, 2)

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=True
            )

    return fwd, lambda: torch.autograd.grad(out, (qt, kt, vt), do, retain_graph=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", end="")
    print(f" | {datetime.date.today()}")
    print(f"GQA causal, B=1, Hq={HQ} Hk={HK} D={D} bf16; TFLOP/s (fwd 4sshd/2, bwd 2.5x); median of rounds")
    hdr = "     S | fwd ours   fa2 cudnn | bwd ours   MHA   fa2 cudnn | heads-inner err"
    print(hdr)
    for s in args.seqlens:
        print(row(s, args.rounds), flush=True)
        torch.cuda.empty_cache()


def _rates(fns, s, rounds):
    med = interleaved_medians([lambda f=f: _bench(f) for f in fns.values()], rounds)
    flops = 4 * s * s * HQ * D / 2
    return {n: (2.5 if "bwd" in n else 1) * flops / t * 1e-9 for n, t in zip(fns, med, strict=True)}


def row(s, rounds):
    """One table line for sequence length ``s``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, dout = (torch.randn(1, s, HQ, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, s, HK, D, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    km, vm = (x.repeat_interleave(HQ // HK, dim=2) for x in (k, v))
    kw = dict(softmax_scale=D**-0.5, causal=True)
    out, lse = kernels.attn_fwd(q, k, v, **kw)
    out_m, lse_m = kernels.attn_fwd(q, km, vm, **kw)

    def ours_bwd():
        return kernels.attn_bwd(dout, q, k, v, out, lse, **kw)

    fns = {
        "fwd": lambda: kernels.attn_fwd(q, k, v, **kw),
        "bwd": _bwd_with(False, ours_bwd),
        "bwd_mha": lambda: kernels.attn_bwd(dout, q, km, vm, out_m, lse_m, **kw),
    }
    err = float("nan")
    if hasattr(kbwd, "GQA_HEADS_INNER"):  # the variant patch is applied
        fns["bwd_inner"] = _bwd_with(True, ours_bwd)
        got, ref = fns["bwd_inner"](), fns["bwd"]()
        err = max(
            ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref, strict=True)
        )
    for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            f, b = _sdpa_bwd(q, k, v, dout, backend)
            f(), b()
            fns[name + "_fwd"], fns[name + "_bwd"] = f, b
        except RuntimeError as e:
            print(f"# {name}: {str(e).splitlines()[0][:100]}")
    rate = _rates(fns, s, rounds)

    def get(n):
        return f"{rate[n]:5.0f}" if n in rate else "  n/a"

    return (
        f"{s:6d} | {get('fwd'):>8} {get('fa2_fwd')} {get('cudnn_fwd')} | {get('bwd'):>8} "
        f"{get('bwd_mha')} {get('fa2_bwd')} {get('cudnn_bwd')} | {get('bwd_inner'):>11} {err:.1e}"
    )


if __name__ == "__main__":
    main()
