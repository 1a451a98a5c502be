"""Ring-attention efficiency on one device with the simulated ring (virtual ranks).

For world size ``W`` with ``L`` tokens per rank (sequence ``S = W * L``):

    efficiency = t_full / (W * t_rank)

``t_full``: one attention call over the whole sequence on this device (the same backend).
``t_rank``: the time of the ring (``SimProfile.ring_time``): every virtual rank runs its compute
segments in order, and a segment that starts by receiving a block waits until the rank that sent
it had posted it (a real rank waits for its own peer only; transfers are taken as instantaneous).
The ``lockstep`` columns use instead the sum over ring steps of the slowest rank's segment (as if
all ranks met at every exchange; an upper bound), and ``eff mean`` the mean rank's compute (a lower
bound). Segments are measured by ``run_simulated(profile=True)``:
by default with CUDA events and no sync, so a segment is GPU time while the host runs ahead as on
a real rank (``--timing wall``: host clock with a device sync around each segment, so host launch
time counts too). Communication is not simulated; it is free when it hides
behind compute. Per step and rank the ring moves ``2*B*L*Hk*D*elem`` bytes of K/V (backward:
also ``2*B*L*Hk*D*4`` bytes of float32 dK/dV, plus K/V again) and computes at most
``4*B*L*L*Hq*D`` FLOPs (forward, a full block; causal zigzag steps do half; backward 2.5x), so
the transfer hides when

    2*B*L*Hk*D*elem / BW  <=  c * 4*B*L*L*Hq*D / F    i.e.    L  >=  Hk * elem * F / (2 * c * Hq * BW)

with ``F`` the attention kernel's achieved FLOP/s (measured here), ``BW`` the link bandwidth and
``c`` the fraction of a full block computed per step (1, or 1/2 for causal zigzag / stripe). When
the forward holds ``p`` blocks (``ringflash.use_ring_prefetch``), ``p`` blocks travel during ``p``
steps' compute, the same ratio, except at the start: a rank sends its own block to the next ``p``
ranks during its own block's compute, one step's work (a GPU's links to its peers share its
bandwidth), so the first step needs ``p`` times the bound on ``L``.

The forward holds ``--prefetch`` K/V blocks at once (``ringflash.use_ring_prefetch``; default the
library's): with several values, each gets a row, timed in the same process. Fields of
``ringflash.kernels.options.AttnConfig`` given one or more values (``--concurrent-dq on off``: the
Triton backward's dQ kernel beside dK/dV or after it; ``--sched-per-sm 0 4``: the causal program
order) apply to the whole-sequence call and to the ring alike, under
``ringflash.backends.use_config``; every combination gets a row, interleaved with the others.

Baselines in the same run: the whole-sequence call on this device (``t_full``, the backend the
ring uses) and SDPA's forward on the same sequence. Writes ``ring.csv`` and ``ring.png`` into
``--out``.

    python benchmarks/bench_ring.py --out DIR          # Llama-3-8B attention, 8k tokens per rank
    python benchmarks/bench_ring.py --tiny --out DIR   # a seconds-long smoke run (CPU too)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
from pathlib import Path

import torch
from bench_timing import (
    add_common_args,
    add_config_args,
    bench_ms,
    config_variants,
    format_table,
    header,
    interleaved_medians,
    plot_lines,
    run_info,
    write_csv,
)
from torch.nn import functional

from ringflash import use_ring_prefetch
from ringflash.backends import backend_for, backend_name, use_config
from ringflash.kernels.options import AttnConfig
from ringflash.parallel import shard_for, simulate_ring_attn, simulate_ring_attn_backward

CONFIG_FIELDS = ("sched_per_sm", "concurrent_dq", "concurrent_dq_max_waves")
LINKS = {
    "NVLink4 (H100, ~450 GB/s)": 450e9,
    "PCIe Gen5 x16 (~55 GB/s)": 55e9,
    "InfiniBand NDR (~50 GB/s)": 50e9,
}


def _config(cfg):
    return use_config(cfg) if cfg is not None else contextlib.nullcontext()


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` (``do_bench`` on CUDA, the host clock elsewhere)."""
    return bench_ms(fn, warmup=5, rep=max(25, reps * 10)) / 1e3


