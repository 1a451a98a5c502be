"""Benchmark: packed documents across W ranks, simulated on one device, against one device's varlen call.

Each virtual rank runs its share (the ring's steps, or the all-gather method's calls) on the same
device; the simulator times each rank's GPU work between messages (CUDA events). Efficiency is
``t(one call on the whole stream) / (W * t(slowest rank))``: 1.0 means the work split perfectly,
without overhead. Only pairs inside a document count as work, as in the baseline.

Length distributions of the documents in a stream of ``W * tokens-per-rank`` tokens:
``longtail`` (lengths from a Pareto law of mean ~4k, clipped to [64, stream], so some documents
span the whole stream), ``1k`` (every document 1024 tokens), ``one`` (a single document).

Variants are ``layout:method[:heads_k_stride]``; the all-gather's pieces of KV heads run one after
another here (the simulator does not overlap transfers with compute), so a stride shows what its
smaller calls cost; ``all``: the whole exchange at once. The ``kv/piece`` column is the stride used.
``--sched-per-sm 0 4`` / ``--concurrent-dq off on`` (fields of ``AttnConfig``) repeat every row
under each kernel option, the one-call baseline included (the ``config`` column).

The baseline, measured in the same run on the same stream: one ``flash_attn_varlen_func`` call
over the whole stream on this device (forward, and backward through autograd). Writes
``packed.csv`` into ``--out``. Where efficiency goes, per pass: ``work`` is the ranks' times summed
against the one call (the cost of splitting it into smaller calls and of the data moved around
them), ``skew`` the slowest rank against their mean; efficiency is about ``1 / (work x skew)``.

    python benchmarks/bench_packed.py --out DIR          # Llama-3-8B attention, 8k tokens per rank
    python benchmarks/bench_packed.py --tiny --out DIR   # a seconds-long smoke run (CPU too)
    python benchmarks/bench_packed.py --worlds 8 --dists longtail --variants balanced:allgather:all \
        --breakdown --out DIR                            # and where the ranks' device time goes
    python benchmarks/bench_packed.py ... --calls --out DIR  # and each attention call timed alone
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import statistics
import sys
import time

import torch
from bench_timing import (
    add_common_args,
    add_config_args,
    config_variants,
    format_table,
    header,
    run_info,
    write_csv,
)
from packed_calls import CALL_COLUMNS, call_table

import ringflash as rf
from ringflash.backends import use_config
from ringflash.kernels.options import AttnConfig
from ringflash.parallel import shard_for
from ringflash.parallel.allgather import default_heads_k_stride
from ringflash.parallel.gather_plan import gather_plan
from ringflash.parallel.simulate import simulate_ring_attn, simulate_ring_attn_backward

# Kernel options a run can repeat its rows under.
CONFIG_FIELDS = ("sched_per_sm", "concurrent_dq", "concurrent_dq_max_waves")
VARIANTS = [
    ("contiguous", "ring"),
    ("zigzag", "ring"),
    ("zigzag", "allgather"),
    ("stripe", "ring"),
    ("balanced", "ring"),
    ("balanced", "allgather"),
    ("balanced", "allgather", "all"),
]


def documents(dist: str, total: int, seed: int = 0, mean: int = 4096) -> torch.Tensor:
    """cu_seqlens of a stream of ``total`` tokens in distribution ``dist``."""
    rng = random.Random(seed)
    if dist == "one":
        lens = [total]
    elif dist.endswith("k") and dist[:-1].isdigit():
        n = int(dist[:-1]) * 1024
        lens = [n] * (total // n) + ([total % n] if total % n else [])
    else:  # Pareto with shape 1.5 has mean 3 * scale: scale mean / 3
        lens, left = [], total
        while left > 0:
            n = min(left, max(64, int(mean / 3 * rng.paretovariate(1.5))))
            lens.append(n)
            left -= n
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _host_ahead() -> None:
    """Queue a GPU sleep (~50 ms) so that the host enqueues what follows before the GPU gets there:
    CUDA events then time the GPU's work alone, as on a training rank whose host runs layers
    ahead of its GPU. Without it, each virtual rank's segment starts on an idle GPU and counts
    the host's launch time too (per-call host time is measured by bench_decode / bench_attention)."""
    if torch.cuda.is_available():
        torch.cuda._sleep(100_000_000)


