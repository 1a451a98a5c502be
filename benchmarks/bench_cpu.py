"""CPU benchmark of the blockwise backend against torch's own scaled_dot_product_attention.

Prints (1) forward and forward+backward time of a float32 causal call, ringflash / SDPA as a
ratio (medians over interleaved repeats, so machine noise hits both alike), (2) one decoding
step (``flash_attn_with_kvcache``, one query token over a full cache, Llama-3-8B's 32 query / 8
KV heads of 128) against SDPA with ``enable_gqa``, likewise, and (3) the peak memory a call adds
on top of its inputs at growing sequence lengths, each length measured in a fresh process from
its peak resident set size. FLOPs: fwd 4*b*h*s*s*d, halved for causal.

Writes ``cpu.csv`` and ``cpu.png`` (peak memory against the sequence length) into ``--out``.

    python benchmarks/bench_cpu.py --out DIR             # 4k timing, memory at 4k/16k/64k
    python benchmarks/bench_cpu.py --tiny --out DIR      # 512 tokens (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from bench_timing import add_common_args, format_table, header, plot_lines, run_info, write_csv


def _inputs(b, s, h, d, grad):
    return [torch.randn(b, s, h, d, requires_grad=grad) for _ in range(3)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )


def _ours(q, k, v):
    import ringflash

    return ringflash.flash_attn_func(q, k, v, causal=True)


def _once(fn, q, k, v, backward):
    t0 = time.perf_counter()
    out = fn(q, k, v)
    if backward:
        out.sum().backward()
    return time.perf_counter() - t0


def time_ratio(b, s, h, d, repeats):
    q, k, v = _inputs(b, s, h, d, grad=True)
    rows = []
    for backward in (False, True):
        for fn in (_sdpa, _ours):
            _once(fn, q, k, v, backward)  # warm-up
        ts = {"sdpa": [], "ours": []}
        for _ in range(repeats):
            ts["sdpa"].append(_once(_sdpa, q, k, v, backward))
            ts["ours"].append(_once(_ours, q, k, v, backward))
        med = {n: statistics.median(t) for n, t in ts.items()}
        flops = 4 * b * h * s * s * d / 2 * (3.5 if backward else 1.0)
        rows.append(("fwd+bwd" if backward else "fwd", med["sdpa"], med["ours"], flops))
    return rows


DECODE_SHAPES = ((1, 4096), (1, 32768), (8, 4096))  # (batch, cache tokens)


def _decode_calls(b, s):
    """SDPA's and our decoding step over a full cache of ``s`` tokens per row, batch ``b``."""
    import ringflash

    q = torch.randn(b, 1, 32, 128)
    k_cache, v_cache = torch.randn(b, s, 8, 128), torch.randn(b, s, 8, 128)
    lens = torch.full((b,), s, dtype=torch.int32)
    qh, kh, vh = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True),
        "ours": lambda: ringflash.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens),
    }


def decode_ratio(shapes, repeats):
    """Median seconds of one decoding step, SDPA's and ours, per ``(batch, cache tokens)``."""
    rows = []
    for b, s in shapes:
        calls = _decode_calls(b, s)
        for fn in calls.values():  # warm-up
            fn()
        ts = {n: [] for n in calls}
        for _ in range(repeats):
            for n, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                ts[n].append(time.perf_counter() - t0)
        rows.append((b, s, statistics.median(ts["sdpa"]), statistics.median(ts["ours"])))
    return rows


