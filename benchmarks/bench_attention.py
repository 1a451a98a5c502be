"""Attention kernels on one GPU: ringflash's Triton forward and backward against PyTorch SDPA's
FlashAttention-2 and cuDNN backends, measured in the same run on the same inputs.

Rows (bf16):

- head dims 64 and 128, causal and not, 1k / 4k / 16k / 32k tokens per sequence, batch x seqlen
  = 16k tokens (batch 1 from 16k on), 2048 / headdim heads;
- the Llama-3-8B attention shape: 32 query / 8 KV heads (GQA), head dim 128, causal, batch 1,
  8k and 32k tokens (SDPA with ``enable_gqa=True``).

Columns, TFLOP/s (FlashAttention's convention: forward ``4 * b * hq * s * s * d``, halved when
causal; backward 2.5x the forward): ours (``ringflash.kernels.fwd.attn_fwd`` /
``kernels.bwd.attn_bwd``), ``acc`` (the accumulate-mode forward that each ring step runs:
``attn_fwd`` with float32 ``out=`` / ``lse=`` given, merged into in place), FA2 and cuDNN, and
our output's and gradients' relative L2 error against FA2's, and whether three calls of our
backward gave bitwise the same gradients. ``--api`` adds the public ``flash_attn_func`` through
autograd (what a model runs); ``--backends triton cudnn`` the same call under each ringflash
backend (``ringflash.use_backend``), side by side, each with its backward's repeatability: by
default every GPU backend available (``triton``, and ``cudnn`` where PyTorch has cuDNN attention).

Times are ``triton.testing.do_bench`` medians (L2 flushed before each call); with several
variants, or ``--rounds N``, every column of a shape is timed in turn over the rounds (medians), so
clock drift hits ours and SDPA's alike.

Variants: fields of ``ringflash.kernels.options.AttnConfig`` given one or more values
(``--sched-per-sm 0 4`` times head-major against grouped program order; ``--concurrent-dq on off``
the backward's dQ kernel beside dK/dV or after it; ``--concurrent-dq-max-waves``,
``--int64-offsets``) make one row per combination, passed as ``config=`` to the launchers; the
SDPA columns are measured once per shape. ``--tma on|off`` runs ours under ``ringflash.use_tma``.

    python benchmarks/bench_attention.py --out DIR
    python benchmarks/bench_attention.py --dims 128 --seqlens 4096 8192 --sched-per-sm 0 4 --out DIR
    python benchmarks/bench_attention.py --tiny --out DIR        # one small shape (smoke run)
    python benchmarks/bench_attention.py --backends --out DIR    # the kernels and SDPA only
    python benchmarks/bench_attention.py --eager 128 512 2048 --out DIR  # eager prefill calls only
    python benchmarks/bench_attention.py --eager 128 --host-profile 20   # and where their host time goes

Writes ``attention.csv`` and ``attention.png`` into ``--out``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import torch
from bench_timing import (
    add_common_args,
    add_config_args,
    bench_ms,
    config_variants,
    format_table,
    header,
    host_profile,
    host_us,
    interleaved_medians,
    nan_if_fails,
    plot_bars,
    ratio,
    run_info,
    write_csv,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from ringflash import flash_attn_func, flash_attn_varlen_func, use_tma
from ringflash.backends import BACKENDS, use_backend, use_config
from ringflash.cudnn import available as cudnn_available
from ringflash.kernels.bwd import attn_bwd
from ringflash.kernels.fwd import attn_fwd
from ringflash.kernels.options import AttnConfig

CONFIG_FIELDS = ("sched_per_sm", "concurrent_dq", "concurrent_dq_max_waves", "int64_offsets")
TOKENS = 16384  # batch x seqlen of the head-dim rows
DT = torch.bfloat16
DEVICE = "cuda"
SDPA = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    s: int
    hq: int
    hk: int
    d: int
    causal: bool
    label: str = ""

    def fwd_flops(self) -> float:
        f = 4 * self.b * self.hq * self.s * self.s * self.d  # fwd 4bhssd
        return f / 2 if self.causal else f


def shapes(dims, seqlens, gqa_seqlens) -> list[Shape]:
    rows = [
        Shape(max(1, TOKENS // s), s, 2048 // d, 2048 // d, d, causal, f"d{d}")
        for d in dims
        for causal in (False, True)
        for s in seqlens
    ]
    return rows + [Shape(1, s, 32, 8, 128, True, "llama3-8b") for s in gqa_seqlens]


def ours(q, k, v, dout, causal, cfg):
    """(fwd, accumulate-mode fwd, bwd) closures on the kernel launchers, and (out, grads)."""
    kw = dict(softmax_scale=q.shape[-1] ** -0.5, causal=causal, config=cfg)
    out, lse = attn_fwd(q, k, v, **kw)
    # The ring's state: float32 out / lse that each step merges into in place.
    acc_out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_lse = torch.full(lse.shape, float("-inf"), dtype=torch.float32, device=q.device)

    def fwd():
        return attn_fwd(q, k, v, **kw)

    def acc():
        return attn_fwd(q, k, v, out=acc_out, lse=acc_lse, **kw)

    def bwd():
        return attn_bwd(dout, q, k, v, out, lse, **kw)

    return (fwd, acc, bwd), (out, bwd())


def sdpa(q, k, v, dout, causal, backend):
    """SDPA closures (it wants [B, H, S, D]; backward by autograd on a kept graph), and (out, grads)."""
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=causal, enable_gqa=gqa
            )

    out = fwd()
    do = dout.transpose(1, 2)

    def bwd():
        return torch.autograd.grad(out, (qt, kt, vt), do, retain_graph=True)

    grads = [g.transpose(1, 2) for g in bwd()]
    return (fwd, bwd), (out.detach().transpose(1, 2), grads)


def api(q, k, v, dout, causal, cfg, backend=None):
    """The public ``flash_attn_func`` through autograd (checks, dispatch, its own delta), on
    ``backend`` (``ringflash.use_backend``; None: the default one)."""
    qa, ka, va = (x.detach().requires_grad_() for x in (q, k, v))

    def scope():
        stack = contextlib.ExitStack()
        if cfg is not None:  # None: the library's defaults, no config pushed (what a model runs)
            stack.enter_context(use_config(cfg))
        if backend is not None:
            stack.enter_context(use_backend(backend))
        return stack

    def fwd():
        with scope():
            return flash_attn_func(qa, ka, va, causal=causal)

    out = fwd()

    def bwd():
        with scope():
            return torch.autograd.grad(out, (qa, ka, va), dout, retain_graph=True)

    return fwd, bwd


def repeatable(bwd, runs: int = 3) -> bool:
    """Whether ``runs`` calls of a backward give bitwise the same gradients."""
    first = [g.clone() for g in bwd()]
    return all(all(torch.equal(a, b) for a, b in zip(first, bwd(), strict=True)) for _ in range(runs - 1))


def rel_err(got, ref) -> float:
    """Largest relative L2 error over pairs of tensors (NaN anywhere gives NaN)."""
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref, strict=True)]
    return float("nan") if any(e != e for e in errs) else max(errs)


def measure(shape: Shape, variants, args) -> list[dict]:
    """One row per variant: TFLOP/s of each column, SDPA's measured once, all interleaved."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (
        torch.randn(shape.b, shape.s, h, shape.d, generator=g).to(DEVICE, DT)
        for h in (shape.hq, shape.hk, shape.hk, shape.hq)
    )
    passes = ("fwd", "bwd") if args.passes == "both" else (args.passes,)
    fns, checks, repeats = {}, {}, {}
    for label, cfg in variants:
        (fwd, acc, bwd), checks[label] = ours(q, k, v, dout, shape.causal, cfg)
        fns[(label, "ours", "fwd")], fns[(label, "ours", "acc")], fns[(label, "ours", "bwd")] = fwd, acc, bwd
        if args.api:
            fns[(label, "api", "fwd")], fns[(label, "api", "bwd")] = api(q, k, v, dout, shape.causal, cfg)
        for name in args.backends:
            pair = api(q, k, v, dout, shape.causal, cfg, backend=name)
            fns[(label, f"api_{name}", "fwd")], fns[(label, f"api_{name}", "bwd")] = pair
            repeats[(label, name)] = repeatable(pair[1])
    for name, backend in SDPA.items():
        try:
            (fwd, bwd), checks[name] = sdpa(q, k, v, dout, shape.causal, backend)
            fns[("", name, "fwd")], fns[("", name, "bwd")] = fwd, bwd
        except RuntimeError as e:  # a backend missing on this build, or refusing the shape
            print(f"# {name} at {shape}: {str(e).splitlines()[0][:160]}")
    keep = {key: fn for key, fn in fns.items() if key[2] in passes or (key[2] == "acc" and "fwd" in passes)}
    measures = [
        lambda fn=fn, key=key: nan_if_fails(str(key), lambda: bench_ms(fn)) for key, fn in keep.items()
    ]
    ms = dict(zip(keep, interleaved_medians(measures, args.rounds), strict=True))
    fa2 = checks.get("fa2")
    rows = []
    for label, _ in variants:
        row = dict(
            shape=shape.label, d=shape.d, causal=shape.causal, s=shape.s, b=shape.b, hq=shape.hq, hk=shape.hk,
            config=label,
        )  # fmt: skip
        for (lab, who, p), t in ms.items():
            if lab in ("", label):
                flops = shape.fwd_flops() * (2.5 if p == "bwd" else 1.0)
                row[f"{who}_{p}_tflops"] = flops / (t * 1e-3) / 1e12
                row[f"{who}_{p}_ms"] = t
        for who in ("fa2", "cudnn"):
            for p in passes:
                row[f"ours_{p}_vs_{who}"] = ratio(row.get(f"ours_{p}_tflops"), row.get(f"{who}_{p}_tflops"))
        row["acc_vs_plain"] = ratio(row.get("ours_acc_tflops"), row.get("ours_fwd_tflops"))
        row["ours_bwd_repeatable"] = repeatable(fns[(label, "ours", "bwd")])
        for (lab, name), same in repeats.items():
            if lab == label:
                row[f"api_{name}_bwd_repeatable"] = same
        out, grads = checks[label]
        row["err_fwd"] = rel_err([out], [fa2[0]]) if fa2 else float("nan")
        row["err_bwd"] = rel_err(grads, fa2[1]) if fa2 else float("nan")
        rows.append(row)
    return rows


