"""Benchmark: ringflash Triton attention vs torch SDPA (FlashAttention-2 and cuDNN backends).

bf16, head dims 64 and 128, causal and not, seqlen 1k/4k/16k with batch * seqlen = 16k tokens and
2048 / headdim heads. FLOPs (FlashAttention's convention): forward 4 * b * h * s * s * d, halved
for causal; backward 2.5x the forward. Times are ``triton.testing.do_bench`` medians; all
backends are measured in the same run on the same inputs.

Usage: ``python benchmarks/bench_attention.py --out bench_out [--quick]``. Prints the GPU, the
versions and a table to stdout; writes ``attention.csv`` and ``attention.png`` (if matplotlib is
importable) into ``--out``. ``--bwd-only [--dims 128]`` times only the backward (ours and both
SDPA backends, fewer compiles and a shorter run) and checks our gradients against FA2's on the same
inputs (relative L2 error, printed); it writes ``attention_bwd.csv`` / ``attention_bwd_table.txt``.
``--fwd-only`` times the forward only (the backward columns print nan).
``--api`` also times the public ``flash_attn_func`` through autograd (argument checks, dispatch,
its own delta), what a model runs, against the kernels called directly. Every row of the main
table also gives our output's and gradients' relative L2 error against FA2's on the same inputs.
``--tma off`` (or ``on``) runs our kernels under ``ringflash.use_tma``: pointer loads instead of TMA
descriptors (or descriptors at every length); the default is the library's own choice.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os

import torch
import triton
from bench_io import write_csv
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import kernels, use_tma


def _flops(b, h, s, d, causal):
    f = 4 * b * h * s * s * d  # fwd 4bhssd
    return f / 2 if causal else f


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _ours(q, k, v, causal, dout):
    """(fwd, bwd) closures on the kernel interface ([B, S, H, D] layout)."""
    scale = q.shape[-1] ** -0.5

    def fwd():
        return kernels.attn_fwd(q, k, v, softmax_scale=scale, causal=causal)

    out, lse = fwd()

    def bwd():
        return kernels.attn_bwd(dout, q, k, v, out, lse, softmax_scale=scale, causal=causal)

    return fwd, bwd


def _sdpa(q, k, v, causal, dout, backend):
    """SDPA closures; SDPA wants [B, H, S, D]. Backward timed via autograd.grad on a saved graph."""
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dout = dout.transpose(1, 2)

    def bwd():
        dq, dk, dv = torch.autograd.grad(out, (qt, kt, vt), dout, retain_graph=True)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    return fwd, bwd


def _api(q, k, v, causal, dout):
    """The public ``flash_attn_func`` (argument checks, dispatch, autograd, its own delta): what a
    model runs."""
    from ringflash import flash_attn_func

    qa, ka, va = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        return flash_attn_func(qa, ka, va, causal=causal)

    out = fwd()

    def bwd():
        return torch.autograd.grad(out, (qa, ka, va), dout, retain_graph=True)

    return fwd, bwd


def _rel_err(got, ref):
    """Largest relative L2 error over (dq, dk, dv); NaN anywhere gives NaN."""
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref, strict=True)]
    return float("nan") if any(e != e for e in errs) else max(errs)


def _exclude(spec):
    """Drop autotune configs by index (kernel:index) before anything is tuned."""
    from ringflash.kernels import bwd, fwd

    tuners = {"fwd": fwd._attn_fwd_tuned, "dkdv": bwd._dkdv_tuned, "dq": bwd._dq_tuned}
    drop = [item.split(":") for item in spec.split(",") if item]
    for name, tuner in tuners.items():
        keep = [c for i, c in enumerate(tuner.configs) if [name, str(i)] not in drop]
        if len(keep) != len(tuner.configs):
            print(f"excluded from {name}: {[str(c) for c in tuner.configs if c not in keep]}")
        tuner.configs = keep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--quick", action="store_true", help="only seqlen 4k")
    ap.add_argument("--exclude", default="", help="autotune configs to drop, e.g. 'fwd:1,dq:3' (diagnosis)")
    ap.add_argument("--bwd-only", action="store_true", help="backward only: ours, fa2, cudnn")
    ap.add_argument("--fwd-only", action="store_true", help="main table without the backward columns")
    ap.add_argument("--dims", default="64,128", help="head dims, e.g. '128'")
    ap.add_argument("--api", action="store_true", help="also time the public flash_attn_func (autograd)")
    ap.add_argument("--tma", choices=["auto", "on", "off"], default="auto", help="ringflash.use_tma mode")
    args = ap.parse_args()
    with use_tma(args.tma):
        if args.bwd_only:
            return main_bwd(args)
        return _main(args)


def _main(args):
    _exclude(args.exclude)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    print(f"{dev} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")
    rows = []
    seqlens = [4096] if args.quick else [1024, 4096, 16384]
    for d in (int(x) for x in args.dims.split(",")):
        for causal in (False, True):
            for s in seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in "qkvo")
                f = _flops(b, h, s, d, causal)
                row = dict(d=d, causal=causal, s=s, b=b, h=h)
                methods = [
                    ("ours", _ours, ()),
                    ("fa2", _sdpa, (SDPBackend.FLASH_ATTENTION,)),
                    ("cudnn", _sdpa, (SDPBackend.CUDNN_ATTENTION,)),
                ]
                if args.api:
                    methods.append(("api", _api, ()))
                checked = {}  # ours and FA2: (out [B, S, H, D], grads) for the error columns
                for name, make, extra in methods:
                    try:
                        fwd, bwd = make(q, k, v, causal, dout, *extra)
                        if name in ("ours", "fa2"):
                            o = fwd()
                            grads = None if args.fwd_only else bwd()
                            checked[name] = (o[0] if isinstance(o, tuple) else o.transpose(1, 2), grads)
                        row[name + "_fwd"] = f / _bench(fwd) * 1e-9
                        row[name + "_bwd"] = float("nan") if args.fwd_only else 2.5 * f / _bench(bwd) * 1e-9
                    except Exception as e:  # a backend missing on this build: report, keep going
                        print(f"{name} d={d} causal={causal} s={s}: {type(e).__name__}: {e}")
                        row[name + "_fwd"] = row[name + "_bwd"] = float("nan")
                ok = len(checked) == 2
                row["err_fwd"] = _rel_err([checked["ours"][0]], [checked["fa2"][0]]) if ok else float("nan")
                ok_bwd = ok and not args.fwd_only
                row["err_bwd"] = _rel_err(checked["ours"][1], checked["fa2"][1]) if ok_bwd else float("nan")
                del checked
                rows.append(row)
                print("measured", {k: round(x, 1) if isinstance(x, float) else x for k, x in row.items()})
                torch.cuda.empty_cache()

    hdr = (
        f"{'D':>4} {'causal':>6} {'S':>6} {'B':>3} {'H':>3} | {'fwd ours':>8} {'fa2':>5} {'cudnn':>5} "
        f"{'/fa2':>5} {'/cudnn':>6} | {'bwd ours':>8} {'fa2':>5} {'cudnn':>5} {'/fa2':>5} {'/cudnn':>6} | "
        f"{'err fwd':>7} {'err bwd':>7}"
    )
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r['d']:>4} {r['causal']!s:>6} {r['s']:>6} {r['b']:>3} {r['h']:>3} | "
            f"{r['ours_fwd']:>8.0f} {r['fa2_fwd']:>5.0f} {r['cudnn_fwd']:>5.0f} "
            f"{r['ours_fwd'] / r['fa2_fwd']:>5.2f} {r['ours_fwd'] / r['cudnn_fwd']:>6.2f} | "
            f"{r['ours_bwd']:>8.0f} {r['fa2_bwd']:>5.0f} {r['cudnn_bwd']:>5.0f} "
            f"{r['ours_bwd'] / r['fa2_bwd']:>5.2f} {r['ours_bwd'] / r['cudnn_bwd']:>6.2f} | "
            f"{r['err_fwd']:>7.1e} {r['err_bwd']:>7.1e}"
        )
    if args.api:
        lines += ["", "public flash_attn_func (autograd) against the kernels called directly (ours):"]
        for r in rows:
            lines.append(
                f"{r['d']:>4} {r['causal']!s:>6} {r['s']:>6} | fwd {r['api_fwd']:>5.0f} TFLOP/s"
                f" ({r['api_fwd'] / r['ours_fwd']:.2f}x ours) | bwd {r['api_bwd']:>5.0f} TFLOP/s"
                f" ({r['api_bwd'] / r['ours_bwd']:.2f}x ours)"
            )
    table = "\n".join(lines)
    print("TFLOP/s (bf16; fwd 4bhssd, /2 causal; bwd 2.5x fwd); err = rel. L2 vs FA2 (out; max of dq/dk/dv)")
    print(table)
    write_csv(os.path.join(args.out, "attention.csv"), rows)
    with open(os.path.join(args.out, "attention_table.txt"), "w") as fh:
        fh.write(f"{dev} | torch {torch.__version__} | triton {triton.__version__}\n{table}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    labels = [f"d{r['d']}{'c' if r['causal'] else ''}-{r['s'] // 1024}k" for r in rows]
    x = range(len(rows))
    for ax, kind in zip(axes, ("fwd", "bwd"), strict=True):
        for i, name in enumerate(("ours", "fa2", "cudnn")):
            ax.bar([xi + (i - 1) * 0.27 for xi in x], [r[f"{name}_{kind}"] for r in rows], 0.27, label=name)
        ax.set_xticks(list(x), labels, rotation=60, fontsize=7)
        ax.set_title(f"{kind} TFLOP/s, {dev}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "attention.png"), dpi=120)
    print(f"plot: {os.path.join(args.out, 'attention.png')}")


def main_bwd(args):
    """Backward only: ours, fa2, cudnn on the same inputs; our gradients' error against FA2's."""
    _exclude(args.exclude)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    print(f"{dev} | torch {torch.__version__} | triton {triton.__version__} | {datetime.date.today()}")
    names = ("ours", "fa2", "cudnn")
    hdr = (
        f"{'D':>4} {'causal':>6} {'S':>6} {'B':>3} {'H':>3} | "
        f"{'ours':>5} {'fa2':>5} {'cudnn':>5} | {'/fa2':>5} {'/cudnn':>6} | {'err':>7}"
    )
    lines = []
    csv_path = os.path.join(args.out, "attention_bwd.csv")
    seqlens = [4096] if args.quick else [1024, 4096, 16384]
    for d in (int(x) for x in args.dims.split(",")):
        for causal in (False, True):
            for s in seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in "qkvo")
                f = 2.5 * _flops(b, h, s, d, causal)  # bwd 2.5x fwd flops
                r = dict(d=d, causal=causal, s=s, b=b, h=h)
                grads = {}
                for name, make, extra in (
                    ("ours", _ours, ()),
                    ("fa2", _sdpa, (SDPBackend.FLASH_ATTENTION,)),
                    ("cudnn", _sdpa, (SDPBackend.CUDNN_ATTENTION,)),
                ):
                    try:
                        _, bwd = make(q, k, v, causal, dout, *extra)
                        grads[name] = bwd()
                        r[name] = f / _bench(bwd) * 1e-9
                    except Exception as e:  # a backend missing on this build: report, keep going
                        print(f"{name} d={d} causal={causal} s={s}: {type(e).__name__}: {e}")
                        r[name] = float("nan")
                ok = "ours" in grads and "fa2" in grads
                r["err"] = _rel_err(grads["ours"], grads["fa2"]) if ok else float("nan")
                del grads
                lines.append(
                    f"{d:>4} {causal!s:>6} {s:>6} {b:>3} {h:>3} | "
                    + " ".join(f"{r[n]:>5.0f}" for n in names)
                    + f" | {r['ours'] / r['fa2']:>5.2f} {r['ours'] / r['cudnn']:>6.2f} | {r['err']:>7.1e}"
                )
                print("measured", lines[-1], flush=True)
                new = not os.path.exists(csv_path)
                with open(csv_path, "a", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(r))
                    if new:
                        w.writeheader()
                    w.writerow(r)
                torch.cuda.empty_cache()
    table = "\n".join([hdr, "-" * len(hdr), *lines])
    print("bwd TFLOP/s (bf16; 2.5 * 4bhssd, /2 causal); err = rel. L2 vs FA2's grads, max of dq/dk/dv")
    print(table)
    with open(os.path.join(args.out, "attention_bwd_table.txt"), "a") as fh:
        fh.write(f"{dev} | torch {torch.__version__} | triton {triton.__version__}\n{table}\n")


if __name__ == "__main__":
    main()
