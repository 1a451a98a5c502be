# ruff: noqa: N803, N806
"""The longest sequence one Llama-3-8B attention layer trains on, per GPU count (zigzag ring).

    torchrun --nproc_per_node 4 benchmarks/bench_max_seqlen.py --out DIR
    torchrun --nproc_per_node 2 benchmarks/bench_max_seqlen.py --tiny        # smoke run (CPU/gloo too)

The layer: hidden 4096, 32 q heads, 8 KV heads, head dim 128, bf16 weights with gradients:
``y = Wo(zigzag_ring_attn(Wq x, Wk x, Wv x, causal))``, then ``y.backward(dy)`` (activations
kept by autograd as in training; no rotary embedding, no MLP). Each rank holds ``L`` tokens of
the ``S = W * L`` sequence.

Ring attention keeps no ``S x S`` state, so a rank's peak memory is ``a + b * L`` whatever ``W``
is (the K/V held and in flight are a few more blocks of ``L``: up to ``3 p`` during the forward
with ``--prefetch p``, ``ringflash.use_ring_prefetch``; default the library's, 2; 1 is the
leanest). The script measures the peak at a few ``L`` (``--fit``, default 8k/16k/32k tokens per
rank), fits ``a`` and ``b``, predicts the largest ``L`` that fits in the memory free on the device
(less ``--reserve`` GiB), and then runs a real forward+backward at the largest ``L`` that is both
within the prediction and predicted to take at most ``--verify-s`` seconds (the time grows as
``S^2``), printing its measured peak against the fit. When that ``L`` is the predicted maximum,
the maximum itself was run.

The baseline, measured in the same run at the same fit lengths: the same layer with PyTorch's
``scaled_dot_product_attention`` over each rank's ``L`` tokens alone (no ring: one device's
longest sequence with SDPA), its peak memory fitted the same way. Writes ``max_seqlen_W{W}.csv``
into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist
from bench_timing import add_common_args, format_table, header, run_info, start_distributed, write_csv
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringflash as rf


def _layer(hidden, hq, hk, d, device, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = dict(wq=(hidden, hq * d), wk=(hidden, hk * d), wv=(hidden, hk * d), wo=(hq * d, hidden))
    return {
        n: (torch.randn(*s, generator=g) * s[0] ** -0.5).to(device, dtype).requires_grad_()
        for n, s in shapes.items()
    }


def ring_attention(prefetch):
    """Zigzag ring attention over the group, holding ``prefetch`` K/V blocks (None: the library's)."""

    def attn(q, k, v):
        with rf.use_ring_prefetch(prefetch) if prefetch else contextlib.nullcontext():
            return rf.zigzag_ring_flash_attn_func(q, k, v, causal=True)

    return attn


def sdpa_attention(q, k, v):
    """The baseline: PyTorch SDPA over this rank's tokens alone (no ring); on CUDA its fused
    backends only (the math backend would hold S x S scores)."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused) if q.is_cuda else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def _step(w, L, heads, device, dtype, seed, attn):
    """One forward+backward on L local tokens with ``attn(q, k, v)``; returns (peak bytes above the
    start, seconds), the largest over the ranks."""
    hidden, hq, hk, d = heads
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, L, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(1, L, hidden, device=device, dtype=dtype, generator=g)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    dist.barrier()
    t0 = time.perf_counter()
    q = (x @ w["wq"]).view(1, L, hq, d)
    k = (x @ w["wk"]).view(1, L, hk, d)
    v = (x @ w["wv"]).view(1, L, hk, d)
    o = attn(q, k, v)
    y = o.reshape(1, L, hq * d) @ w["wo"]
    y.backward(dy)
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    for p in w.values():
        p.grad = None
    t = torch.tensor([peak, secs], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0].item()), t[1].item()


def fit_line(pts):
    """Least squares ``peak = a + b * L`` through ``[(L, peak, secs)]``: ``(a, b)``."""
    xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    b = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
    return float(ys.mean() - b * xs.mean()), float(b)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, tiny="a small layer at 64-128 tokens per rank (a smoke run; CPU/gloo too)")
    p.add_argument("--fit", type=int, nargs="+", default=[8192, 16384, 32768], help="tokens per rank")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB left free (allocator, NCCL)")
    p.add_argument("--verify-s", type=float, default=60.0)
    p.add_argument("--prefetch", type=int, default=0, help="K/V blocks the forward holds (0: the library's)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    info, device, dtype = start_distributed()
    rank, world = info.rank, info.world_size
    heads = (256, 4, 2, 64) if a.tiny else (4096, 32, 8, 128)
    if a.tiny:
        a.fit, a.verify_s = [64, 128], 1.0
    gran = 2 * world * 128  # zigzag: 2W chunks; keep chunks a multiple of the kernel tile
    ring = ring_attention(a.prefetch)
    w = _layer(*heads, device, dtype)
    # Each fit length runs twice and the second run counts: a first call at a new length autotunes
    # the kernels, whose trial runs copy the outputs they write (a peak the training loop never sees).
    fits = {}
    for name, attn in (("ring", ring), ("sdpa", sdpa_attention)):
        try:
            _step(w, a.fit[0], heads, device, dtype, 0, attn)  # compile / warm up
            runs = [
                [_step(w, L, heads, device, dtype, i, attn) for _ in range(2)][-1]
                for i, L in enumerate(a.fit)
            ]
        except RuntimeError as e:  # every rank alike: the same shapes (e.g. no fused SDPA kernel for them)
            if name == "ring":
                raise
            print(f"# rank {rank}: the SDPA baseline did not run: {str(e).splitlines()[0][:160]}")
            runs = []
        fits[name] = [(L, pk, secs) for L, (pk, secs) in zip(a.fit, runs, strict=False)]
    pts = fits["ring"]
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 0
    if device.type == "cuda":
        free_t = torch.tensor([free], dtype=torch.int64, device=device)
        dist.all_reduce(free_t, op=dist.ReduceOp.MIN)
        free = int(free_t.item())
    a0, b = fit_line(pts)
    budget = free - a.reserve * 2**30
    l_max = int((budget - a0) / b) // gran * gran if b > 0 else 0
    # time ~ c * L^2 * W (each rank's share of an S^2 causal layer); calibrate on the largest fit point
    L1, _, t1 = pts[-1]
    l_time = int((a.verify_s / t1) ** 0.5 * L1) // gran * gran
    l_run = max(min(l_max, l_time), gran)
    peak, secs = _step(w, l_run, heads, device, dtype, 99, ring)
    pred = float(a0 + b * l_run)
    sa0, sb = fit_line(fits["sdpa"]) if len(fits["sdpa"]) > 1 else (float("nan"), float("nan"))
    sdpa_max = int((budget - sa0) / sb) if sb > 0 else 0
    if rank == 0:
        run = run_info(device)
        title = (
            f"longest trainable sequence over {world} ranks ({info.backend}), one attention layer: hidden "
            f"{heads[0]}, {heads[1]} q / {heads[2]} kv heads, d {heads[3]}, zigzag ring, "
            f"use_ring_prefetch({a.prefetch or 'default'}); baseline SDPA on L tokens alone"
        )
        print(header(title, info=run))

        def row(attention, kind, L, S, peak, secs=None):
            return dict(
                world=world, attention=attention, kind=kind, L=L, S=S, peak_gib=peak / 2**30, secs=secs
            )

        rows = [
            row(n, "fit", L, L * world if n == "ring" else L, pk, s)
            for n, pt in fits.items()
            for L, pk, s in pt
        ]
        rows.append(row("ring", "predicted max", l_max, l_max * world, budget))
        rows.append(row("sdpa", "predicted max", sdpa_max, sdpa_max, budget))
        rows.append(row("ring", "ran", l_run, l_run * world, peak, secs))
        cols = [("attention", "attention", ""), ("kind", "kind", ""), ("L per rank", "L", ""), ("S", "S", "")]
        print(format_table(rows, cols + [("peak GiB", "peak_gib", ".2f"), ("s", "secs", ".2f")]))
        print(
            f"fit: ring peak = {a0 / 2**30:.2f} GiB + {b / 1024:.1f} KiB/token; free {free / 2**30:.1f} GiB"
        )
        print(f"fit: SDPA peak = {sa0 / 2**30:.2f} GiB + {sb / 1024:.1f} KiB/token (one device, no ring)")
        print(f"predicted max: L = {l_max} tokens per rank, S = {l_max * world} over {world} GPU(s)")
        tag = "the predicted maximum" if l_run == l_max else f"time-limited to {a.verify_s:.0f} s"
        print(
            f"ran  L={l_run:>8} S={l_run * world:>9}  peak {peak / 2**30:7.2f} GiB (fit {pred / 2**30:.2f})"
            f"  {secs:7.2f} s  ({tag})"
        )
        os.makedirs(a.out, exist_ok=True)
        write_csv(os.path.join(a.out, f"max_seqlen_W{world}.csv"), rows, run)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