COLUMNS = [(h, k, "") for h, k in (("shape", "shape"), ("D", "d"), ("causal", "causal"), ("S", "s"))]
COLUMNS += [(h, k, "") for h, k in (("B", "b"), ("Hq", "hq"), ("Hk", "hk"), ("config", "config"))]
for _p in ("fwd", "bwd"):
    COLUMNS += [(f"{_p} ours", f"ours_{_p}_tflops", ".0f")]
    COLUMNS += [("acc", "ours_acc_tflops", ".0f")] if _p == "fwd" else []
    COLUMNS += [("fa2", f"fa2_{_p}_tflops", ".0f"), ("cuDNN", f"cudnn_{_p}_tflops", ".0f")]
    COLUMNS += [("/fa2", f"ours_{_p}_vs_fa2", ".2f"), ("/cuDNN", f"ours_{_p}_vs_cudnn", ".2f")]
COLUMNS += [
    ("err fwd", "err_fwd", ".1e"),
    ("err bwd", "err_bwd", ".1e"),
    ("bwd same", "ours_bwd_repeatable", ""),
]


def eager_prefill(seqlens, rounds: int, profile: int = 0) -> list[dict]:
    """Eager inference prefill: ``flash_attn_func`` under ``no_grad`` (a planned call from its
    second signature on) against SDPA's cuDNN call, Llama-3-8B attention (32 q / 8 KV heads, head
    dim 128, causal, bf16, batch 1): ``do_bench`` medians and host microseconds per call; and
    the same tokens as one packed sequence through ``flash_attn_varlen_func`` (its ``cu_seqlens``
    checked on the device, no sync)."""
    return [_eager_row(s, rounds, profile) for s in seqlens]


