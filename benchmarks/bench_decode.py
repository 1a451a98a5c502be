"""Benchmark: ringflash split-KV decoding vs torch SDPA (FlashAttention-2 and cuDNN backends).

One decoding step: bf16, 32 query heads / 8 KV heads, head dim 128, one query token per row,
batch 1 and 16, context 4k .. 1M (rows whose caches do not fit are skipped). The work is memory
bound; the bytes are the KV cache read once: ``2 * b * s * hk * d * 2`` (K and V, bf16). Achieved
bandwidth is bytes / time, shown also as a fraction of the device's copy bandwidth (a large
device-to-device copy measured in the same run, counting bytes read plus written).

SDPA gets the same query (length 1) and the same cache in its ``[B, H, S, D]`` layout. With
``enable_gqa=True`` it reads the 8 KV heads as they are when the backend supports that; when it
raises, the K/V heads are expanded (materialised) to 32 and the table says ``expanded`` (then SDPA
reads 4x the bytes counted, which the bandwidth column does not credit).

"unfused" is the same split kernel followed by the combine kernel (two launches; the fused kernel
merges the splits in the last program of each row), timed the same way in the same run.

Also: the step time of a whole decoding step (append one token + attend, causal) at 4k, batch 1,
captured in a CUDA graph and replayed (one fused kernel, and the three-kernel unfused path); and
a one-GPU simulation of the sharded path: the local split-KV time of one of N shards plus the
time of combining N stacked float32 partials (the collective itself is not simulated); and a
model's decoding step: 32 layers, each with its own 4k cache, captured in one graph (per layer).

Times are ``triton.testing.do_bench`` medians (it flushes L2 before every timed call) of CUDA
graph replays: every method (ours, both SDPA backends) is captured once and replayed, so the table
compares GPU time, not Python launch overhead (our launcher is Python; at small contexts its
eager time is host bound, shown in the ``eager`` column). In the table each row's four graphs
are timed in turn for ``TABLE_ROUNDS`` rounds and each column is the median of its rounds, so a
drift of clocks or memory during the row reaches every column alike.

Usage: ``python benchmarks/bench_decode.py --out bench_out [--quick] [--sweep] [--probe]``. Prints
the GPU, versions and a table; writes ``decode.csv`` and ``decode.png`` (if matplotlib is
importable). ``--probe`` only times kernel variants (``VARIANTS``, per batch ``PROBE_SETS``) beside cuDNN.
``--tma on`` runs everything under ``ringflash.use_tma("on")``: the split kernel then reads a contiguous
cache's K/V tiles through TMA descriptors.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import triton
from bench_io import write_csv
from bench_timing import capture, graphed, interleaved_medians, with_setting
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import skip_value_checks, use_tma
from ringflash.decode import flash_attn_with_kvcache
from ringflash.kernels import decode as kdec
from ringflash.kernels import decode_counters as dcount
from ringflash.parallel import sharded_decode as sd

HQ, HK, D = 32, 8, 128
DT = torch.bfloat16
TABLE_ROUNDS = 3  # interleaved rounds per row of the table


def _bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + bytes written)."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB float32
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src), rep=100)
    return 2 * 2**31 / (t * 1e-6) / 1e9


def _bench_graph(fn):
    r = graphed(fn)
    return _bench(r) if r is not None else float("nan")


def kv_bytes(b, s):
    return 2 * b * s * HK * D * 2  # K and V, bf16


def _inputs(b, s):
    q = torch.randn(b, 1, HQ, D, device="cuda", dtype=DT)
    kc = torch.randn(b, s, HK, D, device="cuda", dtype=DT)
    vc = torch.randn(b, s, HK, D, device="cuda", dtype=DT)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    return q, kc, vc, lens


def append_step(s=4096, room=1):
    """A causal decoding step at batch 1 (append one token at ``cache_seqlens``, attend) on a cache
    of ``s`` slots holding ``s - room`` keys: ``(step closure, (q, kc, vc, lens, k, v))``. The
    lengths are not advanced, so repeated steps write the same slot."""
    q, kc, vc, lens = _inputs(1, s)
    lens -= room
    k = torch.randn(1, 1, HK, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)

    def step():
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)

    return step, (q, kc, vc, lens, k, v)


def ours_fn(q, kc, vc, lens, **kw):
    scale = D**-0.5

    def fn():
        return kdec.decode_fwd(q, kc, vc, lens, softmax_scale=scale, **kw)

    return fn


def sdpa_fn(q, kc, vc, backend):
    """SDPA closure and how it read the KV heads ('gqa' or 'expanded'); None if it cannot run."""
    qt = q.transpose(1, 2)
    kt, vt = kc.transpose(1, 2), vc.transpose(1, 2)
    f = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel(backend):
            f(qt, kt, vt, enable_gqa=True)
        torch.cuda.synchronize()

        def fn():
            with sdpa_kernel(backend):
                return f(qt, kt, vt, enable_gqa=True)

        return fn, "gqa"
    except RuntimeError:
        pass
    try:
        g = HQ // HK
        ke, ve = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
        with sdpa_kernel(backend):
            f(qt, ke, ve)
        torch.cuda.synchronize()

        def fn():
            with sdpa_kernel(backend):
                return f(qt, ke, ve)

        return fn, "expanded"
    except (RuntimeError, torch.OutOfMemoryError):
        return None, "n/a"


def check_close(q, kc, vc, lens, out):
    """Relative error of our output against SDPA's math path in float32 on the first row."""
    qt = q[:1].float().transpose(1, 2)
    kt = kc[:1].float().transpose(1, 2).repeat_interleave(HQ // HK, 1)
    vt = vc[:1].float().transpose(1, 2).repeat_interleave(HQ // HK, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return ((out[:1].float() - ref).norm() / ref.norm()).item()


def graph_step_us(s=4096):
    """A whole causal decoding step (append one token, attend) at batch 1, captured and replayed:
    ``(fused us, eager us, unfused us)``. Fused: ``flash_attn_with_kvcache``, one kernel. Unfused:
    the append, split and combine kernels (the path before the fusion), same tiles and splits."""
    step, (q, kc, vc, lens, k, v) = append_step(s)

    def unfused_step():
        kdec.append_kv(kc, vc, k, v, lens)
        return kdec.decode_fwd(
            q, kc, vc, lens, n_new=1, softmax_scale=D**-0.5, causal=True, fuse_combine=False
        )

    unfused_us = _bench_graph(unfused_step)
    eager_out = step()
    replay, out = capture(step)
    assert torch.equal(out, eager_out), "graph replay differs from the eager step"
    return _bench(replay, rep=300), _bench(step, rep=300), unfused_us


def eager_loop_us(s=4096, n=300):
    """Eager causal append+attend steps back to back, as a decoding loop runs them (no L2 flush
    between calls): us per step, ``(values checked, inside skip_value_checks())``. The checked
    call reads ``cache_seqlens`` on the host (one sync per call); the unchecked one does not."""
    step, _ = append_step(s, room=n + 10)

    def loop():
        for _ in range(n):
            step()
        torch.cuda.synchronize()

    def timed():
        loop()  # warm-up
        t0 = time.perf_counter()
        loop()
        return (time.perf_counter() - t0) / n * 1e6

    checked = timed()
    with skip_value_checks():
        unchecked = timed()
    return checked, unchecked


def nocache_rows(contexts=(4096, 32768, 131072)):
    """Decoding without a KV cache (``flash_attn_func`` with one query row, B=1): graph-replayed us
    on the split-KV route and with the route turned off (the plain forward kernel), same inputs."""
    from ringflash import flash_attn_func
    from ringflash.kernels import fwd as kfwd

    rows = []
    for s in contexts:
        q, kc, vc, _ = _inputs(1, s)

        def fn(q=q, kc=kc, vc=vc):
            return flash_attn_func(q, kc, vc, causal=True)

        routed = _bench_graph(fn)
        keep = kfwd._SPLIT_KV_MIN_KEYS
        kfwd._SPLIT_KV_MIN_KEYS = 1 << 62  # route off
        try:
            plain = _bench_graph(fn)
        finally:
            kfwd._SPLIT_KV_MIN_KEYS = keep
        rows.append(dict(ctx=s, split_kv_us=routed, plain_us=plain))
    return rows


def sharded_sim(total=131072, b=1):
    """Per shard count N: local split-KV time on S/N keys, combine time of N partials."""
    rows = []
    for n in (1, 2, 4, 8):
        q, kc, vc, lens = _inputs(b, total // n)
        local = ours_fn(q, kc, vc, lens, out_dtype=torch.float32)
        o, lse = local()
        outs = o[None].expand(n, *o.shape).contiguous()  # what the all_gather delivers
        lses = lse.transpose(1, 2)[None].expand(n, -1, -1, -1).contiguous()
        t_local = _bench_graph(local)
        t_comb = _bench_graph(lambda outs=outs, lses=lses: sd._combine(outs, lses, DT)) if n > 1 else 0.0
        rows.append(dict(shards=n, local_us=t_local, combine_us=t_comb, total_us=t_local + t_comb))
        del q, kc, vc
    return rows


def sweep(bw):
    """Tile and split sweeps at a few shapes (tuning; prints one line per variant)."""
    print("# sweep: B S block_n warps stages splits -> us, GB/s, % copy")
    for b, s in ((1, 4096), (1, 32768), (16, 4096), (16, 32768)):
        q, kc, vc, lens = _inputs(b, s)
        for bn, w, st in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 2)):
            t = _bench_graph(ours_fn(q, kc, vc, lens, block_n=bn, num_warps=w, num_stages=st))
            gbs = kv_bytes(b, s) / (t * 1e-6) / 1e9
            print(
                f"B={b:2d} S={s:7d} bn={bn:3d} w={w} st={st} auto {t:8.1f} us {gbs:6.0f} GB/s {gbs / bw:5.1%}"
            )
        for ns in (1, 2, 4, 8, 16, 32, 64):
            t = _bench_graph(ours_fn(q, kc, vc, lens, num_splits=ns))
            gbs = kv_bytes(b, s) / (t * 1e-6) / 1e9
            print(
                f"B={b:2d} S={s:7d} default tile splits={ns:3d} {t:8.1f} us {gbs:6.0f} GB/s {gbs / bw:5.1%}"
            )
        del q, kc, vc


def layers_step_us(layers=32, s=4096):
    """A decoding step through ``layers`` layers, each with its own cache (B=1, 4k), captured in one
    CUDA graph, as a model's step runs: no L2 flush and no cache left in L2 from the call before
    (32 caches of 16.8 MB), kernels back to back. Per layer, us: ``(ours append+attend, ours attend,
    cuDNN attend)``."""
    steps = [append_step(s) for _ in range(layers)]
    caches = [tensors[:4] for _, tensors in steps]

    def step():
        for layer_step, _ in steps:
            layer_step()

    attend = [ours_fn(q, kc, vc, lens) for q, kc, vc, lens in caches]
    cudnn = [sdpa_fn(q, kc, vc, SDPBackend.CUDNN_ATTENTION)[0] for q, kc, vc, lens in caches]
    out = []
    for fns in ([step], attend, cudnn):
        if any(f is None for f in fns):
            out.append(float("nan"))
            continue
        out.append(_bench(graphed(lambda fns=fns: [f() for f in fns])) / layers)
    return tuple(out)


def _bench_clean_flush(fn, reps=100):
    """Median us of ``fn`` after an L2 flush that only reads (``do_bench`` zeroes a 256 MB buffer,
    which leaves L2 full of dirty lines that the timed call then pays to write back)."""
    buf = torch.empty(2**26, dtype=torch.float32, device="cuda").normal_()  # 256 MB
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(5):
        fn()
    for i in range(reps):
        buf.sum()
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(start, end, strict=True)) * 1e3


