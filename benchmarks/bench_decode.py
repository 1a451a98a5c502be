"""Decoding on one GPU: ringflash's ``flash_attn_with_kvcache`` against PyTorch SDPA's cuDNN and
FlashAttention-2 backends, measured in the same run on the same caches.

One decoding step: bf16, 32 query / 8 KV heads (Llama-3-8B), head dim 128, one query token per
row, full caches; batch 1 and 16, contexts 4k to 1M (rows whose caches do not fit are skipped).
SDPA reads the 8 KV heads with ``enable_gqa=True`` (or, where a backend refuses it, K/V expanded
to 32 heads: the ``kv`` column then says ``expanded`` and SDPA reads 4x the bytes counted).

Per row and method (ours, SDPA cuDNN, SDPA FA2), in one run:

- ``graph us``: a CUDA-graph replay under ``triton.testing.do_bench`` (L2 zeroed before each
  call): GPU time. The methods are timed in turn over ``--rounds`` rounds (medians);
- ``eager us``: the eager call under ``do_bench``: what a step costs when the host is slower
  than the GPU (our eager call checks the cache lengths' values on the device by default, no sync);
- ``host us``: host microseconds per eager call, started on an idle GPU: ``torch.cuda.
  synchronize()``, then ``N`` calls on the host clock (no sync after them); for ours also inside
  ``skip_value_checks()`` and ``use_value_checks("host")`` (one device sync; the eager time too).

Bytes = ``2 * b * s * hk * d * 2`` (K and V read once, bf16); ``% copy`` is bytes / time against
a device-to-device copy in the same run (which reads and writes, so a read-only kernel can pass
100%). ``err``: our output against SDPA's float32 math on the first batch row.

Then a table of whole steps (``--no-steps`` skips it): the causal append + attend step (B=1, 4k)
in its own graph, eagerly and its host time; 32 layers of it in one graph (per layer) beside
cuDNN's attend; eager steps back to back (value checks on / off); and decoding without a cache
(``flash_attn_func`` with one query row, which takes the split-KV route, against the plain forward
kernel ``ringflash.kernels.fwd.attn_fwd`` and cuDNN). ``--bandwidth`` adds B=1 at 16k/32k under
three timings (zeroing flush, read-only flush, caches attended back to back in one graph).

Variants: fields of ``ringflash.kernels.options.DecodeConfig`` given one or more values
(``--block-n 64 128``, ``--num-stages 2 3``, ``--fuse-combine on off``, ``--prefetch-rows 0 64``,
...) and ``--num-splits`` (0: the library's choice) make one row per combination, run under
``ringflash.backends.use_config``; the SDPA columns are measured once per shape.

    python benchmarks/bench_decode.py --out DIR
    python benchmarks/bench_decode.py --batches 16 --contexts 4096 16384 --block-n 64 128 --out DIR
    python benchmarks/bench_decode.py --nvtx 16 4096     # both kernels in NVTX ranges for ncu
    python benchmarks/bench_decode.py --tiny --out DIR   # 4k rows only (smoke run)

Writes ``decode.csv`` and ``decode.png`` into ``--out``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
from bench_timing import (
    add_common_args,
    add_config_args,
    bench_ms,
    clean_flush_us,
    config_variants,
    copy_bandwidth,
    format_table,
    graphed,
    header,
    host_profile,
    host_us,
    interleaved_medians,
    plot_lines,
    ratio,
    run_info,
    tokens,
    write_csv,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import (
    check_device_errors,
    flash_attn_func,
    flash_attn_with_kvcache,
    skip_value_checks,
    use_value_checks,
)
from ringflash.backends import use_config
from ringflash.kernels.decode import pick_num_splits
from ringflash.kernels.fwd import attn_fwd
from ringflash.kernels.options import DecodeConfig

HQ, HK, D = 32, 8, 128
DT = torch.bfloat16
DEVICE = "cuda"
CONFIG_FIELDS = (
    "block_n",
    "num_warps",
    "num_stages",
    "evict",
    "prefetch_rows",
    "fuse_combine",
    "wide_block_n",
    "wide_min_gbps_per_sm",
    "wide_min_keys",
)
STEP_CONTEXT, LAYERS = 4096, 32  # the whole-step rows: a model's decoding step at a 4k context
NOCACHE_CONTEXTS = (4096, 32768, 131072)
SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}


def us(fn) -> float:
    """Median us of ``fn`` under ``do_bench``; NaN for a missing method or a failed capture."""
    return bench_ms(fn, rep=200) * 1e3 if fn is not None else float("nan")


def graph_us(fn) -> float:
    """Median us of ``fn`` replayed from a CUDA graph (NaN when it cannot be captured)."""
    return us(graphed(fn)) if fn is not None else float("nan")


def kv_bytes(b, s) -> int:
    return 2 * b * s * HK * D * 2  # K and V, bf16


def inputs(b, s):
    """``(q [b, 1, HQ, D], k_cache, v_cache [b, s, HK, D], cache_seqlens = s)``."""
    q = torch.randn(b, 1, HQ, D, device=DEVICE, dtype=DT)
    kc = torch.randn(b, s, HK, D, device=DEVICE, dtype=DT)
    vc = torch.randn(b, s, HK, D, device=DEVICE, dtype=DT)
    return q, kc, vc, torch.full((b,), s, dtype=torch.int32, device=DEVICE)


def under(cfg, fn):
    """``fn`` run under ``use_config(cfg)`` (``fn`` itself for the library's defaults)."""
    if cfg is None:
        return fn

    def run():
        with use_config(cfg):
            return fn()

    return run


def ours_fn(q, kc, vc, lens, cfg=None, num_splits=0):
    def fn():
        return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=num_splits)

    return under(cfg, fn)


