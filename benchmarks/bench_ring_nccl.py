"""Ring attention across real GPUs (NCCL): per-GPU TFLOP/s and efficiency vs the one-GPU kernel.

    torchrun --nproc_per_node 2 benchmarks/bench_ring_nccl.py            # Llama-3-8B shape, 8k tokens/GPU
    torchrun --nproc_per_node 2 benchmarks/bench_ring_nccl.py --tiny     # a smoke run (also on CPU/gloo)

For ``W`` ranks with ``L`` tokens each (``S = W * L``): ``t_full`` is one whole-sequence call of the
local backend on one device, ``t_ring`` the slowest rank's time for the ring call (forward, or
forward+backward through autograd), median over repetitions. Efficiency = t_full / (W * t_ring);
per-GPU TFLOP/s counts the causal FLOPs 4*S*S*Hq*D/2 (backward 2.5x) divided over the W GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import ringflash as rf
from ringflash.backends import backend_for
from ringflash.comm import init_distributed

FUNCS = {
    "zigzag": rf.zigzag_ring_flash_attn_func,
    "contiguous": rf.ring_flash_attn_func,
    "stripe": rf.stripe_flash_attn_func,
}


def _median_time(fn, device, reps):
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the ring is as fast as its slowest rank
    return t.item()


def _cells(t, flops_per_gpu, t_ideal):
    return f"{t * 1e3:>8.2f} {flops_per_gpu / t / 1e12:>11.0f} {t_ideal / t:>5.2f}"


def _ring_times(fn, layout, full, device, reps):
    """(fwd, fwd+bwd) seconds of the ring call on this layout's shards of ``full = (q, k, v, dout)``."""
    ql, kl, vl, dl = (rf.shard(x, layout=layout) for x in full)
    ql, kl, vl = (x.clone().requires_grad_() for x in (ql, kl, vl))

    def ring_fwd():
        with torch.no_grad():
            return fn(ql, kl, vl, causal=True)

    def ring_fb():
        out = fn(ql, kl, vl, causal=True)
        torch.autograd.grad(out, (ql, kl, vl), dl)

    return _median_time(ring_fwd, device, reps), _median_time(ring_fb, device, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layouts", nargs="+", default=list(FUNCS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    if a.tiny:
        a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim, a.reps = 128, 4, 2, 32, 2
    info = init_distributed()
    rank, world = info.rank, info.world_size
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if info.backend == "nccl" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, Hq, Hk, D = a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim
    S = world * L
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, S, h, D, generator=g).to(device, dtype) for h in (Hq, Hk, Hk, Hq))
    be = backend_for(q)
    scale = D**-0.5

    def full_fwd():
        return be.attn_fwd(q, k, v, softmax_scale=scale, causal=True)

    def full_fb():
        out, lse = full_fwd()
        be.attn_bwd(dout, q, k, v, out, lse, softmax_scale=scale, causal=True)

    t_full, t_full_fb = _median_time(full_fwd, device, a.reps), _median_time(full_fb, device, a.reps)
    flops = 4 * S * S * Hq * D / 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if rank == 0:
        head = f"# ring over {world} x {name}, {info.backend}; torch {torch.__version__}; causal, "
        print(head + f"Hq={Hq} Hk={Hk} D={D} {dtype}, {L} tokens per rank (S={S})")
        print(
            f"# one-GPU full call: fwd {t_full * 1e3:.2f} ms ({flops / t_full / 1e12:.0f} TFLOP/s), "
            f"fwd+bwd {t_full_fb * 1e3:.2f} ms ({3.5 * flops / t_full_fb / 1e12:.0f} TFLOP/s)"
        )
        cols = f"{'ms':>8} {'TFLOP/s/GPU':>11} {'eff':>5}"
        print(f"{'layout':>10} | fwd {cols} | fwd+bwd {cols}")
    for layout in a.layouts:
        t_r, t_rfb = _ring_times(FUNCS[layout], layout, (q, k, v, dout), device, a.reps)
        if rank == 0:
            fwd = _cells(t_r, flops / world, t_full / world)
            fb = _cells(t_rfb, 3.5 * flops / world, t_full_fb / world)
            print(f"{layout:>10} | fwd {fwd} | fwd+bwd {fb}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