def full_times(q, k, v, dout, scale, reps, configs=(None,)):
    """Per config: (fwd, fwd+bwd) seconds of one whole-sequence call of the backend the ring uses,
    and SDPA's fwd as a baseline; with several configs their timings are interleaved."""
    be = backend_for(q)
    kw = dict(softmax_scale=scale, causal=True)

    def fwd():
        return be.attn_fwd(q, k, v, **kw)

    def fwd_bwd():
        out, lse = be.attn_fwd(q, k, v, **kw)
        be.attn_bwd(dout, q, k, v, out, lse, **kw)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa():
        return functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True
        )

    def timed(cfg, fn):
        def run():
            with _config(cfg):
                return _time(fn, q.device, reps)

        return run

    measures = [timed(c, fn) for c in configs for fn in (fwd, fwd_bwd, sdpa)]
    med = interleaved_medians(measures, 1 if len(configs) == 1 else 3)
    return [tuple(med[3 * i : 3 * i + 3]) for i in range(len(configs))]


def _host_ahead(device: torch.device, events: bool) -> None:
    """Queue about 10 ms of GPU work before a timed ring, so the host is ahead of the GPU when the
    ring starts, as it is inside a model's step (the simulator syncs after each ring to read its
    events; without this the first rank's first segment would time the host's launch latency)."""
    if events and device.type == "cuda":
        torch.cuda._sleep(20_000_000)  # cycles: ~10 ms at H100 clocks


def ring_times(q, k, v, dout, world, layout, scale, reps, timing="events", prefetch=None, configs=(None,)):
    """Per config: (fwd, fwd+bwd) seconds of the simulated ring (``SimProfile.ring_time``), and the
    forward's and backward's per-rank profiles (``SimProfile``, medians over the repetitions).

    ``timing``: "events" (CUDA events, GPU time with the host running ahead, as on a real rank) or
    "wall" (host clock with a device sync around each segment: host launch time counts).
    ``prefetch``: K/V blocks each rank's forward holds and computes at once (None: the library's).
    ``configs``: ``AttnConfig`` per variant (None: the library's); the variants' repetitions are
    interleaved, so clock drift hits them alike."""
    sh = lambda x: [shard_for(x, r, world, 1, layout) for r in range(world)]  # noqa: E731
    qs, ks, vs, dos = sh(q), sh(k), sh(v), sh(dout)
    cuda = q.device.type == "cuda"
    events = timing == "events" and cuda
    sync = torch.cuda.synchronize if cuda else None
    kw = dict(softmax_scale=scale, causal=True, profile=True, sync=sync, cuda_events=events)
    pfs, pbs = [[] for _ in configs], [[] for _ in configs]
    for _ in range(reps + 1):  # the first run warms up (kernel compilation)
        for i, cfg in enumerate(configs):
            with _config(cfg), use_ring_prefetch(prefetch) if prefetch else contextlib.nullcontext():
                _host_ahead(q.device, events)
                outs, lses, pf = simulate_ring_attn(qs, ks, vs, layout, **kw)
                _host_ahead(q.device, events)
                *_, pb = simulate_ring_attn_backward(dos, qs, ks, vs, outs, lses, layout, **kw)
            pfs[i].append(pf)
            pbs[i].append(pb)
    res = []
    for pf, pb in zip(pfs, pbs, strict=True):
        fwd, bwd = _median_profile(pf[1:]), _median_profile(pb[1:])
        res.append((fwd.ring_time(), fwd.ring_time() + bwd.ring_time(), fwd, bwd))
    return res