def sdpa_fn(q, kc, vc, backend):
    """SDPA's attend over the cache and how it read the KV heads (``gqa`` / ``expanded``); ``(None,
    "n/a")`` when the backend cannot run it."""
    f = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    for how in ("gqa", "expanded"):
        try:
            if how == "expanded":
                kt, vt = (x.repeat_interleave(HQ // HK, 1) for x in (kt, vt))

            def fn(kt=kt, vt=vt, gqa=how == "gqa"):
                with sdpa_kernel(backend):
                    return f(qt, kt, vt, enable_gqa=gqa)

            fn()
            torch.cuda.synchronize()
            return fn, how
        except (RuntimeError, torch.OutOfMemoryError):
            continue
    return None, "n/a"


def rel_err(q, kc, vc, out) -> float:
    """Our output against SDPA's float32 math on the first batch row."""
    qt = q[:1].float().transpose(1, 2)
    kt, vt = (x[:1].float().transpose(1, 2).repeat_interleave(HQ // HK, 1) for x in (kc, vc))
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return ((out[:1].float() - ref).norm() / ref.norm()).item()


def time_methods(fns: dict, rounds: int, calls: int) -> dict:
    """Per method: ``graph_us`` and ``eager_us`` (each timed in turn over ``rounds`` rounds) and
    ``host_us``; NaN where a method is missing or its capture fails."""
    names = [n for n, fn in fns.items() if fn is not None]
    replays = {n: graphed(fns[n]) for n in names}
    measures = [lambda r=replays[n]: us(r) for n in names]
    measures += [lambda fn=fns[n]: us(fn) for n in names]
    med = interleaved_medians(measures, rounds)
    out = {n: dict(graph_us=med[i], eager_us=med[len(names) + i]) for i, n in enumerate(names)}
    for n in names:
        out[n]["host_us"] = host_us(fns[n], calls)
    return out


def decode_rows(b, s, variants, bw, args) -> list[dict]:
    """One row per variant at batch ``b``, context ``s``: every method's timings."""
    q, kc, vc, lens = inputs(b, s)
    nbytes = kv_bytes(b, s)
    base = dict(section="decode", batch=b, context=s, kv_mb=nbytes / 1e6)
    ours = {label: ours_fn(q, kc, vc, lens, cfg, splits) for label, cfg, splits in variants}
    fns, kv_read = {f"ours:{label}": fn for label, fn in ours.items()}, {}
    for name, backend in SDPA.items():
        fns[name], kv_read[name] = sdpa_fn(q, kc, vc, backend)
    base["kv"] = "/".join(kv_read[n] for n in SDPA)
    times = time_methods(fns, args.rounds, args.host_calls)  # ours and SDPA's in turn, every round
    rows = []
    for label, _, splits in variants:
        fn = ours[label]
        t = times[f"ours:{label}"]
        with skip_value_checks():
            t["host_nocheck_us"] = host_us(fn, args.host_calls)
        with use_value_checks("host"):  # checked on the host: one sync per call
            t["eager_hostcheck_us"] = us(fn)
            t["host_hostcheck_us"] = host_us(fn, args.host_calls)
        check_device_errors()
        if args.host_profile:  # where the eager call's host time goes (printed; not in the table)
            host_profile(fn, f"ours ({label}), B={b}, {tokens(s)}", top=args.host_profile)
            sdpa = fns.get("cudnn")
            if sdpa is not None:
                host_profile(sdpa, f"cuDNN, B={b}, {tokens(s)}", top=args.host_profile)
        row = dict(base, config=label, splits=splits or pick_num_splits(b, HK, HQ // HK, 1, s, q.device))
        for who in ("ours", *SDPA):
            row.update(
                {f"{who}_{k}": v for k, v in times.get(who if who != "ours" else f"ours:{label}", {}).items()}
            )
            row[f"{who}_copy_frac"] = nbytes / (row.get(f"{who}_graph_us", float("nan")) * 1e-6) / 1e9 / bw
        row["vs_cudnn"] = ratio(row.get("cudnn_graph_us"), row["ours_graph_us"])
        row["err"] = rel_err(q, kc, vc, fn())
        rows.append(row)
    return rows


def append_step(s, room=1):
    """A causal decoding step at B=1: append one token at ``cache_seqlens``, attend; the lengths
    are not advanced, so repeated steps write the same slot. ``(step, (q, kc, vc, lens))``."""
    q, kc, vc, lens = inputs(1, s)
    lens -= room
    k = torch.randn(1, 1, HK, D, device=DEVICE, dtype=DT)
    v = torch.randn_like(k)

    def step():
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)

    return step, (q, kc, vc, lens)


def eager_loop_us(step, n) -> float:
    """Eager steps back to back, as a decoding loop runs them (one sync at the end): us per step."""

    def loop():
        for _ in range(n):
            step()
        torch.cuda.synchronize()

    loop()  # warm-up
    t0 = time.perf_counter()
    loop()
    return (time.perf_counter() - t0) / n * 1e6


def step_rows(args) -> list[dict]:
    """Whole steps: the append + attend step, a model's layers in one graph, eager loops, and
    decoding without a cache."""
    s, layers = STEP_CONTEXT, 4 if args.tiny else LAYERS
    rows = []
    step, cache = append_step(s, room=args.loop_steps + 10)
    r = dict(section="step", what=f"append + attend, B=1, {tokens(s)}, own graph")
    r.update(
        ours_graph_us=graph_us(step), ours_eager_us=us(step), ours_host_us=host_us(step, args.host_calls)
    )
    with skip_value_checks():
        r["ours_host_nocheck_us"] = host_us(step, args.host_calls)
    with use_value_checks("host"):
        r["ours_host_hostcheck_us"] = host_us(step, args.host_calls)
    cudnn, _ = sdpa_fn(*cache[:3], SDPBackend.CUDNN_ATTENTION)
    r["cudnn_graph_us"] = graph_us(cudnn)  # attend only: SDPA has no append
    rows.append(r)
    rows.append(
        dict(
            section="loop",
            what=f"eager append + attend steps back to back, B=1, {tokens(s)} (value checks on)",
            ours_eager_us=eager_loop_us(step, args.loop_steps),
        )
    )
    with skip_value_checks():
        us_nocheck = eager_loop_us(step, args.loop_steps)
    rows.append(dict(section="loop", what="the same inside skip_value_checks()", ours_eager_us=us_nocheck))
    with use_value_checks("device"):
        us_device = eager_loop_us(step, args.loop_steps)
    check_device_errors()
    what = 'the same inside use_value_checks("device")'
    rows.append(dict(section="loop", what=what, ours_eager_us=us_device))
    steps = [append_step(s) for _ in range(layers)]
    attends = [ours_fn(*c) for _, c in steps]
    cudnns = [sdpa_fn(*c[:3], SDPBackend.CUDNN_ATTENTION)[0] for _, c in steps]
    per_layer = []
    for fns in ([st for st, _ in steps], attends, cudnns):
        many = None if any(f is None for f in fns) else (lambda fns=fns: [f() for f in fns])
        per_layer.append(graph_us(many) / layers)
    what = f"{layers} layers in one graph, B=1, {tokens(s)} each, per layer"
    rows.append(dict(section="layers", what=what + ": append + attend", ours_graph_us=per_layer[0]))
    rows.append(
        dict(
            section="layers", what=what + ": attend", ours_graph_us=per_layer[1], cudnn_graph_us=per_layer[2]
        )
    )
    del steps, attends, cudnns
    for ctx in NOCACHE_CONTEXTS[:1] if args.tiny else NOCACHE_CONTEXTS:
        q, kc, vc, _ = inputs(1, ctx)
        routed = lambda q=q, kc=kc, vc=vc: flash_attn_func(q, kc, vc)  # noqa: E731
        plain = lambda q=q, kc=kc, vc=vc: attn_fwd(q, kc, vc, softmax_scale=D**-0.5)  # noqa: E731
        cudnn, _ = sdpa_fn(q, kc, vc, SDPBackend.CUDNN_ATTENTION)
        r = dict(section="nocache", what=f"flash_attn_func, one query row, B=1, {tokens(ctx)} keys")
        r.update(
            ours_graph_us=graph_us(routed),
            plain_kernel_graph_us=graph_us(plain),
            cudnn_graph_us=graph_us(cudnn),
        )
        rows.append(r)
    return rows


def bandwidth_rows(bw, contexts=(16384, 32768), budget=2.5e9) -> list[dict]:
    """B=1 at ``contexts``, graph-replayed, three ways: the zeroing flush (the main table's), a
    read-only flush, and ``n`` caches (about ``budget`` bytes) attended back to back in one graph."""
    rows = []
    for s in contexts:
        n = max(2, int(budget // kv_bytes(1, s)))
        caches = [inputs(1, s) for _ in range(n)]
        row = dict(section="bandwidth", context=s, layers=n)
        for who, make in (
            ("ours", lambda c: ours_fn(*c)),
            ("cudnn", lambda c: sdpa_fn(*c[:3], SDPA["cudnn"])[0]),
        ):
            fns = [make(c) for c in caches]
            if any(f is None for f in fns):
                continue
            one = graphed(fns[0])
            many = graphed(lambda fns=fns: [f() for f in fns])
            row.update({f"{who}_flush_us": us(one), f"{who}_clean_us": clean_flush_us(one)})
            row[f"{who}_layers_us"] = us(many) / n
            for k in ("flush", "clean", "layers"):
                row[f"{who}_{k}_copy_frac"] = kv_bytes(1, s) / (row[f"{who}_{k}_us"] * 1e-6) / 1e9 / bw
        rows.append(row)
        del caches
        torch.cuda.empty_cache()
    return rows


def nvtx(batch: int, context: int, reps: int = 2) -> None:
    """Ours, then SDPA cuDNN, each called ``reps`` times inside NVTX ranges named ``profile``:
    ``ncu --nvtx --nvtx-include "profile/" python benchmarks/bench_decode.py --nvtx B S``."""
    q, kc, vc, lens = inputs(batch, context)
    cudnn, how = sdpa_fn(q, kc, vc, SDPA["cudnn"])
    with skip_value_checks():
        for name, fn in (("ours", ours_fn(q, kc, vc, lens)), (f"cudnn ({how})", cudnn)):
            if fn is None:
                continue
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            for _ in range(reps):
                torch.cuda.nvtx.range_push("profile")
                fn()
                torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            print(f"profiled: {name} x {reps}, B={batch}, S={context}")


def _decode_columns(variants: int) -> list:
    cols = [("B", "batch", ""), ("S", "context", ""), ("KV MB", "kv_mb", ".1f")]
    cols += [("config", "config", "")] if variants > 1 else []
    cols += [("splits", "splits", "")]
    cols += [
        ("graph ours", "ours_graph_us", ".1f"),
        ("cuDNN", "cudnn_graph_us", ".1f"),
        ("fa2", "fa2_graph_us", ".1f"),
    ]
    cols += [("% copy", "ours_copy_frac", ".1%"), ("cuDNN/ours", "vs_cudnn", ".3f")]
    cols += [
        ("eager ours", "ours_eager_us", ".1f"),
        ("host-checked", "ours_eager_hostcheck_us", ".1f"),
        ("cuDNN", "cudnn_eager_us", ".1f"),
        ("fa2", "fa2_eager_us", ".1f"),
    ]
    cols += [("host ours", "ours_host_us", ".1f"), ("unchecked", "ours_host_nocheck_us", ".1f")]
    cols += [("host-checked", "ours_host_hostcheck_us", ".1f")]
    cols += [("cuDNN", "cudnn_host_us", ".1f"), ("fa2", "fa2_host_us", ".1f")]
    return cols + [("err", "err", ".1e"), ("SDPA kv cuDNN/fa2", "kv", "")]


STEP_COLUMNS = [
    ("what", "what", ""),
    ("ours graph us", "ours_graph_us", ".1f"),
    ("eager us", "ours_eager_us", ".1f"),
    ("host us", "ours_host_us", ".1f"),
    ("unchecked", "ours_host_nocheck_us", ".1f"),
    ("host-checked", "ours_host_hostcheck_us", ".1f"),
    ("plain kernel graph us", "plain_kernel_graph_us", ".1f"),
    ("cuDNN graph us", "cudnn_graph_us", ".1f"),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, tiny="4k rows and short step sections (a smoke run)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[4096, 16384, 32768, 131072, 262144, 1048576],
        help="cache lengths",
    )
    ap.add_argument(
        "--num-splits", type=int, nargs="+", default=[0], help="splits per KV head (0: the library's)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the graph and eager columns")
    ap.add_argument("--host-calls", type=int, default=50, help="eager calls per host-time reading")
    ap.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="print the N functions where each eager call spends most host time",
    )
    ap.add_argument("--loop-steps", type=int, default=300, help="steps of the eager loops")
    ap.add_argument("--no-steps", action="store_true", help="skip the table of whole steps")
    ap.add_argument("--bandwidth", action="store_true", help="also B=1 16k/32k under three timings")
    ap.add_argument(
        "--nvtx", type=int, nargs=2, metavar=("B", "S"), help="only: both kernels in NVTX ranges (ncu)"
    )
    add_config_args(ap, DecodeConfig, CONFIG_FIELDS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode: needs a CUDA GPU (it compares with SDPA's cuDNN and FA2)", file=sys.stderr)
        return 2
    if args.nvtx:
        nvtx(*args.nvtx)
        return 0
    if args.tiny:
        args.contexts, args.rounds, args.host_calls, args.loop_steps = [4096], 1, 10, 20
    variants = [
        (label if splits == 0 else f"{label},splits={splits}", cfg, splits)
        for (label, cfg), splits in itertools.product(
            config_variants(DecodeConfig, args, CONFIG_FIELDS), args.num_splits
        )
    ]
    info = run_info()
    bw = copy_bandwidth(2**28 if args.tiny else 2**31)
    title = f"decode, bf16, Hq={HQ} Hk={HK} D={D}, one query token; copy {bw:.0f} GB/s"
    print(header(title, info=info), flush=True)
    free = torch.cuda.mem_get_info()[0]
    rows = []
    for b, s in itertools.product(args.batches, args.contexts):
        if 2.5 * kv_bytes(b, s) > free:  # the cache, and SDPA's expanded copy if it needs one
            print(f"# skip B={b} S={s}: {kv_bytes(b, s) / 1e9:.1f} GB of KV does not fit")
            continue
        rows += decode_rows(b, s, variants, bw, args)
        for r in rows[-len(variants) :]:
            got = f"ours {r['ours_graph_us']:.1f} us, cuDNN {r.get('cudnn_graph_us', float('nan')):.1f} us"
            print(f"measured B={b} S={s} {r['config']}: {got}", flush=True)
        torch.cuda.empty_cache()
    steps = [] if args.no_steps else step_rows(args)
    bandwidth = bandwidth_rows(bw) if args.bandwidth else []
    print("\n" + header(title, info=info))
    print("graph / eager: do_bench medians (us); host: host us per eager call from an idle GPU;")
    print("unchecked: host us inside skip_value_checks(); cuDNN/ours: graph time ratio")
    print(format_table(rows, _decode_columns(len(variants))))
    if steps:
        print("\nwhole steps (us):")
        print(format_table(steps, STEP_COLUMNS))
    if bandwidth:
        print(f"\nB=1 bandwidth under three timings (us; fraction of copy {bw:.0f} GB/s):")
        cols = [("S", "context", ""), ("caches", "layers", "")]
        for who in ("ours", "cudnn"):
            for k in ("flush", "clean", "layers"):
                cols += [(f"{who} {k}", f"{who}_{k}_us", ".1f"), ("", f"{who}_{k}_copy_frac", ".0%")]
        print(format_table(bandwidth, cols))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "decode.csv"), rows + steps + bandwidth, info)
    series = {}
    for r in rows:
        for who in ("ours", "cudnn", "fa2"):
            name = f"{who} B={r['batch']}" + (
                f" {r['config']}" if len(variants) > 1 and who == "ours" else ""
            )
            if who != "ours" and r["config"] != variants[0][0]:
                continue
            xs, ys = series.setdefault(name, ([], []))
            xs.append(r["context"])
            ys.append(r[f"{who}_copy_frac"])
    title = f"decode (graph), bf16, 32/8 heads, d 128, {info['device']}"
    plot_lines(
        os.path.join(args.out, "decode.png"),
        series,
        "context (tokens)",
        f"fraction of copy ({bw:.0f} GB/s)",
        title,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