def _eager_row(s: int, rounds: int, profile: int = 0) -> dict:
    q = torch.randn(1, s, 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, s, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def ours():
        return flash_attn_func(q, k, v, causal=True)

    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")
    qp, kp, vp = q[0], k[0], v[0]  # the packed [T, H, D] rows, made once as a caller holds them

    def packed():
        return flash_attn_varlen_func(qp, kp, vp, cu, cu, s, s, causal=True)

    def cudnn():
        return sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)

    # The backend choice is entered once, outside the timed calls, as a model would.
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        timed = [lambda: bench_ms(ours), lambda: bench_ms(cudnn), lambda: bench_ms(packed)]
        t_ours, t_cudnn, t_packed = interleaved_medians(timed, rounds)
        if profile:  # where the host time goes (printed; not in the table)
            for label, fn in (
                ("flash_attn_func", ours),
                ("flash_attn_varlen_func", packed),
                ("cuDNN", cudnn),
            ):
                host_profile(fn, f"{label}, {s} tokens", top=profile)
        return dict(
            s=s,
            ours_us=t_ours * 1e3,
            cudnn_us=t_cudnn * 1e3,
            cudnn_over_ours=ratio(t_cudnn, t_ours),
            packed_us=t_packed * 1e3,
            ours_host_us=host_us(ours),
            cudnn_host_us=host_us(cudnn),
            packed_host_us=host_us(packed),
        )