def _peak_child(which, b, s, h, d, backward):
    """Run in a fresh process: peak resident memory added by one call, in MiB (Linux)."""
    q, k, v = _inputs(b, s, h, d, grad=backward)
    fn = _ours if which == "ours" else _sdpa
    small = [t[:, :64].detach().requires_grad_(backward) for t in (q, k, v)]
    out = fn(*small)  # load code paths and thread pools before the baseline
    if backward:
        out.sum().backward()
    del out
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    out = fn(q, k, v)
    if backward:
        out.sum().backward()
    return (_status_kib("VmHWM") - base) / 1024


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(which, b, s, h, d, backward):
    """Peak resident memory of one call, measured in a fresh process (this script's folder on its
    path, wherever the command runs from); the child's own error is shown if it fails."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys, json; sys.path.insert(0, {here!r}); import bench_cpu as m; "
        f"print(json.dumps(m._peak_child({which!r}, {b}, {s}, {h}, {d}, {backward})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the memory probe for {which} at S={s} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, tiny="512 tokens, 2 repeats, memory at 512 tokens (a smoke run)")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory-seqlens", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--memory-heads", type=int, default=1)
    ap.add_argument("--no-decode", action="store_true", help="skip the decoding steps")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    decode_shapes = () if args.no_decode else DECODE_SHAPES
    if args.tiny:
        args.seqlen, args.repeats, args.memory_seqlens = 512, 2, [512]
        decode_shapes = () if args.no_decode else ((1, 512),)
    info = run_info("cpu")
    b, s, h, d = 1, args.seqlen, args.heads, args.headdim
    title = f"blockwise backend vs SDPA on CPU, float32, causal; B={b} S={s} H={h} D={d}"
    print(header(title, info=info), flush=True)
    rows = []
    for name, t_sdpa, t_ours, flops in time_ratio(b, s, h, d, args.repeats):
        row = dict(kind="time", pass_=name, seqlen=s, heads=h, sdpa_s=t_sdpa, ours_s=t_ours)
        rows.append(dict(row, ours_per_sdpa=t_ours / t_sdpa, ours_gflops=flops / t_ours / 1e9))
    print(f"\ntime (median of {args.repeats} interleaved repeats):")
    cols = [("pass", "pass_", ""), ("sdpa s", "sdpa_s", ".3f"), ("ours s", "ours_s", ".3f")]
    cols += [("ours/sdpa", "ours_per_sdpa", ".2f"), ("ours GFLOP/s", "ours_gflops", ".1f")]
    print(format_table(rows, cols))
    steps = []
    for bd, sd, t_sdpa, t_ours in decode_ratio(decode_shapes, args.repeats):
        row = dict(kind="decode", batch=bd, seqlen=sd, heads=32, sdpa_s=t_sdpa, ours_s=t_ours)
        steps.append(dict(row, ours_per_sdpa=t_ours / t_sdpa))
    if steps:
        print(f"\none decoding step, 32 q / 8 KV heads of 128, one query token (median of {args.repeats}):")
        cols = [("B", "batch", ""), ("cache", "seqlen", ""), ("sdpa ms", "sdpa_ms", ".2f")]
        cols += [("ours ms", "ours_ms", ".2f"), ("ours/sdpa", "ours_per_sdpa", ".2f")]
        in_ms = [dict(r, sdpa_ms=r["sdpa_s"] * 1e3, ours_ms=r["ours_s"] * 1e3) for r in steps]
        print(format_table(in_ms, cols))
    passes = [(w, t) for w in ("ours", "sdpa") for t in ("fwd", "fwd_bwd")]
    mem = []
    hm = args.memory_heads
    for sl in args.memory_seqlens:
        row = dict(kind="peak MiB", seqlen=sl, heads=hm, inputs_mib=3 * sl * hm * d * 4 / 2**20)
        for who, tag in passes:
            row[f"{who}_{tag}_mib"] = peak_memory(who, 1, sl, hm, d, tag == "fwd_bwd")
        mem.append(row)
    if mem:
        print(f"\npeak memory added by one call (MiB), B=1 H={hm} D={d}; inputs are 3 x S*H*D*4 bytes:")
        cols = [("S", "seqlen", ""), ("inputs", "inputs_mib", ".1f")]
        cols += [(f"{w} {t.replace('_', '+')}", f"{w}_{t}_mib", ".1f") for w, t in passes]
        print(format_table(mem, cols))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "cpu.csv"), rows + steps + mem, info)
    if mem:
        xs = [r["seqlen"] for r in mem]
        series = {f"{w} {t.replace('_', '+')}": (xs, [r[f"{w}_{t}_mib"] for r in mem]) for w, t in passes}
        title = f"peak memory added by one call, {info['device']}, torch {info['torch']}"
        plot_lines(os.path.join(args.out, "cpu.png"), series, "sequence length", "MiB", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
