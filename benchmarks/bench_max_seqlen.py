# ruff: noqa: N803, N806
"""The longest sequence one Llama-3-8B attention layer trains on, per GPU count (zigzag ring).

    torchrun --nproc_per_node 4 benchmarks/bench_max_seqlen.py --out maxlen
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
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from bench_io import write_csv
from bench_timing import start_distributed

import ringflash as rf
from ringflash.parallel.options import DEFAULT_RING_PREFETCH

PREFETCH = [DEFAULT_RING_PREFETCH]  # --prefetch


def _layer(hidden, hq, hk, d, device, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = dict(wq=(hidden, hq * d), wk=(hidden, hk * d), wv=(hidden, hk * d), wo=(hq * d, hidden))
    return {
        n: (torch.randn(*s, generator=g) * s[0] ** -0.5).to(device, dtype).requires_grad_()
        for n, s in shapes.items()
    }


def _step(w, L, heads, device, dtype, seed):
    """One forward+backward on L local tokens; returns (peak bytes above the start, seconds)."""
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
    with rf.use_ring_prefetch(PREFETCH[0]):
        o = rf.zigzag_ring_flash_attn_func(q, k, v, causal=True)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", type=int, nargs="+", default=[8192, 16384, 32768], help="tokens per rank")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB left free (allocator, NCCL)")
    p.add_argument("--verify-s", type=float, default=60.0)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--prefetch", type=int, default=PREFETCH[0], help="K/V blocks the forward holds (use_ring_prefetch)"
    )
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    PREFETCH[0] = a.prefetch
    info, device, dtype, name = start_distributed()
    rank, world = info.rank, info.world_size
    heads = (256, 4, 2, 64) if a.tiny else (4096, 32, 8, 128)
    if a.tiny:
        a.fit, a.verify_s = [64, 128], 1.0
    gran = 2 * world * 128  # zigzag: 2W chunks; keep chunks a multiple of the kernel tile
    w = _layer(*heads, device, dtype)
    _step(w, a.fit[0], heads, device, dtype, 0)  # compile / warm up
    # Each fit length runs twice and the second run counts: a first call at a new length autotunes
    # the kernels, whose trial runs copy the outputs they write (a peak the training loop never sees).
    pts = [(L, *[_step(w, L, heads, device, dtype, i) for _ in range(2)][-1]) for i, L in enumerate(a.fit)]
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 0
    if device.type == "cuda":
        free_t = torch.tensor([free], dtype=torch.int64, device=device)
        dist.all_reduce(free_t, op=dist.ReduceOp.MIN)
        free = int(free_t.item())
    xs = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    ys = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    b = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
    a0 = ys.mean() - b * xs.mean()
    budget = free - a.reserve * 2**30
    l_max = int((budget - a0) / b) // gran * gran if b > 0 else 0
    # time ~ c * L^2 * W (each rank's share of an S^2 causal layer); calibrate on the largest fit point
    L1, _, t1 = pts[-1]
    l_time = int((a.verify_s / t1) ** 0.5 * L1) // gran * gran
    l_run = max(min(l_max, l_time), gran)
    peak, secs = _step(w, l_run, heads, device, dtype, 99)
    pred = float(a0 + b * l_run)
    if rank == 0:
        print(
            f"# {world} x {name}, {info.backend}, torch {torch.__version__}; layer hidden/heads {heads};"
            f" use_ring_prefetch({PREFETCH[0]})"
        )
        for L, pk, s in pts:
            print(f"fit  L={L:>8} S={L * world:>9}  peak {pk / 2**30:7.2f} GiB  {s:7.2f} s")
        print(f"fit: peak = {a0 / 2**30:.2f} GiB + {b / 1024:.1f} KiB/token; free {free / 2**30:.1f} GiB")
        print(f"predicted max: L = {l_max} tokens per rank, S = {l_max * world} over {world} GPU(s)")
        tag = "the predicted maximum" if l_run == l_max else f"time-limited to {a.verify_s:.0f} s"
        print(
            f"ran  L={l_run:>8} S={l_run * world:>9}  peak {peak / 2**30:7.2f} GiB (fit {pred / 2**30:.2f})"
            f"  {secs:7.2f} s  ({tag})"
        )
        if a.out:
            rows = [
                dict(world=world, kind="fit", L=L, S=L * world, peak_gib=pk / 2**30, secs=s)
                for L, pk, s in pts
            ]
            rows.append(
                dict(
                    world=world,
                    kind="predicted max",
                    L=l_max,
                    S=l_max * world,
                    peak_gib=budget / 2**30,
                    secs=None,
                )
            )
            rows.append(
                dict(world=world, kind="ran", L=l_run, S=l_run * world, peak_gib=peak / 2**30, secs=secs)
            )
            write_csv(os.path.join(a.out, f"max_seqlen_W{world}.csv"), rows)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
