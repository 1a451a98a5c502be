"""CPU benchmark of the blockwise backend against torch's own scaled_dot_product_attention.

Prints (1) forward and forward+backward time of a float32 causal call, ringflash / SDPA as a
ratio (medians over interleaved repeats, so machine noise hits both alike), and (2) the peak
memory a call adds on top of its inputs at growing sequence lengths, each length measured in a
fresh process from its peak resident set size. FLOPs: fwd 4*b*h*s*s*d, halved for causal.

    python benchmarks/bench_cpu.py                       # 4k timing, memory at 4k/16k/64k
    python benchmarks/bench_cpu.py --seqlen 1024 --memory-seqlens 1024 2048   # quick
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory-seqlens", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--memory-heads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for cpu.csv and cpu.png")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, causal")
    b, s, h, d = 1, args.seqlen, args.heads, args.headdim
    rows = []
    print(f"\ntime: B={b} S={s} H={h} D={d} (median of {args.repeats})")
    print(f"{'pass':<8} {'sdpa s':>8} {'ours s':>8} {'ours/sdpa':>9} {'ours GFLOP/s':>12}")
    for name, t_sdpa, t_ours, flops in time_ratio(b, s, h, d, args.repeats):
        print(f"{name:<8} {t_sdpa:8.3f} {t_ours:8.3f} {t_ours / t_sdpa:9.2f} {flops / t_ours / 1e9:12.1f}")
        rows.append(dict(kind="time", pass_=name, seqlen=s, sdpa=t_sdpa, ours=t_ours, ratio=t_ours / t_sdpa))
    if args.memory_seqlens:
        hm = args.memory_heads
        print(f"\npeak memory added by one call (MiB), B=1 H={hm} D={d}; inputs are 3 x S*H*D*4 bytes")
        print(f"{'S':>7} {'inputs':>8} {'ours fwd':>9} {'ours f+b':>9} {'sdpa fwd':>9} {'sdpa f+b':>9}")
        for sl in args.memory_seqlens:
            inputs = 3 * sl * hm * d * 4 / 2**20
            vals = [peak_memory(w, 1, sl, hm, d, bw) for w in ("ours", "sdpa") for bw in (False, True)]
            print(f"{sl:>7} {inputs:8.1f} " + " ".join(f"{x:9.1f}" for x in vals))
            for (who, passes), mib in zip(
                [(w, p) for w in ("ours", "sdpa") for p in ("fwd", "fwd+bwd")], vals, strict=True
            ):
                row = dict(kind=f"peak MiB {who}", pass_=passes, seqlen=sl, sdpa="", ours="", ratio=mib)
                rows.append(row)
    if args.out:
        _write_out(args.out, rows)


def _write_out(out, rows):
    from bench_io import plot_lines, write_csv

    write_csv(os.path.join(out, "cpu.csv"), rows)
    mem = [r for r in rows if r["kind"].startswith("peak")]
    series = {}
    for r in mem:
        xs, ys = series.setdefault(f"{r['kind'][9:]} {r['pass_']}", ([], []))
        xs.append(r["seqlen"])
        ys.append(r["ratio"])
    if series:
        title = f"peak memory added by one call, torch {torch.__version__} CPU"
        plot_lines(os.path.join(out, "cpu.png"), series, "sequence length", "MiB", title)


if __name__ == "__main__":
    main()