def bandwidth_rows(bw, contexts=(16384, 32768), budget=2.5e9):
    """B=1 at ``contexts``, three ways per method (graph-replayed, us): ``flush`` = the main table's
    zeroing flush; ``clean`` = a read-only flush (nothing of the cache in L2, no dirty lines);
    ``layers`` = one layer of a model's step: ``n`` caches attended back to back in one graph
    (``n * KV bytes`` about ``budget``: none in L2 from the call before), per layer."""
    rows = []
    for s in contexts:
        n = max(2, int(budget // kv_bytes(1, s)))
        caches = [_inputs(1, s) for _ in range(n)]
        row = dict(ctx=s, layers=n)
        for tag, make in (
            ("ours", lambda c: ours_fn(*c)),
            ("cudnn", lambda c: sdpa_fn(*c[:3], SDPBackend.CUDNN_ATTENTION)[0]),
        ):
            fns = [make(c) for c in caches]
            one = graphed(fns[0])
            row[f"{tag}_flush"] = _bench(one)
            row[f"{tag}_clean"] = _bench_clean_flush(one)
            row[f"{tag}_layers"] = _bench(graphed(lambda fns=fns: [f() for f in fns])) / n
        for k in [k for k in row if k.startswith(("ours_", "cudnn_"))]:
            row[k + "_frac"] = kv_bytes(1, s) / (row[k] * 1e-6) / 1e9 / bw
        rows.append(row)
        del caches, fns
        torch.cuda.empty_cache()
    return rows


def step_flush_us(s=4096):
    """The 4k causal append + attend step (B=1) in its own graph, under the zeroing flush and the
    read-only flush: ``(zeroing us, read-only us)``."""
    replay = graphed(append_step(s)[0])
    return _bench(replay, rep=300), _bench_clean_flush(replay, reps=300)


def print_bandwidth(rows, bw, step=None):
    print(f"\n## B=1 bandwidth, three timings (us and % of copy {bw:.0f} GB/s); see bandwidth_rows")
    print("     S layers | ours flush  clean layers | cudnn flush  clean layers")
    for r in rows:
        cells = []
        for tag in ("ours", "cudnn"):
            cells.append(
                " ".join(
                    f"{r[f'{tag}_{m}']:6.1f} {r[f'{tag}_{m}_frac']:4.0%}"
                    for m in ("flush", "clean", "layers")
                )
            )
        print(f"{r['ctx']:6d} {r['layers']:6d} | " + " | ".join(cells))
    if step is not None:
        print(f"## 4k causal append + attend step, own graph: {step[0]:.1f} us (zeroing flush),", end="")
        print(f" {step[1]:.1f} us (read-only flush)")


def host_profile(s=4096, n=2000, top=25):
    """Where an eager decoding step's host time goes: ``cProfile`` over ``n`` causal append +
    attend steps inside ``skip_value_checks()`` (B=1, 4k), the ``top`` functions by own time."""
    import cProfile
    import pstats

    step, _ = append_step(s, room=10)

    def loop(steps):
        for _ in range(steps):
            step()  # the same slot each step: the host path is profiled, not the cache growing

    with skip_value_checks():
        loop(200)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        loop(n)
        prof.disable()
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
    print(f"# eager step host time under cProfile: {host:.1f} us per step ({n} steps); top by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


# Kernel variants for --probe: name -> (use_tma mode, decode_fwd overrides; "set": module
# attributes held while the calls run; "splits_x": that many times the default splits). "memset"
# captures with no arena (decode_counters.py): each call's counters zeroed in the graph. Tried
# before and no better on an H100 (RESULTS.md): TMA with 4 stages, evict_first, 5 stages, 2 warps.
VARIANTS = {
    "ptr": ("off", {}),
    "memset": ("off", dict(set=((dcount, "_arenas", {}), (dcount, "ARENA_MAX_COUNTERS", 0)))),
    "unfused": ("off", dict(fuse_combine=False)),
    "tma": ("on", {}),
    "2xsplits": ("off", dict(splits_x=2)),
    "st4": ("off", dict(num_stages=4)),
    "bn128 w8": ("off", dict(block_n=128, num_warps=8)),
    "bn128 w4": ("off", dict(block_n=128, num_warps=4)),
    "bn128 w4 st2": ("off", dict(block_n=128, num_warps=4, num_stages=2)),
    "pdl": ("off", dict(set=((kdec, "USE_PDL", True),))),
    "nopdl": ("off", dict(set=((kdec, "USE_PDL", False),))),
    # pfN: N key rows of split 0 prefetched into L2 (pf0: none).
    **{f"pf{rows}": ("off", dict(set=((kdec, "PREFETCH_ROWS", rows),))) for rows in (0, 32, 64, 128, 256)},
}
# The default set per --probe-batch (batch 16 runs one split per KV head: 128 programs).
PROBE_SETS = {
    1: ("nopdl", "pdl", "unfused", "bn128 w4"),
    16: ("nopdl", "pdl", "bn128 w4", "st4"),
}
PROBE_SET_OTHER = ("nopdl", "pdl", "bn128 w4")


def _per_call(replay, calls):
    """A measure for ``interleaved_medians``: us per call of a graph replay that makes ``calls``
    (nan for a variant that did not build)."""
    if replay is None:
        return lambda: float("nan")
    return lambda: _bench(replay) / calls


def variant_probe(contexts=(4096, 16384, 32768), rounds=3, budget=2.5e9, batch=1, names=None):
    """Graph-replayed us of kernel variants (``names`` of ``VARIANTS``, default the batch's
    ``PROBE_SETS`` entry: pointer loads or TMA descriptors, tiles, split counts) beside cuDNN, two
    timings each: ``flush`` (one cache, zeroing flush) and ``layers`` (caches of about ``budget``
    bytes attended back to back in one graph, per call). Interleaved over ``rounds`` rounds
    (medians), so clock drift hits every column alike."""
    names = list(names or PROBE_SETS.get(batch, PROBE_SET_OTHER))
    variants = [(n, *VARIANTS[n]) for n in names]
    names.append("cudnn")
    print(f"# variant probe, B={batch}, us (median of rounds), flush / layers:")
    print("#        " + " ".join(f"{n:>15}" for n in names))
    for s in contexts:
        n = max(2, int(budget // kv_bytes(batch, s)))
        caches = [_inputs(batch, s) for _ in range(n)]
        auto = kdec.pick_num_splits(batch, HK, HQ // HK, 1, s, caches[0][0].device)
        replays = []
        for vname, mode, kw in variants:
            kw = dict(kw)
            sets = kw.pop("set", ())
            if "splits_x" in kw:
                kw["num_splits"] = auto * kw.pop("splits_x")
            with use_tma(mode):
                fns = [ours_fn(*c, **kw) for c in caches]
                one, many = fns[0], lambda fns=fns: [f() for f in fns]
                for mod, name, value in sets:  # held while each call runs, the capture's included
                    one, many = with_setting(mod, name, value, one), with_setting(mod, name, value, many)
                try:
                    replays.append((graphed(one), graphed(many)))
                except Exception as e:  # e.g. a tile past the shared memory: its column reads nan
                    print(f"# {vname}: {type(e).__name__}: {str(e)[:200]}")
                    replays.append((None, None))
        fns = [sdpa_fn(*c[:3], SDPBackend.CUDNN_ATTENTION)[0] for c in caches]
        replays.append((graphed(fns[0]), graphed(lambda fns=fns: [f() for f in fns])))
        # Per variant, in turn: one cache under the flush, then per call of the layers' graph.
        measures = [_per_call(r, calls) for one, many in replays for r, calls in ((one, 1), (many, n))]
        med = interleaved_medians(measures, rounds)
        cells = " ".join(f"{a:7.1f}/{b:7.1f}" for a, b in zip(med[::2], med[1::2], strict=True))
        print(f"S={s:6d} {cells}  (splits {auto}, {n} caches)")
        del caches, fns, replays
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="contexts 4k and 32k only")
    ap.add_argument("--sweep", action="store_true", help="also sweep tiles and split counts")
    ap.add_argument("--probe", action="store_true", help="only: kernel variants, 4k-32k (batch 1) or 4k-16k")
    ap.add_argument("--probe-batch", type=int, default=1, help="--probe's batch")
    ap.add_argument("--variants", help="--probe's variants, comma-separated names of VARIANTS")
    ap.add_argument("--probe-contexts", help="--probe's contexts, comma-separated (default 4k-32k or 4k-16k)")
    ap.add_argument(
        "--pdl", choices=["on", "off"], help="split kernel by programmatic dependent launch (default USE_PDL)"
    )
    ap.add_argument("--bandwidth", action="store_true", help="only: B=1 16k/32k with three timings")
    ap.add_argument("--host-profile", action="store_true", help="only: cProfile of eager 4k steps")
    ap.add_argument(
        "--tma",
        choices=["auto", "on", "off"],
        default="auto",
        help="ringflash.use_tma mode (decoding uses TMA descriptors for the cache only under 'on')",
    )
    args = ap.parse_args()
    if args.pdl:
        kdec.USE_PDL = args.pdl == "on"
    with use_tma(args.tma):
        _main(args)


def _main(args):
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name()
    print(
        f"{name} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}", end=""
    )
    print(f" | use_tma {args.tma} | pdl {kdec.USE_PDL}")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (2 GiB device-to-device, read + write)")
    if args.sweep:
        sweep(bw)
    if args.probe:
        ctxs = (4096, 16384) if args.probe_batch > 1 else (4096, 16384, 32768)
        if args.probe_contexts:
            ctxs = tuple(int(c) for c in args.probe_contexts.split(","))
        names = args.variants.split(",") if args.variants else None
        variant_probe(ctxs, batch=args.probe_batch, names=names)
        return
    if args.bandwidth:
        print_bandwidth(bandwidth_rows(bw), bw, step_flush_us())
        return
    if args.host_profile:
        host_profile()
        return
    free = torch.cuda.mem_get_info()[0]
    ctxs = [4096, 32768] if args.quick else [4096, 16384, 32768, 131072, 262144, 1048576]
    rows = []
    for b in (1, 16):
        for s in ctxs:
            nbytes = kv_bytes(b, s)
            if 2.5 * nbytes > free:  # our cache + SDPA's expanded copy, if it needs one
                print(f"skip B={b} S={s}: {nbytes / 1e9:.1f} GB of KV does not fit")
                continue
            q, kc, vc, lens = _inputs(b, s)
            fn = ours_fn(q, kc, vc, lens)
            err = check_close(q, kc, vc, lens, fn()[0])
            row = dict(batch=b, ctx=s, kv_mb=nbytes / 1e6, floor_us=nbytes / (bw * 1e3), rel_err=err)
            replays = {"ours": graphed(fn), "unfused": graphed(ours_fn(q, kc, vc, lens, fuse_combine=False))}
            for tag, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                sfn, row[f"{tag}_kv"] = sdpa_fn(q, kc, vc, be)
                replays[tag] = graphed(sfn) if sfn is not None else None
            # Every column timed once per round, in turn (medians of TABLE_ROUNDS rounds): clock
            # and memory drift over the row then hits ours and SDPA's alike.
            med = interleaved_medians([_per_call(r, 1) for r in replays.values()], TABLE_ROUNDS)
            for tag, us in zip(replays, med, strict=True):
                row[f"{tag}_us"] = us
            row["ours_eager_us"] = _bench(fn)
            row["splits"] = kdec.pick_num_splits(b, HK, HQ // HK, 1, s, q.device)
            row["block_n"] = kdec.pick_block_n(row["splits"] * b * HK, s // row["splits"], D * 2, q.device)
            del replays
            for tag in ("ours", "flash", "cudnn"):
                row[f"{tag}_gbs"] = nbytes / (row[f"{tag}_us"] * 1e-6) / 1e9
                row[f"{tag}_frac"] = row[f"{tag}_gbs"] / bw
            row["vs_cudnn"] = row["cudnn_us"] / row["ours_us"]
            rows.append(row)
            del q, kc, vc, lens, fn
            torch.cuda.empty_cache()

    g_us, e_us, u_us = graph_step_us()
    layer_us = layers_step_us()
    loop_checked, loop_unchecked = eager_loop_us()
    shard_rows = sharded_sim()
    nocache = nocache_rows()
    write_csv(os.path.join(args.out, "decode.csv"), rows)
    _plot(rows, bw, args.out)

    print("\n## sharded decode, one-GPU simulation (B=1, 128k total context, graph-replayed; no collective)")
    for r in shard_rows:
        print(
            f"shards={r['shards']}  local {r['local_us']:7.1f} us  combine {r['combine_us']:6.1f} us"
            f"  total {r['total_us']:7.1f} us"
        )
    print(
        f"\n## CUDA graph: causal append+attend step, B=1, 4k: {g_us:.1f} us replayed ({e_us:.1f} us eager);"
        f" unfused (append, split, combine kernels) {u_us:.1f} us replayed"
    )
    print(
        "## 32 layers' decoding steps in one CUDA graph (B=1, 4k each), us per layer: ours append+attend"
        " {:.1f}, ours attend {:.1f}, cuDNN attend {:.1f}".format(*layer_us)
    )
    print(
        f"## eager steps back to back (no flush), B=1, 4k: {loop_checked:.1f} us per step with value checks,"
        f" {loop_unchecked:.1f} us inside skip_value_checks()"
    )
    print("\n## decoding without a KV cache: flash_attn_func, B=1, one query row, causal (graph-replayed)")
    for r in nocache:
        print(
            f"ctx {r['ctx']:>7}: split-KV route {r['split_kv_us']:7.1f} us, plain forward kernel"
            f" {r['plain_us']:7.1f} us ({r['plain_us'] / r['split_kv_us']:.2f}x)"
        )
    print(f"\n## decode, {name}, bf16, Hq={HQ} Hk={HK} D={D}, copy {bw:.0f} GB/s")
    print(
        "  B      S   KV MB floor us | ours us  GB/s  %copy splits tile eager unfused | flash us  %copy"
        " | cudnn us  %copy | vs cudnn | rel err"
    )
    for r in rows:
        print(
            f"{r['batch']:3d} {r['ctx']:7d} {r['kv_mb']:7.1f} {r['floor_us']:8.1f} |"
            f" {r['ours_us']:7.1f} {r['ours_gbs']:5.0f} {r['ours_frac']:6.1%}"
            f" {r['splits']:6d} {r['block_n']:4d} {r['ours_eager_us']:5.0f} {r['unfused_us']:7.1f} |"
            f" {r['flash_us']:8.1f} {r['flash_frac']:6.1%} | {r['cudnn_us']:8.1f} {r['cudnn_frac']:6.1%}"
            f" | {r['vs_cudnn']:7.2f}x | {r['rel_err']:.1e}  (sdpa kv: {r['flash_kv']}/{r['cudnn_kv']})"
        )


def _plot(rows, bw, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for b, style in ((1, "-"), (16, "--")):
        sel = [r for r in rows if r["batch"] == b]
        for tag in ("ours", "flash", "cudnn"):
            ax.plot(
                [r["ctx"] for r in sel],
                [r[f"{tag}_frac"] for r in sel],
                style,
                marker="o",
                label=f"{tag} B={b}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"fraction of copy bandwidth ({bw:.0f} GB/s)")
    ax.set_title("decode, bf16, 32 q heads / 8 kv heads, d=128")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "decode.png"), dpi=120)


if __name__ == "__main__":
    main()
