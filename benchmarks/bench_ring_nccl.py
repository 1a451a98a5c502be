"""Ring attention across real GPUs (NCCL): per-GPU TFLOP/s and efficiency vs the one-GPU kernel.

    torchrun --nproc_per_node 4 benchmarks/bench_ring_nccl.py --out DIR     # Llama-3-8B shape, 8k tokens/GPU
    torchrun --nproc_per_node 2 benchmarks/bench_ring_nccl.py --tiny        # a smoke run (also on CPU/gloo)
    torchrun --nproc_per_node 4 benchmarks/bench_ring_nccl.py --profile --out DIR

Layouts: ``zigzag``, ``contiguous``, ``stripe`` (padded ``[1, S, H, D]``), and ``varlen``: the same
``S`` tokens packed as documents that cross shard boundaries (``--dists``, each in turn:
``longtail``, lengths of a long-tailed distribution of mean ``--doc-len`` with some documents as
long as the stream, as ``bench_packed.py`` draws them; ``uniform``, uniform in ``[1, 2 * doc-len)``;
``one``; ``Nk``), through ``ring_flash_attn_varlen_func``, one row per distribution and ``--packed``
variant ``layout:method[:stride]``
(``stride``: ``heads_k_stride`` of the all-gather's exchange); its ``t_full`` is one whole-stream
varlen call and its FLOPs count only the within-document causal pairs.

``--profile`` records one forward and one forward+backward ring call per rank with
``torch.profiler`` and writes, per rank, the GPU kernel time by kernel, the host time by operator,
and the call's wall time (``ring_profile_rank{r}.txt`` in ``--out``): where a ring call's time goes
when it is longer than its kernels; with ``--trace`` also rank 0's timeline of the forward call
(Chrome trace JSON, ``ring_trace_{layout}.json``), which shows where the compute stream waits.

``--copy-engine`` adds a row per layout (``{layout}+ce``) with the K/V moved by the GPUs' copy
engines (``ringflash.use_ring_transport("copy_engine")``; NCCL groups only); ``--plain-ring`` one
(``{layout}+p1``) with the forward holding one K/V block at a time (``ringflash.use_ring_prefetch(1)``;
the default holds two). Every variant row prints the largest difference of its outputs and
gradients from the default's (float32 sums in another order; the copy engine's forward holds one
block).

For ``W`` ranks with ``L`` tokens each (``S = W * L``): ``t_full`` is one whole-sequence call of the
local backend on one device, ``t_ring`` the slowest rank's time for the ring call (forward, or
forward+backward through autograd), median over repetitions (``--iters N``: N calls back to back per
repetition, per call, as a model's layers run them, so one call's host work overlaps the previous
call's kernels; 1: each call starts on an idle GPU). Efficiency = t_full / (W * t_ring);
per-GPU TFLOP/s counts the causal FLOPs 4*S*S*Hq*D/2 (backward 2.5x) divided over the W GPUs.
The baseline (``t_full``) is measured in the same run on rank 0's device, with every rank doing
the same. Writes ``ring_nccl_W{W}.csv`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist
from bench_packed import documents
from bench_timing import (
    add_common_args,
    dist_median_time,
    format_table,
    header,
    run_info,
    start_distributed,
    write_csv,
)

import ringflash as rf
from ringflash.backends import backend_for

FUNCS = {
    "zigzag": rf.zigzag_ring_flash_attn_func,
    "contiguous": rf.ring_flash_attn_func,
    "stripe": rf.stripe_flash_attn_func,
    "varlen": rf.ring_flash_attn_varlen_func,
}
# Row suffix -> (use_ring_transport, use_ring_prefetch) of the variant rows (None: the library's).
VARIANTS = {"": ("nccl", None), "ce": ("copy_engine", None), "p1": ("nccl", 1)}


def doc_lengths(total: int, mean: int, seed: int = 0) -> list[int]:
    """Random document lengths (uniform in [1, 2*mean)) that sum to ``total``; the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(1, 2 * mean, (1,), generator=g)))
        lens.append(n)
        left -= n
    return lens


