# ruff: noqa: N803, N806
"""Sharded-KV decoding across real GPUs (NCCL) against one GPU holding the whole cache.

    torchrun --nproc_per_node 4 benchmarks/bench_decode_sharded_nccl.py --out DIR
    torchrun --nproc_per_node 2 benchmarks/bench_decode_sharded_nccl.py --tiny   # smoke run (CPU/gloo too)

Decode shape of Llama-3-8B: 32 q heads, 8 KV heads, head dim 128, bf16, one query token, batch
``--batch``; total contexts ``--contexts`` (default 128k, 256k, 512k, 1M). Each of the ``W`` ranks
holds a contiguous ``S / W`` keys of every sequence (what a ring prefill leaves behind).

Per context, medians over ``--reps`` repetitions of ``--iters`` back-to-back steps (so the host
launch overlaps the GPU as in a decoding loop):

- ``one GPU``: rank 0 alone runs ``flash_attn_with_kvcache`` over the whole cache (the others wait);
- ``sharded``: every rank runs ``sharded_flash_attn_with_kvcache`` on its shard: local split-KV,
  one all_gather of the float32 partials, the combine; the slowest rank's time;
- ``local``: the same ranks running only the local split-KV part on their shard (no collective),
  so ``sharded - local`` is what the collective and the combine cost.

Speedup = one GPU / sharded. Every rank checks its sharded output against rank 0's one-GPU output
(bf16 rounding, relative error printed). On CUDA the sharded step (NCCL all_gather included) and
the one-GPU step are also captured in CUDA graphs and their replays timed (GPU time without the
host's launch overhead), when this PyTorch/NCCL allows it (``--no-graph``: not). Writes
``decode_sharded_W{W}.csv`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from bench_timing import (
    add_common_args,
    dist_median_time,
    format_table,
    graphed,
    header,
    run_info,
    start_distributed,
    tokens,
    write_csv,
)

from ringflash.decode import flash_attn_with_kvcache
from ringflash.parallel.sharded_decode import sharded_flash_attn_with_kvcache

HQ, HK, D = 32, 8, 128


def _graph_time(fn, device, reps, iters, alone=False):
    """Replay time of ``fn`` captured in a CUDA graph (rank 0 only if ``alone``); None when the
    capture fails. Every rank takes part in the same barriers either way."""
    runs = not alone or dist.get_rank() == 0
    replay = graphed(fn) if runs else None
    if runs and replay is None:
        print(f"rank {dist.get_rank()}: CUDA graph capture failed; the eager numbers still stand")
    t = dist_median_time(replay or (lambda: None), device, reps, iters, alone=alone)
    return None if runs and replay is None else t


def _measure(S, B, heads, dtype, device, a) -> dict:
    """One context length: the one-GPU, local and sharded step times (seconds -> us in the row)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hq, hk, d = heads
    n = S // world
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, 1, hq, d, generator=g).to(device, dtype)

    def kv_shard(r):  # one seeded generator per (context, rank): the same values on every rank
        gr = torch.Generator().manual_seed(1000 * S + r)
        return tuple(torch.randn(B, n, hk, d, generator=gr).to(device, dtype) for _ in range(2))

    mine = kv_shard(rank)
    full = None
    if rank == 0:  # rank 0 also holds the whole cache, for the one-GPU baseline
        parts = [mine] + [kv_shard(r) for r in range(1, world)]
        full = tuple(torch.cat([p[i] for p in parts], 1) for i in range(2))
        del parts
    lens_local = torch.full((B,), n, dtype=torch.int32, device=device)
    lens_full = torch.full((B,), S, dtype=torch.int32, device=device)

    def one_gpu():
        return flash_attn_with_kvcache(q, full[0], full[1], cache_seqlens=lens_full, causal=True)

    def local():
        return flash_attn_with_kvcache(q, mine[0], mine[1], cache_seqlens=lens_local, causal=True)

    def sharded():
        return sharded_flash_attn_with_kvcache(q, mine[0], mine[1], cache_seqlens=lens_local, causal=True)

    t_one = dist_median_time(one_gpu if rank == 0 else (lambda: None), device, a.reps, a.iters, alone=True)
    t_local = dist_median_time(local, device, a.reps, a.iters)
    t_sh = dist_median_time(sharded, device, a.reps, a.iters)
    out = sharded()
    ref = one_gpu() if rank == 0 else torch.empty_like(out)
    dist.broadcast(ref, 0)
    err = torch.tensor([((out.float() - ref.float()).norm() / ref.float().norm()).item()], device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    t_graph = t_one_graph = None
    if a.graph and device.type == "cuda":
        t_one_graph = _graph_time(one_gpu, device, a.reps, a.iters, alone=True)
        t_graph = _graph_time(sharded, device, a.reps, a.iters)
    return dict(
        world=world, batch=B, context=S, one_gpu_us=t_one * 1e6, local_us=t_local * 1e6,
        sharded_us=t_sh * 1e6, collective_combine_us=(t_sh - t_local) * 1e6, speedup=t_one / t_sh,
        graph_one_gpu_us=t_one_graph * 1e6 if t_one_graph else None,
        graph_sharded_us=t_graph * 1e6 if t_graph else None, max_rel_err=err.item(),
    )  # fmt: skip


COLUMNS = [
    ("context", "context", ""),
    ("one GPU us", "one_gpu_us", ".1f"),
    ("local us", "local_us", ".1f"),
    ("sharded us", "sharded_us", ".1f"),
    ("collective+combine", "collective_combine_us", ".1f"),
    ("speedup", "speedup", ".2f"),
    ("graph one GPU us", "graph_one_gpu_us", ".1f"),
    ("graph sharded us", "graph_sharded_us", ".1f"),
    ("graph speedup", "graph_speedup", ".2f"),
    ("max rel err", "max_rel_err", ".1e"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, tiny="256 keys per rank, small heads (a smoke run; CPU/gloo too)")
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True, help="CUDA-graph columns")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    info, device, dtype = start_distributed()
    rank, world = info.rank, info.world_size
    hq, hk, d = (4, 2, 32) if a.tiny else (HQ, HK, D)
    if a.tiny:
        a.contexts, a.reps, a.iters = [256 * world], 2, 2
    B = a.batch
    run = run_info(device)
    title = (
        f"sharded decode over {world} ranks ({info.backend}); B={B}, Hq={hq} Hk={hk} D={d} "
        f"{str(dtype)[6:]}, 1 query token; us per step; speedup = one GPU / sharded"
    )
    if rank == 0:
        print(header(title, info=run), flush=True)
    rows = []
    for S in a.contexts:
        if S % world:
            raise SystemExit(f"context {S} does not divide over {world} ranks")
        row = _measure(S, B, (hq, hk, d), dtype, device, a)
        if row["graph_one_gpu_us"] and row["graph_sharded_us"]:
            row["graph_speedup"] = row["graph_one_gpu_us"] / row["graph_sharded_us"]
        rows.append(row)
        if rank == 0:
            print(f"measured {tokens(S)}: {row}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        print("\n" + header(title, info=run))
        print(format_table(rows, COLUMNS))
        os.makedirs(a.out, exist_ok=True)
        write_csv(os.path.join(a.out, f"decode_sharded_W{world}.csv"), rows, run)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
