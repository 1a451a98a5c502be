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
library's): with several values, each gets a row, timed in the same process. ``--dq-beside on off``
times the Triton backward both ways (dQ on a second stream beside dK/dV, the default, or after
it), the whole-sequence call and the ring alike; ``--split-own off on`` the ring's backward with its
own block whole after the remote steps (the default) or split around them
(``ring_loop.SPLIT_OWN_BLOCK``). Every combination gets a row, interleaved with the others.

    python benchmarks/bench_ring.py            # Llama-3-8B attention: 32 q / 8 kv heads, d 128, bf16, 8k/rank
    python benchmarks/bench_ring.py --tiny     # a seconds-long CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_timing import interleaved_medians
from torch.nn import functional

from ringflash.backends import backend_for, backend_name
from ringflash.parallel import ring_loop, shard_for, simulate_ring_attn, simulate_ring_attn_backward
from ringflash.parallel.options import DEFAULT_RING_PREFETCH

LINKS = {
    "NVLink4 (H100, ~450 GB/s)": 450e9,
    "PCIe Gen5 x16 (~55 GB/s)": 55e9,
    "InfiniBand NDR (~50 GB/s)": 50e9,
}


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` (``triton.testing.do_bench`` on CUDA)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=5, rep=max(25, reps * 10), return_mode="median") / 1e3
        except ImportError:
            pass
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def full_times(q, k, v, dout, scale, reps, setups=(None,)):
    """Per variant: (fwd, fwd+bwd) seconds of one whole-sequence call of the backend, and SDPA's fwd
    as a baseline; ``setups`` as in ``ring_times`` (the variants' timings interleaved)."""
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

    def timed(setup, fn):
        def run():
            if setup is not None:
                setup()
            return _time(fn, q.device, reps)

        return run

    measures = [timed(s, fn) for s in setups for fn in (fwd, fwd_bwd, sdpa)]
    med = interleaved_medians(measures, 1 if len(setups) == 1 else 3)
    return [tuple(med[3 * i : 3 * i + 3]) for i in range(len(setups))]


def _set_variant(dq_beside: str, split_own: str) -> None:
    """The Triton backward's dQ kernel beside dK/dV ("on", the default) or after it; the ring
    backward's own block split around the remote steps ("on") or whole after them."""
    ring_loop.SPLIT_OWN_BLOCK = split_own == "on"
    try:
        from ringflash.kernels import bwd
    except ImportError:  # no Triton: the blockwise backend has no such choice
        return
    bwd.CONCURRENT_DQ = dq_beside == "on"


def _host_ahead(device: torch.device, events: bool) -> None:
    """Queue about 10 ms of GPU work before a timed ring, so the host is ahead of the GPU when the
    ring starts, as it is inside a model's step (the simulator syncs after each ring to read its
    events; without this the first rank's first segment would time the host's launch latency)."""
    if events and device.type == "cuda":
        torch.cuda._sleep(20_000_000)  # cycles: ~10 ms at H100 clocks


def ring_times(
    q, k, v, dout, world, layout, scale, reps, timing="events", prefetch=DEFAULT_RING_PREFETCH, setups=(None,)
):
    """Per variant: (fwd, fwd+bwd) seconds of the simulated ring (``SimProfile.ring_time``), and the
    forward's and backward's per-rank profiles (``SimProfile``, medians over the repetitions).

    ``timing``: "events" (CUDA events, GPU time with the host running ahead, as on a real rank) or
    "wall" (host clock with a device sync around each segment: host launch time counts).
    ``prefetch``: K/V blocks each rank's forward holds and computes at once (``ring_fwd_loop``).
    ``setups``: one callable per variant (``None``: as is), run before each of its repetitions;
    the variants' repetitions are interleaved, so clock drift hits them alike."""
    sh = lambda x: [shard_for(x, r, world, 1, layout) for r in range(world)]  # noqa: E731
    qs, ks, vs, dos = sh(q), sh(k), sh(v), sh(dout)
    events = timing == "events" and q.device.type == "cuda"
    kw = dict(softmax_scale=scale, causal=True, profile=True, sync=_sync(q.device), cuda_events=events)
    pfs, pbs = [[] for _ in setups], [[] for _ in setups]
    for _ in range(reps + 1):  # the first run warms up (kernel compilation)
        for i, setup in enumerate(setups):
            if setup is not None:
                setup()
            _host_ahead(q.device, events)
            outs, lses, pf = simulate_ring_attn(qs, ks, vs, layout, prefetch=prefetch, **kw)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny CPU-sized shapes (smoke test)")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"])
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
        default=[DEFAULT_RING_PREFETCH],
        help="forward K/V blocks held and computed at once (a row each, one process; default: the library's)",
    )
    p.add_argument(
        "--dq-beside",
        choices=["on", "off"],
        nargs="+",
        default=["on"],
        help="backward: dQ on a second stream beside dK/dV (kernels.bwd.CONCURRENT_DQ; a row each)",
    )
    p.add_argument(
        "--split-own",
        choices=["on", "off"],
        nargs="+",
        default=["off"],
        help="ring backward: own block split around the remote steps (ring_loop.SPLIT_OWN_BLOCK; a row each)",
    )
    p.add_argument(
        "--results", default=str(Path(__file__).with_name("RESULTS.md")), help="RESULTS.md to append to"
    )
    p.add_argument("--no-write", action="store_true", help="print only (default for --tiny)")
    p.add_argument("--segments", action="store_true", help="print each rank's forward segment times")
    p.add_argument("--out", default=None, help="folder for ring.csv and ring.png")
    p.add_argument(
        "--timing",
        choices=["events", "wall"],
        default="events",
        help="rank segments: CUDA-event GPU time (default) or synced wall time (host launch time counts)",
    )
    a = p.parse_args()
    if a.tiny:
        a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim, a.reps, a.no_write = 64, 4, 2, 32, 2, True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    L, Hq, Hk, D = a.tokens_per_rank, a.heads, a.kv_heads, a.head_dim
    elem = torch.finfo(dtype).bits // 8
    scale = D**-0.5
    print(
        f"# ring attention efficiency (simulated ring) on {dev_name}; {versions}; "
        f"backend {backend_name(device)}"
    )
    print(
        f"# causal, B=1, Hq={Hq}, Hk={Hk}, D={D}, {a.dtype}, {L} tokens per rank; eff = t_full / (W * t_rank)"
    )
    events = a.timing == "events" and device.type == "cuda"
    clock = "CUDA events (GPU time)" if events else "synced wall clock"
    print(f"# rank segments timed by {clock}")
    hdr = f"{'layout':>13} {'W':>2} {'S':>7} | {'full fwd ms':>11} {'sdpa fwd ms':>11} {'rank fwd ms':>11} "
    hdr += f"{'eff fwd':>7} {'lockstep':>8} {'eff mean':>8} | {'full f+b ms':>11} {'rank f+b ms':>11} "
    hdr += f"{'eff f+b':>7} {'lockstep':>8}"
    print(hdr)
    rows = []
    fwd_flops_rate = None
    for world in a.worlds:
        S = world * L
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, dout = (
            torch.randn(1, S, h, D, generator=g).to(device=device, dtype=dtype) for h in (Hq, Hk, Hk, Hq)
        )
        combos = list(itertools.product(a.dq_beside, a.split_own))
        setups = [functools.partial(_set_variant, dq, so) for dq, so in combos]
        fulls = full_times(q, k, v, dout, scale, a.reps, setups)
        fwd_flops_rate = 4 * S * S * Hq * D / 2 / fulls[0][0]  # causal: half the block
        for layout, pre in itertools.product(a.layouts, a.prefetch):
            rings = ring_times(q, k, v, dout, world, layout, scale, a.reps, a.timing, pre, setups)
            for (dq, so), (t_full, t_full_fb, t_sdpa), (t_rank, t_rank_fb, prof, prof_b) in zip(
                combos, fulls, rings, strict=True
            ):
                name = layout if a.prefetch == [DEFAULT_RING_PREFETCH] else f"{layout}/p{pre}"
                name += "" if a.dq_beside == ["on"] else f"/dq-{dq}"
                name += "" if a.split_own == ["off"] else f"/so-{so}"
                t_mean = sum(prof.rank_time(r) for r in range(world)) / world
                t_lock, t_lock_fb = prof.lockstep_time(), prof.lockstep_time() + prof_b.lockstep_time()
                eff, eff_mean, eff_fb = (
                    t_full / (world * t_rank),
                    t_full / (world * t_mean),
                    t_full_fb / (world * t_rank_fb),
                )
                print(
                    f"{name:>13} {world:>2} {S:>7} | {t_full * 1e3:>11.3f} {t_sdpa * 1e3:>11.3f} "
                    f"{t_rank * 1e3:>11.3f} {eff:>7.3f} {t_full / (world * t_lock):>8.3f} {eff_mean:>8.3f} | "
                    f"{t_full_fb * 1e3:>11.3f} {t_rank_fb * 1e3:>11.3f} {eff_fb:>7.3f} "
                    f"{t_full_fb / (world * t_lock_fb):>8.3f}"
                )
                rows.append((name, world, S, t_full, t_sdpa, t_rank, eff, t_full_fb, t_rank_fb, eff_fb))
                if a.segments:
                    print_segments(layout, world, prof)
    print("\n# When does communication hide? Per step and rank (forward):")
    kv_bytes, blk_flops = 2 * L * Hk * D * elem, 4 * L * L * Hq * D
    print(
        f"#   bytes = 2*L*Hk*D*elem = {kv_bytes / 2**20:.3g} MiB; "
        f"FLOPs <= 4*L*L*Hq*D = {blk_flops / 1e12:.3g} T"
    )
    print("#   hidden when L >= Hk*elem*F / (2*c*Hq*BW); c = 1 (full block), 1/2 (causal zigzag/stripe step)")
    F = fwd_flops_rate
    print(f"#   F = {F / 1e12:.3g} TFLOP/s (the full causal forward above, at W={a.worlds[-1]})")
    p = max(a.prefetch)
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
    if a.out:
        _write_out(a.out, rows, f"simulated ring, {dev_name}, {versions}, Hq={Hq} Hk={Hk} D={D} {a.dtype}")
    if not a.no_write:
        path = Path(a.results)
        new = not path.exists()
        with path.open("a") as f:
            if new:
                f.write("# Benchmark results\n\n")
            f.write(f"\n## bench_ring.py, {datetime.date.today()}, {dev_name}, {versions}\n\n")
            f.write(
                f"causal, Hq={Hq}, Hk={Hk}, D={D}, {a.dtype}, {L} tokens/rank, simulated ring on one device; "
            )
            f.write("eff = t_full / (W * t_rank)\n\n")
            f.write("| layout | W | S | full fwd ms | SDPA fwd ms | rank fwd ms | eff fwd ")
            f.write("| full f+b ms | rank f+b ms | eff f+b |\n")
            f.write("|---|---|---|---|---|---|---|---|---|---|\n")
            for lay, w, s, tf, ts, tr, e, tfb, trfb, efb in rows:
                f.write(
                    f"| {lay} | {w} | {s} | {tf * 1e3:.2f} | {ts * 1e3:.2f} | {tr * 1e3:.2f} | {e:.3f} "
                    f"| {tfb * 1e3:.2f} | {trfb * 1e3:.2f} | {efb:.3f} |\n"
                )
        print(f"\nappended to {path}")


def _write_out(out: str, rows, title: str) -> None:
    from bench_io import plot_lines, write_csv

    keys = ("layout", "world", "seqlen", "full_fwd_s", "sdpa_fwd_s", "rank_fwd_s", "eff_fwd")
    keys += ("full_fwd_bwd_s", "rank_fwd_bwd_s", "eff_fwd_bwd")
    write_csv(str(Path(out) / "ring.csv"), [dict(zip(keys, r, strict=True)) for r in rows])
    series = {}
    for lay in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == lay]
        series[f"{lay} fwd"] = ([r[1] for r in mine], [r[6] for r in mine])
        series[f"{lay} fwd+bwd"] = ([r[1] for r in mine], [r[9] for r in mine])
    plot_lines(str(Path(out) / "ring.png"), series, "world size (virtual ranks)", "efficiency", title)


if __name__ == "__main__":
    main()
