"""Ring attention across real GPUs (NCCL): per-GPU TFLOP/s and efficiency vs the one-GPU kernel.

    torchrun --nproc_per_node 2 benchmarks/bench_ring_nccl.py            # Llama-3-8B shape, 8k tokens/GPU
    torchrun --nproc_per_node 2 benchmarks/bench_ring_nccl.py --tiny     # a smoke run (also on CPU/gloo)
    torchrun --nproc_per_node 4 benchmarks/bench_ring_nccl.py --out ring_nccl --profile

Layouts: ``zigzag``, ``contiguous``, ``stripe`` (padded ``[1, S, H, D]``), and ``varlen``: the same
``S`` tokens packed as documents of random lengths (mean ``--doc-len``, seed 0) that cross shard
boundaries, through ``ring_flash_attn_varlen_func`` (contiguous shards); its ``t_full`` is one
whole-stream varlen call and its FLOPs count only the within-document causal pairs.

``--profile`` records one forward and one forward+backward ring call per rank with
``torch.profiler`` and writes, per rank, the GPU kernel time by kernel, the host time by operator,
and the call's wall time (``ring_profile_rank{r}.txt`` in ``--out``): where a ring call's time goes
when it is longer than its kernels; with ``--trace`` also rank 0's timeline of the forward call
(Chrome trace JSON, ``ring_trace_{layout}.json``), which shows where the compute stream waits.

``--copy-engine`` adds a row per layout (``{layout}+ce``) with the K/V moved by the GPUs' copy
engines (``ringflash.use_ring_transport("copy_engine")``); ``--plain-ring`` one (``{layout}+p1``)
with the forward holding one K/V block at a time (``ringflash.use_ring_prefetch(1)``; the default
holds two); ``--split-own`` one (``{layout}+so``) with the backward's own block split around the
remote steps, so that its second part covers the last dK/dV sum's trip home
(``ringflash.parallel.ring_loop.SPLIT_OWN_BLOCK``). ``--p2p-high-priority`` and
``--p2p-run-ahead`` add a row per layout (``{layout}+hp``, ``{layout}+ra``) with an experimental
way of running the ring's P2P (see ``p2p_variants``): whether the K/V transfers are slowed by
waiting for SMs that the attention kernels hold, or for the previous step's kernels. Every variant
row checks that its outputs and gradients equal the default's bitwise (``p1``, ``ce`` (whose forward
holds one K/V block) and ``so``: prints the largest difference, as their float32 sums run in
another order).

For ``W`` ranks with ``L`` tokens each (``S = W * L``): ``t_full`` is one whole-sequence call of the
local backend on one device, ``t_ring`` the slowest rank's time for the ring call (forward, or
forward+backward through autograd), median over repetitions (``--iters N``: N calls back to back per
repetition, per call, as a model's layers run them, so one call's host work overlaps the previous
call's kernels; 1: each call starts on an idle GPU). Efficiency = t_full / (W * t_ring);
per-GPU TFLOP/s counts the causal FLOPs 4*S*S*Hq*D/2 (backward 2.5x) divided over the W GPUs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from bench_io import write_csv
from bench_timing import dist_median_time, start_distributed

import ringflash as rf
from ringflash.backends import backend_for
from ringflash.parallel.options import DEFAULT_RING_PREFETCH

FUNCS = {
    "zigzag": rf.zigzag_ring_flash_attn_func,
    "contiguous": rf.ring_flash_attn_func,
    "stripe": rf.stripe_flash_attn_func,
    "varlen": rf.ring_flash_attn_varlen_func,
}


def _cells(t, flops_per_gpu, t_ideal):
    return f"{t * 1e3:>8.2f} {flops_per_gpu / t / 1e12:>11.0f} {t_ideal / t:>5.2f}"


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


class Ring:
    """One layout's ring call on this rank's shards, with closures for timing and profiling."""

    def __init__(self, layout, full, cu, world):
        self.layout, self.cu = layout, cu
        q, k, v, dout = full
        if layout == "varlen":  # packed [T, H, D], contiguous shards
            ql, kl, vl, dl = (rf.shard(x[0], dim=0, layout="contiguous") for x in (q, k, v, dout))
        else:
            ql, kl, vl, dl = (rf.shard(x, layout=layout) for x in (q, k, v, dout))
        self.ql, self.kl, self.vl = (x.clone().requires_grad_() for x in (ql, kl, vl))
        self.dl = dl

    transport = "nccl"  # ringflash.use_ring_transport choice (class-wide: see p2p_variants)
    prefetch = DEFAULT_RING_PREFETCH  # ringflash.use_ring_prefetch choice (likewise)

    def call(self):
        with rf.use_ring_transport(Ring.transport), rf.use_ring_prefetch(Ring.prefetch):
            if self.layout == "varlen":
                cu = self.cu
                return FUNCS["varlen"](self.ql, self.kl, self.vl, cu, int(cu.diff().max()), causal=True)
            return FUNCS[self.layout](self.ql, self.kl, self.vl, causal=True)

    def fwd(self):
        with torch.no_grad():
            return self.call()

    def check_outputs(self):
        """(out, dq, dk, dv) of one call, to compare P2P variants (they must be bitwise equal)."""
        out = self.call()
        return (out.detach(), *torch.autograd.grad(out, (self.ql, self.kl, self.vl), self.dl))

    def fwd_bwd(self):
        out = self.call()
        torch.autograd.grad(out, (self.ql, self.kl, self.vl), self.dl)


def p2p_variants(
    high_priority: bool,
    run_ahead: bool,
    copy_engine: bool = False,
    plain: bool = False,
    split_own: bool = False,
) -> dict:
    """Other ways to run the ring's P2P: ``{row suffix: installer(on)}`` (this process only).

    ``ce``: the library's copy-engine transport (``ringflash.use_ring_transport("copy_engine")``).
    ``p1``: the forward holding one K/V block at a time (``ringflash.use_ring_prefetch(1)``).
    ``so``: the backward's own block split around the remote steps (``ring_loop.SPLIT_OWN_BLOCK``).
    ``hp``: sends and receives on a second NCCL group created with high-priority streams.
    ``ra``: every K/V post after a call's first is enqueued from a side stream that waits for
    nothing, so each transfer starts when the previous one ends rather than after the previous
    step's kernels (the first post, and the dK/dV posts, still wait for the compute stream).
    """
    from ringflash.comm.ring import RingComm
    from ringflash.parallel import ring_attn, ring_loop
    from ringflash.parallel.ring_loop import TAG_KV

    default = ring_attn.RingComm

    class RunAhead(RingComm):
        side = None

        def __init__(self, group=None, timeout=None, **kw):
            super().__init__(group, timeout, **kw)
            self.first = True
            if RunAhead.side is None:
                RunAhead.side = torch.cuda.Stream()

        def post(self, tensors, shift=1, tag=0):
            if tag != TAG_KV or self.first:
                self.first = self.first and tag != TAG_KV
                return super().post(tensors, shift, tag)
            with torch.cuda.stream(RunAhead.side):
                transfer = super().post(tensors, shift, tag)
            plain_wait = transfer.wait

            def wait():
                bufs = plain_wait()
                for b in bufs:  # used on the compute stream from here on
                    b.record_stream(torch.cuda.current_stream())
                return bufs

            transfer.wait = wait
            return transfer

    out = {}
    if high_priority:
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = True
        hp = dist.new_group(backend="nccl", pg_options=opts)
        out["hp"] = lambda on: setattr(
            ring_attn, "RingComm", (lambda g, **kw: RingComm(hp)) if on else default
        )
    if run_ahead:
        out["ra"] = lambda on: setattr(ring_attn, "RingComm", RunAhead if on else default)
    if copy_engine:
        out["ce"] = lambda on: setattr(Ring, "transport", "copy_engine" if on else "nccl")
    if split_own:
        out["so"] = lambda on: setattr(ring_loop, "SPLIT_OWN_BLOCK", on)
    if plain:
        default_prefetch = Ring.prefetch
        out["p1"] = lambda on: setattr(Ring, "prefetch", 1 if on else default_prefetch)
    return out


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
        prof.export_chrome_trace(os.path.join(out_dir, f"ring_trace_{ring.layout}.json"))
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
        lines.append(f"== {ring.layout} {name}: wall {wall * 1e3:.2f} ms, GPU kernel time {gpu:.2f} ms ==")
        lines.append(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
        lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ring_profile_{ring.layout}_rank{rank}.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if rank == 0:
        print("\n".join(lines[:1] + lines[3:4]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layouts", nargs="+", default=list(FUNCS), choices=list(FUNCS))
    p.add_argument("--doc-len", type=int, default=4096, help="mean document length of the varlen row")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--iters",
        type=int,
        default=1,
        help="calls back to back per timing (as a model's layers run them: the host runs ahead)",
    )
    p.add_argument("--out", default=None, help="folder for ring_nccl_W{world}.csv (and profiles)")
    p.add_argument("--profile", action="store_true", help="also profile one call per layout (CUDA)")
    p.add_argument("--trace", action="store_true", help="rank 0's Chrome trace of one forward (CUDA)")
    p.add_argument(
        "--p2p-high-priority",
        action="store_true",
        help="also time each layout with P2P on a high-priority NCCL group",
    )
    p.add_argument(
        "--p2p-run-ahead",
        action="store_true",
        help="also time each layout with K/V posts that do not wait for the previous step's kernels",
    )
    p.add_argument(
        "--copy-engine",
        action="store_true",
        help='also time each layout with use_ring_transport("copy_engine") (K/V by copy engine)',
    )
    p.add_argument(
        "--plain-ring",
        action="store_true",
        help="also time each layout with use_ring_prefetch(1): the forward holds one K/V block at a time",
    )
    p.add_argument(
        "--split-own",
        action="store_true",
        help="also time each layout with the backward's own block split around the remote steps",
    )
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    if a.tiny:
        a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim, a.reps, a.doc_len = 128, 4, 2, 32, 2, 50
    info, device, dtype, name = start_distributed()
    rank, world = info.rank, info.world_size
    L, Hq, Hk, D = a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim
    S = world * L
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, S, h, D, generator=g).to(device, dtype) for h in (Hq, Hk, Hk, Hq))
    lens = doc_lengths(S, a.doc_len)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    be = backend_for(q)
    scale = D**-0.5

    def full_calls(varlen):
        kw = dict(softmax_scale=scale, causal=True)
        if varlen:
            m = int(max(lens))
            kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m, max_seqlen_k=m)
        qq, kk, vv, dd = (x[0] if varlen else x for x in (q, k, v, dout))

        def fwd():
            return be.attn_fwd(qq, kk, vv, **kw)

        def fb():
            out, lse = fwd()
            be.attn_bwd(dd, qq, kk, vv, out, lse, **kw)

        return fwd, fb

    if rank == 0:
        head = f"# ring over {world} x {name}, {info.backend}; torch {torch.__version__}; causal, "
        print(head + f"Hq={Hq} Hk={Hk} D={D} {dtype}, {L} tokens per rank (S={S})")
        print(f"# varlen: {len(lens)} documents of mean {S / len(lens):.0f} tokens ([1, {2 * a.doc_len}))")
        cols = f"{'ms':>8} {'TFLOP/s/GPU':>11} {'eff':>5}"
        print(f"{'layout':>10} | {'full fwd ms':>11} {'full f+b ms':>11} | fwd {cols} | fwd+bwd {cols}")
    rows = []
    full_times = {}
    nccl = info.backend == "nccl"
    variants = p2p_variants(
        a.p2p_high_priority and nccl,
        a.p2p_run_ahead and nccl,
        a.copy_engine and nccl,
        a.plain_ring,
        a.split_own,
    )
    runs = [(layout, "") for layout in a.layouts] + [(lay, v) for v in variants for lay in a.layouts]
    reference = {}
    for layout, variant in runs:
        for suffix, install in variants.items():  # not `v`: the closures above read the tensor v
            install(suffix == variant)
        name_row = layout + (f"+{variant}" if variant else "")
        varlen = layout == "varlen"
        if varlen not in full_times:
            fwd, fb = full_calls(varlen)
            full_times[varlen] = (
                dist_median_time(fwd, device, a.reps, a.iters),
                dist_median_time(fb, device, a.reps, a.iters),
            )
        t_full, t_full_fb = full_times[varlen]
        flops = 4 * (causal_pairs(lens) if varlen else S * S // 2) * Hq * D
        ring = Ring(layout, (q, k, v, dout), cu, world)
        t_r, t_rfb = (
            dist_median_time(ring.fwd, device, a.reps, a.iters),
            dist_median_time(ring.fwd_bwd, device, a.reps, a.iters),
        )
        row = dict(
            world=world, layout=name_row, S=S, full_fwd_ms=t_full * 1e3, full_fb_ms=t_full_fb * 1e3,
            fwd_ms=t_r * 1e3, fwd_tflops_per_gpu=flops / world / t_r / 1e12, fwd_eff=t_full / (world * t_r),
            fb_ms=t_rfb * 1e3, fb_tflops_per_gpu=3.5 * flops / world / t_rfb / 1e12,
            fb_eff=t_full_fb / (world * t_rfb),
        )  # fmt: skip
        rows.append(row)
        if rank == 0:
            fwd = _cells(t_r, flops / world, t_full / world)
            fb = _cells(t_rfb, 3.5 * flops / world, t_full_fb / world)
            print(
                f"{name_row:>10} | {t_full * 1e3:>11.2f} {t_full_fb * 1e3:>11.2f} | fwd {fwd} | fwd+bwd {fb}"
            )
        got = ring.check_outputs()
        if not variant:
            reference[layout] = got
        elif variant in ("p1", "ce", "so"):  # float32 sums in another order: equal up to rounding
            pairs = zip(got, reference[layout], strict=True)
            diff = max((x.float() - y.float()).abs().max().item() for x, y in pairs)
            print(f"{'':>10}   rank {rank}: {name_row} largest difference from the default: {diff:.2e}")
        else:
            same = all(torch.equal(x, y) for x, y in zip(got, reference[layout], strict=True))
            print(
                f"{'':>10}   rank {rank}: {name_row} outputs and gradients equal to the default P2P: {same}"
            )
        if device.type == "cuda" and not variant:
            if a.profile:
                _profile(ring, rank, a.out or ".")
            if a.trace:
                _trace(ring, a.out or ".")
    if rank == 0 and a.out:
        write_csv(os.path.join(a.out, f"ring_nccl_W{world}.csv"), rows)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