def print_segments(layout, world, fwd):
    """Each rank's forward segments (ms) and, per step, the slowest rank: where imbalance sits."""
    print(f"#   {layout} W={world} forward segments, ms (rank: step 0, 1, ...; * = slowest of its step)")
    n = max(len(s) for s in fwd.segments)
    worst = [
        max(range(world), key=lambda r, i=i: fwd.segments[r][i] if i < len(fwd.segments[r]) else 0.0)
        for i in range(n)
    ]
    for r, segs in enumerate(fwd.segments):
        cells = " ".join(f"{t * 1e3:7.3f}{'*' if worst[i] == r else ' '}" for i, t in enumerate(segs))
        print(f"#   rank {r}: {cells}")


def _median_profile(profiles):
    """Each (rank, segment) time as its median over repetitions: the virtual ranks run one after
    another on one device, so a stray slow segment of one repetition (allocator, clocks) would
    otherwise become the slowest rank of its step."""
    world = len(profiles[0].segments)
    segs = [
        [statistics.median(p.segments[r][i] for p in profiles) for i in range(len(profiles[0].segments[r]))]
        for r in range(world)
    ]
    return type(profiles[0])(segs, profiles[0].after)  # the messages are the same every repetition


COLUMNS = [
    ("layout", "layout", ""),
    ("W", "world", ""),
    ("S", "seqlen", ""),
    ("config", "config", ""),
    ("full fwd ms", "full_fwd_ms", ".3f"),
    ("SDPA fwd ms", "sdpa_fwd_ms", ".3f"),
    ("rank fwd ms", "rank_fwd_ms", ".3f"),
    ("eff fwd", "eff_fwd", ".3f"),
    ("lockstep", "eff_fwd_lockstep", ".3f"),
    ("mean rank", "eff_fwd_mean", ".3f"),
    ("full f+b ms", "full_fwd_bwd_ms", ".3f"),
    ("rank f+b ms", "rank_fwd_bwd_ms", ".3f"),
    ("eff f+b", "eff_fwd_bwd", ".3f"),
    ("lockstep", "eff_fwd_bwd_lockstep", ".3f"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, tiny="tiny CPU-sized shapes (a seconds-long smoke run)")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layouts", nargs="+", default=["zigzag", "stripe", "contiguous"])
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--prefetch",
        type=int,
        nargs="+",
        default=[0],
        help="forward K/V blocks held and computed at once (use_ring_prefetch; 0: the library's; a row each)",
    )
    p.add_argument("--segments", action="store_true", help="print each rank's forward segment times")
    p.add_argument(
        "--timing",
        choices=["events", "wall"],
        default="events",
        help="rank segments: CUDA-event GPU time (default) or synced wall time (host launch time counts)",
    )
    add_config_args(p, AttnConfig, CONFIG_FIELDS)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.tiny:
        a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim, a.reps = 64, 4, 2, 32, 2
        a.worlds = [w for w in a.worlds if w <= 4] or [2]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        dtype, a.dtype = torch.float32, "fp32"  # the CPU backend's speed is a float32 figure
    L, Hq, Hk, D = a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim
    elem = torch.finfo(dtype).bits // 8
    scale = D**-0.5
    variants = config_variants(AttnConfig, a, CONFIG_FIELDS)
    configs = [cfg for _, cfg in variants]
    events = a.timing == "events" and device.type == "cuda"
    info = run_info(device)
    title = (
        f"ring attention, simulated on one device (backend {backend_name(device)}); causal, B=1, Hq={Hq}, "
        f"Hk={Hk}, D={D}, {a.dtype}, {L} tokens per rank; eff = t_full / (W * t_rank); rank segments "
        + ("by CUDA events (GPU time)" if events else "by the synced wall clock")
    )
    print(header(title, info=info), flush=True)
    rows = []
    fwd_flops_rate = None
    for world in a.worlds:
        S = world * L
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, dout = (
            torch.randn(1, S, h, D, generator=g).to(device=device, dtype=dtype) for h in (Hq, Hk, Hk, Hq)
        )
        fulls = full_times(q, k, v, dout, scale, a.reps, configs)
        fwd_flops_rate = 4 * S * S * Hq * D / 2 / fulls[0][0]  # causal: half the block
        for layout, pre in itertools.product(a.layouts, a.prefetch):
            rings = ring_times(q, k, v, dout, world, layout, scale, a.reps, a.timing, pre, configs)
            for (label, _), (t_full, t_full_fb, t_sdpa), (t_rank, t_rank_fb, prof, prof_b) in zip(
                variants, fulls, rings, strict=True
            ):
                t_mean = sum(prof.rank_time(r) for r in range(world)) / world
                t_lock, t_lock_fb = prof.lockstep_time(), prof.lockstep_time() + prof_b.lockstep_time()
                row = dict(
                    layout=layout if pre == 0 else f"{layout}/p{pre}",
                    world=world,
                    seqlen=S,
                    config=label,
                    full_fwd_ms=t_full * 1e3,
                    sdpa_fwd_ms=t_sdpa * 1e3,
                    rank_fwd_ms=t_rank * 1e3,
                    eff_fwd=t_full / (world * t_rank),
                    eff_fwd_lockstep=t_full / (world * t_lock),
                    eff_fwd_mean=t_full / (world * t_mean),
                    full_fwd_bwd_ms=t_full_fb * 1e3,
                    rank_fwd_bwd_ms=t_rank_fb * 1e3,
                    eff_fwd_bwd=t_full_fb / (world * t_rank_fb),
                    eff_fwd_bwd_lockstep=t_full_fb / (world * t_lock_fb),
                )
                rows.append(row)
                print(
                    "measured",
                    {k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()},
                    flush=True,
                )
                if a.segments:
                    print_segments(layout, world, prof)
    print("\n" + header(title, info=info))
    print(format_table(rows, COLUMNS))
    print("\n# When does communication hide? Per step and rank (forward):")
    kv_bytes, blk_flops = 2 * L * Hk * D * elem, 4 * L * L * Hq * D
    print(f"#   bytes = 2*L*Hk*D*elem = {kv_bytes / 2**20:.3g} MiB", end="; ")
    print(f"FLOPs <= 4*L*L*Hq*D = {blk_flops / 1e12:.3g} T")
    print("#   hidden when L >= Hk*elem*F / (2*c*Hq*BW); c = 1 (full block), 1/2 (causal zigzag/stripe step)")
    F = fwd_flops_rate
    print(f"#   F = {F / 1e12:.3g} TFLOP/s (the full causal forward above, at W={a.worlds[-1]})")
    p = max(pre or 2 for pre in a.prefetch)
    print(
        f"#   holding p = {p} blocks (use_ring_prefetch): p blocks travel during p steps' compute, except the"
        " first p, which a rank sends during its own block (one step's work): the first step needs p x L"
    )
    for name, bw in LINKS.items():
        lmin = Hk * elem * F / (2 * 0.5 * Hq * bw)
        print(
            f"#   {name}: zigzag hides the K/V transfer from L >= {lmin:,.0f} tokens per rank"
            f" (its first step at p = {p}: L >= {p * lmin:,.0f})"
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "ring.csv", rows, info)
    series = {}
    for r in rows:
        name = r["layout"] + (f" {r['config']}" if len(variants) > 1 else "")
        for kind, key in (("fwd", "eff_fwd"), ("fwd+bwd", "eff_fwd_bwd")):
            xs, ys = series.setdefault(f"{name} {kind}", ([], []))
            xs.append(r["world"])
            ys.append(r[key])
    title = f"simulated ring, {info['device']}, Hq={Hq} Hk={Hk} D={D} {a.dtype}, {L} tokens per rank"
    plot_lines(out / "ring.png", series, "world size (virtual ranks)", "efficiency", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