def _time(fn, reps: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, the host ahead; the host clock elsewhere)."""
    times = []
    for _ in range(reps + 1):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _host_ahead()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _simulate(qs, ks, vs, ds, cu, layout, method, heads_k_stride, ahead):
    """One forward and backward of the virtual ranks: their profiles (each rank's GPU time)."""
    timing = dict(
        profile=True,
        cuda_events=torch.cuda.is_available(),
        sync=None if torch.cuda.is_available() else (lambda: None),
    )
    mask = dict(causal=True, cu_seqlens=cu, method=method, heads_k_stride=heads_k_stride)
    if ahead:
        _host_ahead()
    outs, lses, pf = simulate_ring_attn(qs, ks, vs, layout, **mask, **timing)
    if ahead:
        _host_ahead()
    *_, pb = simulate_ring_attn_backward(ds, qs, ks, vs, outs, lses, layout, **mask, **timing)
    return pf, pb


def kernel_ms(fn, *args, **kwargs) -> dict[str, float]:
    """Milliseconds of device time per kernel name in one run of ``fn(*args, **kwargs)``
    (``torch.profiler``; CPU operators' own time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as p:
        fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    out = {}
    for e in p.key_averages():
        ms = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
        if ms > 0:
            out[e.key] = ms
    return out


def print_breakdown(label: str, one: dict[str, float], ranks: dict[str, float], top: int = 10) -> None:
    """The kernels of the one call against the same kernels summed over the virtual ranks."""
    print(f"\n{label}: device ms per kernel, one call / all ranks")
    names = sorted(set(one) | set(ranks), key=lambda n: -max(one.get(n, 0), ranks.get(n, 0)))[:top]
    for n in names:
        print(f"  {one.get(n, 0.0):9.3f} {ranks.get(n, 0.0):9.3f}  {n[:90]}")
    print(f"  {sum(one.values()):9.3f} {sum(ranks.values()):9.3f}  total")


def exchanged_rows(cu, world: int, layout: str, method: str):
    """``(received, sent)`` rows of each rank under the all-gather (causal, no window; None for
    the ring): the data it moves grows with them."""
    if method != "allgather":
        return None
    plans = [gather_plan(layout, tuple(int(x) for x in cu), r, world, True, (-1, -1)) for r in range(world)]
    recv = [sum(p.recv) - p.recv[r] for r, p in enumerate(plans)]
    sent = [sum(len(x) for d, x in enumerate(p.send) if d != r) for r, p in enumerate(plans)]
    return recv, sent


def print_ranks(per_rank, alone: dict, rows) -> None:
    """Each rank's time per pass against its calls alone (``--calls``), and its exchanged rows."""
    print("rank: fwd ms, calls alone, beyond | bwd ms, calls alone, beyond | rows received, sent")
    for r, (f, b) in enumerate(zip(*per_rank, strict=True)):
        moved = "" if rows is None else f" | {rows[0][r]}, {rows[1][r]}"
        f, b, cf, cb = f * 1e3, b * 1e3, alone["fwd"][r], alone["bwd"][r]
        print(f"  {r}: {f:.3f}, {cf:.3f}, {f - cf:.3f} | {b:.3f}, {cb:.3f}, {b - cb:.3f}{moved}")


def run(
    world,
    tokens,
    heads,
    kv_heads,
    dim,
    dtype,
    device,
    dist,
    reps,
    seed=0,
    variants=VARIANTS,
    breakdown=False,
    calls=False,
):
    cu = documents(dist, world * tokens, seed)
    T = int(cu[-1])
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, dout = (
        torch.randn(T, h, dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads, heads)
    )
    maxlen = int((cu[1:] - cu[:-1]).max())
    cud = cu.to(device)

    def base_fwd():
        return rf.flash_attn_varlen_func(
            q, k, v, cud, cud, maxlen, maxlen, causal=True, return_attn_probs=True
        )

    qg = q.detach().requires_grad_()
    out, lse, _ = rf.flash_attn_varlen_func(
        qg, k, v, cud, cud, maxlen, maxlen, causal=True, return_attn_probs=True
    )
    with rf.skip_value_checks():  # their host sync would let the GPU catch up with the host
        t_fwd = _time(base_fwd, reps)
        t_bwd = _time(lambda: torch.autograd.grad(out, qg, dout, retain_graph=True), reps)
        if breakdown:
            one = kernel_ms(lambda: (base_fwd(), torch.autograd.grad(out, qg, dout, retain_graph=True)))
    rows, done = [], set()
    for layout, method, *piece in variants:
        qs, ks, vs, ds = (
            [shard_for(x, r, world, 0, layout, cu) for r in range(world)] for x in (q, k, v, dout)
        )
        stride = default_heads_k_stride(qs[0], ks[0])
        if piece:
            stride = kv_heads if piece[0] == "all" else int(piece[0])
        if (layout, method, stride if method != "ring" else None) in done:
            continue  # the default stride is the whole exchange here: one run, one row
        done.add((layout, method, stride if method != "ring" else None))
        sim = dict(layout=layout, method=method, heads_k_stride=stride, ahead=True)
        fwd, bwd = [], []
        for rep in range(reps + 1):  # the first pass compiles and autotunes the calls' kernels
            pf, pb = _simulate(qs, ks, vs, ds, cu, **sim)
            if rep:
                fwd.append([pf.rank_time(r) for r in range(world)])
                bwd.append([pb.rank_time(r) for r in range(world)])
        label = f"{dist}, W = {world}, {layout} {method} (kv/piece {stride})"
        if breakdown:
            ranks = kernel_ms(_simulate, qs, ks, vs, ds, cu, **dict(sim, ahead=False))
            print_breakdown(label, one, ranks)
        f, b = (statistics.median(max(ranks) for ranks in times) for times in (fwd, bwd))
        # Each rank's median: their sum against the one call is the work the split adds, their
        # max against their mean the imbalance; efficiency is about 1 / (work x imbalance).
        per_rank = [[statistics.median(col) for col in zip(*times, strict=True)] for times in (fwd, bwd)]
        extra = {}
        if calls:
            table, alone_per_rank = call_table(q, k, v, dout, cu, world, layout, method, stride)
            print(f"\n{label}: each attention call alone, the one call's against the ranks'")
            print(format_table(table, CALL_COLUMNS))
            alone = {r["pass_"]: r["ms"] for r in table if r["who"] == "ranks" and r["kind"] == "all"}
            beyond = [
                (sum(ranks) * 1e3 - alone[p]) / world
                for ranks, p in zip(per_rank, ("fwd", "bwd"), strict=True)
            ]
            print(
                f"a rank's mean time beyond its calls alone: {beyond[0]:.3f} / {beyond[1]:.3f} ms (fwd / bwd)"
            )
            print_ranks(per_rank, alone_per_rank, exchanged_rows(cu, world, layout, method))
            extra["ranks_fwd_calls_ms"] = " ".join(f"{t:.3f}" for t in alone_per_rank["fwd"])
            extra["ranks_bwd_calls_ms"] = " ".join(f"{t:.3f}" for t in alone_per_rank["bwd"])
        work = [sum(ranks) / t for ranks, t in zip(per_rank, (t_fwd, t_bwd), strict=True)]
        skew = [max(ranks) * world / sum(ranks) for ranks in per_rank]
        rows.append(
            dict(
                dist=dist,
                world=world,
                docs=len(cu) - 1,
                layout=layout,
                method=method,
                kv_per_piece=stride if method != "ring" else "",
                base_fwd_ms=t_fwd * 1e3,
                base_bwd_ms=t_bwd * 1e3,
                rank_fwd_ms=f * 1e3,
                rank_bwd_ms=b * 1e3,
                eff_fwd=t_fwd / (world * f),
                eff_fwd_bwd=(t_fwd + t_bwd) / (world * (f + b)),
                work_fwd=work[0],
                skew_fwd=skew[0],
                work_bwd=work[1],
                skew_bwd=skew[1],
                # each rank's median, for a cost model of the layout to be checked against
                ranks_fwd_ms=" ".join(f"{t * 1e3:.3f}" for t in per_rank[0]),
                ranks_bwd_ms=" ".join(f"{t * 1e3:.3f}" for t in per_rank[1]),
                **extra,
            )
        )
    return rows


COLUMNS = [
    ("config", "config", ""),
    ("dist", "dist", ""),
    ("W", "world", ""),
    ("docs", "docs", ""),
    ("layout", "layout", ""),
    ("method", "method", ""),
    ("kv/piece", "kv_per_piece", ""),
    ("one call fwd ms", "base_fwd_ms", ".3f"),
    ("bwd ms", "base_bwd_ms", ".3f"),
    ("rank fwd ms", "rank_fwd_ms", ".3f"),
    ("rank bwd ms", "rank_bwd_ms", ".3f"),
    ("eff fwd", "eff_fwd", ".3f"),
    ("eff f+b", "eff_fwd_bwd", ".3f"),
    ("work fwd", "work_fwd", ".3f"),
    ("skew fwd", "skew_fwd", ".3f"),
    ("work bwd", "work_bwd", ".3f"),
    ("skew bwd", "skew_bwd", ".3f"),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, tiny="2 ranks, 256 tokens, small heads (a seconds-long smoke run)")
    ap.add_argument("--worlds", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    ap.add_argument("--dists", nargs="*", default=["longtail", "1k", "one"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="of the document lengths and the tensors")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also print each variant's device time per kernel, the one call against all ranks",
    )
    ap.add_argument(
        "--calls",
        action="store_true",
        help="also time each variant's attention calls alone, the one call's against the ranks' "
        "(per visible pair; benchmarks/packed_calls.py)",
    )
    add_config_args(ap, AttnConfig, CONFIG_FIELDS)
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[":".join(v) for v in VARIANTS],
        help="layout:method[:heads_k_stride or all] (default: all of them)",
    )
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (32, 8, 128, torch.bfloat16 if device == "cuda" else torch.float32)
    if a.tiny:
        a.worlds, a.tokens, a.reps, shape = [2], 256, 1, (4, 2, 32, torch.float32)
        a.dists = ["longtail", "one"]
    info = run_info(device)
    heads = f"{shape[0]} q / {shape[1]} kv heads, d {shape[2]}, {str(shape[3])[6:]}, causal"
    title = f"packed documents, simulated ranks; {heads}, {a.tokens} tokens per rank"
    title += "; eff = t(one call) / (W * t(slowest rank))"
    print(header(title, info=info), flush=True)
    rows = []
    for label, config in config_variants(AttnConfig, a, CONFIG_FIELDS):
        for dist in a.dists:
            for world in a.worlds:
                variants = [tuple(v.split(":")) for v in a.variants]
                with use_config(config) if config is not None else contextlib.nullcontext():
                    measured = run(
                        world,
                        a.tokens,
                        *shape,
                        device,
                        dist,
                        a.reps,
                        seed=a.seed,
                        variants=variants,
                        breakdown=a.breakdown,
                        calls=a.calls,
                    )
                for r in measured:
                    rows.append({"config": label, **r})
                    shown = {k: round(x, 4) if isinstance(x, float) else x for k, x in rows[-1].items()}
                    print("measured", shown, flush=True)
    print("\n" + header(title, info=info))
    print(format_table(rows, COLUMNS))
    os.makedirs(a.out, exist_ok=True)
    write_csv(os.path.join(a.out, "packed.csv"), rows, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