def causal_pairs(lens: list[int]) -> int:
    """Query-key pairs a causal varlen call computes (the diagonal counted half, as for padded)."""
    return sum(n * n // 2 for n in lens)


def packed_variant(text: str) -> tuple[str, str, int | None]:
    """``layout:method[:stride]`` -> ``(layout, method, heads_k_stride or None)``."""
    layout, method, *rest = text.split(":")
    return layout, method, int(rest[0]) if rest else None


class Ring:
    """One layout's ring call on this rank's shards, with closures for timing and profiling.
    ``packed``: ``(layout, method, heads_k_stride)`` of a ``varlen`` call."""

    def __init__(
        self, layout, full, cu, transport="nccl", prefetch=None, packed=("contiguous", "ring", None)
    ):
        self.layout, self.cu, self.transport, self.prefetch = layout, cu, transport, prefetch
        self.packed = packed
        self.name = layout  # in the profile's and the trace's file names
        q, k, v, dout = full
        if layout == "varlen":  # packed [T, H, D]
            ql, kl, vl, dl = (rf.shard(x[0], dim=0, layout=packed[0], cu_seqlens=cu) for x in (q, k, v, dout))
        else:
            ql, kl, vl, dl = (rf.shard(x, layout=layout) for x in (q, k, v, dout))
        self.ql, self.kl, self.vl = (x.clone().requires_grad_() for x in (ql, kl, vl))
        self.dl = dl

    def call(self):
        prefetch = rf.use_ring_prefetch(self.prefetch) if self.prefetch else contextlib.nullcontext()
        with rf.use_ring_transport(self.transport), prefetch:
            if self.layout == "varlen":
                cu, (layout, method, stride) = self.cu, self.packed
                return FUNCS["varlen"](
                    self.ql,
                    self.kl,
                    self.vl,
                    cu,
                    int(cu.diff().max()),
                    causal=True,
                    layout=layout,
                    method=method,
                    heads_k_stride=stride,
                )
            return FUNCS[self.layout](self.ql, self.kl, self.vl, causal=True)

    def fwd(self):
        with torch.no_grad():
            return self.call()

    def outputs(self):
        """(out, dq, dk, dv) of one call, to compare the variants with the default."""
        out = self.call()
        return (out.detach(), *torch.autograd.grad(out, (self.ql, self.kl, self.vl), self.dl))

    def fwd_bwd(self):
        out = self.call()
        torch.autograd.grad(out, (self.ql, self.kl, self.vl), self.dl)


def _trace(ring: Ring, out_dir: str) -> None:
    """Rank 0's Chrome trace of one forward call (the other ranks run the call untraced)."""
    from torch.profiler import ProfilerActivity, profile

    ring.fwd()
    torch.cuda.synchronize()
    dist.barrier()
    if dist.get_rank() == 0:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ring.fwd()
            torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(out_dir, f"ring_trace_{ring.name}.json"))
    else:
        ring.fwd()
        torch.cuda.synchronize()
    dist.barrier()