EAGER_COLUMNS = [
    ("S", "s", ""),
    ("ours us", "ours_us", ".1f"),
    ("cuDNN us", "cudnn_us", ".1f"),
    ("cuDNN/ours", "cudnn_over_ours", ".2f"),
    ("packed us", "packed_us", ".1f"),
    ("host ours", "ours_host_us", ".1f"),
    ("host cuDNN", "cudnn_host_us", ".1f"),
    ("host packed", "packed_host_us", ".1f"),
]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, tiny="one small shape of each kind (a smoke run)")
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128], help="head dims of the main rows")
    ap.add_argument(
        "--seqlens", type=int, nargs="*", default=[1024, 4096, 16384, 32768], help="(none: GQA rows only)"
    )
    ap.add_argument("--gqa-seqlens", type=int, nargs="*", default=[8192, 32768], help="Llama-3-8B GQA rows")
    ap.add_argument("--passes", choices=["fwd", "bwd", "both"], default="both")
    ap.add_argument("--api", action="store_true", help="also time the public flash_attn_func (autograd)")
    ap.add_argument(
        "--backends",
        nargs="*",
        default=None,
        choices=BACKENDS,
        help="time flash_attn_func under use_backend(NAME) for each (default: every GPU backend "
        "available: triton, and cudnn with PyTorch's cuDNN attention; none when given no name)",
    )
    ap.add_argument(
        "--tma", choices=["auto", "on", "off"], default="auto", help="ringflash.use_tma mode for ours"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 1, 3 with variants)"
    )
    ap.add_argument(
        "--eager",
        type=int,
        nargs="*",
        default=None,
        help="only the eager inference prefill table at these token counts (e.g. 128 512 2048)",
    )
    ap.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="with --eager: print the N functions where each eager call spends most host time",
    )
    add_config_args(ap, AttnConfig, CONFIG_FIELDS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU (it compares with SDPA's FA2 and cuDNN)", file=sys.stderr)
        return 2
    if args.tiny:
        args.dims, args.seqlens, args.gqa_seqlens = [64], [1024], [1024]
    if args.backends is None:
        args.backends = ["triton"] + (["cudnn"] if cudnn_available() else [])
    variants = config_variants(AttnConfig, args, CONFIG_FIELDS)
    args.rounds = args.rounds or (3 if len(variants) > 1 else 1)
    info = run_info()
    if args.eager:
        title = "eager prefill, no grad: Llama-3-8B attention (32 q / 8 KV heads, d 128), causal, bf16, B=1"
        rows = eager_prefill(args.eager, args.rounds, args.host_profile)
        print(header(title, info=info))
        print("us: do_bench medians; host: host us per eager call from an idle GPU")
        print(format_table(rows, EAGER_COLUMNS))
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "eager.csv"), rows, info)
        return 0
    title = f"attention, bf16, TFLOP/s (fwd 4bhssd, /2 causal; bwd 2.5x fwd); use_tma {args.tma}"
    print(header(title, info=info), flush=True)
    rows = []
    with use_tma(args.tma):
        for shape in shapes(args.dims, args.seqlens, args.gqa_seqlens):
            rows += measure(shape, variants, args)
            print("measured", {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()})
            torch.cuda.empty_cache()
    print(header(title, info=info))
    print("acc: the accumulate-mode forward of a ring step (float32 out/lse merged in place)")
    print("err: relative L2 error against FA2 (out; the largest of dq, dk, dv)")
    print("bwd same: three calls of our backward gave bitwise the same gradients")
    print(format_table(rows, COLUMNS))
    if args.api or args.backends:
        print("\npublic flash_attn_func through autograd, TFLOP/s (per backend: use_backend(name)):")
        api_cols = [
            ("shape", "shape", ""),
            ("S", "s", ""),
            ("causal", "causal", ""),
            ("config", "config", ""),
        ]
        for who in (["api"] if args.api else []) + [f"api_{n}" for n in args.backends]:
            name = who.removeprefix("api_") if who != "api" else "default"
            api_cols += [(f"{name} {p}", f"{who}_{p}_tflops", ".0f") for p in ("fwd", "bwd")]
            if who != "api":
                api_cols += [(f"{name} bwd same", f"{who}_bwd_repeatable", "")]
        print("bwd same: three backward calls gave bitwise the same gradients")
        print(format_table(rows, api_cols))
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "attention.csv"), rows, info)
    labels = [f"{r['shape']}{'c' if r['causal'] else ''}-{r['s'] // 1024}k" for r in rows]
    if len(variants) > 1:
        labels = [f"{lab} {r['config']}" for lab, r in zip(labels, rows, strict=True)]
    panels = {
        f"{p} TFLOP/s, {info['device']}": {
            who: [r.get(f"{who}_{p}_tflops", float("nan")) for r in rows] for who in ("ours", "fa2", "cudnn")
        }
        for p in ("fwd", "bwd")
        if any(f"ours_{p}_tflops" in r for r in rows)
    }
    plot_bars(os.path.join(args.out, "attention.png"), labels, panels, "TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