def _profile(ring: Ring, rank: int, out_dir: str) -> None:
    """Per-rank profile of one fwd and one fwd+bwd call: kernel time by kernel, host time by op."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for name, fn in (("fwd", ring.fwd), ("fwd+bwd", ring.fwd_bwd)):
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        ka = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in ka) / 1e3
        lines.append(f"== {ring.name} {name}: wall {wall * 1e3:.2f} ms, GPU kernel time {gpu:.2f} ms ==")
        lines.append(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
        lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    path = os.path.join(out_dir, f"ring_profile_{ring.name}_rank{rank}.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if rank == 0:
        print("\n".join(lines[:1] + lines[3:4]))


COLUMNS = [
    ("layout", "layout", ""),
    ("full fwd ms", "full_fwd_ms", ".2f"),
    ("full f+b ms", "full_fb_ms", ".2f"),
    ("fwd ms", "fwd_ms", ".2f"),
    ("TFLOP/s/GPU", "fwd_tflops_per_gpu", ".1f"),
    ("eff fwd", "fwd_eff", ".3f"),
    ("f+b ms", "fb_ms", ".2f"),
    ("TFLOP/s/GPU", "fb_tflops_per_gpu", ".1f"),
    ("eff f+b", "fb_eff", ".3f"),
    ("diff vs default", "max_diff", ".1e"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, tiny="128 tokens per rank, small heads (a smoke run; CPU/gloo too)")
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layouts", nargs="+", default=list(FUNCS), choices=list(FUNCS))
    p.add_argument("--doc-len", type=int, default=4096, help="mean document length of the varlen rows")
    p.add_argument(
        "--dists",
        nargs="+",
        default=["longtail", "1k", "one"],
        help="document lengths of the varlen rows: longtail, uniform, one or Nk",
    )
    p.add_argument(
        "--packed",
        nargs="+",
        type=packed_variant,
        default=[packed_variant(x) for x in ("contiguous:ring", "balanced:ring", "balanced:allgather")],
        help="the varlen rows: layout:method[:heads_k_stride] (e.g. balanced:allgather:8)",
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--iters",
        type=int,
        default=1,
        help="calls back to back per timing (as a model's layers run them: the host runs ahead)",
    )
    p.add_argument("--profile", action="store_true", help="also profile one call per layout (CUDA)")
    p.add_argument("--trace", action="store_true", help="rank 0's Chrome trace of one forward (CUDA)")
    p.add_argument(
        "--copy-engine",
        action="store_true",
        help='also time each layout under use_ring_transport("copy_engine") (K/V by copy engine; NCCL)',
    )
    p.add_argument(
        "--plain-ring",
        action="store_true",
        help="also time each layout under use_ring_prefetch(1): the forward holds one K/V block at a time",
    )
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.tiny:
        a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim, a.reps, a.doc_len = 128, 4, 2, 32, 2, 50
    info, device, dtype = start_distributed()
    rank, world = info.rank, info.world_size
    L, Hq, Hk, D = a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim
    S = world * L
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, S, h, D, generator=g).to(device, dtype) for h in (Hq, Hk, Hk, Hq))
    streams = {}  # distribution -> (document lengths, cu_seqlens)
    for dist_name in a.dists:
        if dist_name == "uniform":
            lens = doc_lengths(S, a.doc_len)
        else:
            lens = documents(dist_name, S, mean=a.doc_len).diff().tolist()
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        streams[dist_name] = (lens, cu)
    be = backend_for(q)
    scale = D**-0.5

    def full_calls(dist_name):
        kw = dict(softmax_scale=scale, causal=True)
        varlen = dist_name is not None
        if varlen:
            lens, cu = streams[dist_name]
            m = int(max(lens))
            kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m)
        qq, kk, vv, dd = (x[0] if varlen else x for x in (q, k, v, dout))

        def fwd():
            return be.attn_fwd(qq, kk, vv, **kw)

        def fb():
            out, lse = fwd()
            be.attn_bwd(dd, qq, kk, vv, out, lse, **kw)

        return fwd, fb

    run = run_info(device)
    title = (
        f"ring over {world} ranks ({info.backend}); causal, Hq={Hq} Hk={Hk} D={D} {str(dtype)[6:]}, "
        f"{L} tokens per rank (S={S}), {a.iters} call(s) back to back; varlen: "
        + ", ".join(f"{d} ({len(x)} documents, the longest {max(x)})" for d, (x, _) in streams.items())
        + "; eff = t_full / (W * t_ring)"
    )
    if rank == 0:
        print(header(title, info=run), flush=True)
    nccl = info.backend == "nccl"
    suffixes = [""] + (["ce"] if a.copy_engine and nccl else []) + (["p1"] if a.plain_ring else [])
    rows, full_times, reference = [], {}, {}
    os.makedirs(a.out, exist_ok=True)
    calls = [(x, None, None) for x in a.layouts if x != "varlen"]
    if "varlen" in a.layouts:
        calls += [("varlen", d, p) for d in a.dists for p in a.packed]
    for suffix in suffixes:
        for layout, dist_name, packed in calls:
            base = layout
            if packed is not None:
                base = f"varlen {dist_name} " + ":".join(str(x) for x in packed if x is not None)
            name = base + (f"+{suffix}" if suffix else "")
            varlen = layout == "varlen"
            if dist_name not in full_times:
                fwd, fb = full_calls(dist_name)
                full_times[dist_name] = (
                    dist_median_time(fwd, device, a.reps, a.iters),
                    dist_median_time(fb, device, a.reps, a.iters),
                )
            t_full, t_full_fb = full_times[dist_name]
            lens, cu = streams[dist_name] if varlen else (None, None)
            flops = 4 * (causal_pairs(lens) if varlen else S * S // 2) * Hq * D
            ring = Ring(
                layout, (q, k, v, dout), cu, *VARIANTS[suffix], **({"packed": packed} if packed else {})
            )
            ring.name = base.replace(" ", "_").replace(":", "-")
            t_r = dist_median_time(ring.fwd, device, a.reps, a.iters)
            t_rfb = dist_median_time(ring.fwd_bwd, device, a.reps, a.iters)
            row = dict(world=world, layout=name, S=S, full_fwd_ms=t_full * 1e3, full_fb_ms=t_full_fb * 1e3)
            row.update(
                fwd_ms=t_r * 1e3,
                fwd_tflops_per_gpu=flops / world / t_r / 1e12,
                fwd_eff=t_full / (world * t_r),
            )
            row.update(fb_ms=t_rfb * 1e3, fb_tflops_per_gpu=3.5 * flops / world / t_rfb / 1e12)
            row["fb_eff"] = t_full_fb / (world * t_rfb)
            got = ring.outputs()
            if not suffix:
                reference[base] = got
            else:  # float32 sums in another order: equal up to rounding
                pairs = zip(got, reference[base], strict=True)
                diff = max((x.float() - y.float()).abs().max().item() for x, y in pairs)
                diff = torch.tensor([diff], dtype=torch.float64, device=device)
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                row["max_diff"] = diff.item()
            rows.append(row)
            if rank == 0:
                print(
                    "measured",
                    {k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()},
                    flush=True,
                )
            if device.type == "cuda" and not suffix:
                if a.profile:
                    _profile(ring, rank, a.out)
                if a.trace:
                    _trace(ring, a.out)
    if rank == 0:
        print("\n" + header(title, info=run))
        print(format_table(rows, COLUMNS))
        write_csv(os.path.join(a.out, f"ring_nccl_W{world}.csv"), rows, run)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
