"""What every benchmark of the suite shares: timing, the device/versions header, config options,
tables and CSV/PNG output.

Timing (``do_bench`` medians on CUDA, host-clock medians elsewhere):

- :func:`bench_ms`: median milliseconds of one call (``triton.testing.do_bench`` on CUDA, which
  flushes L2 before each timed call);
- :func:`interleaved_medians`: several measures timed in turn over rounds, so clock and memory
  drift hit every variant alike;
- :func:`capture` / :func:`graphed`: a call captured in a CUDA graph, for GPU time without the
  host's launch cost;
- :func:`host_us`: host microseconds per eager call, started with the GPU idle;
- :func:`host_profile`: where an eager call's host time goes (``cProfile``, per function);
- :func:`start_distributed` / :func:`dist_median_time`: ranks under torchrun, timed together.

Output: :func:`header` (device, versions, commit, date: the first line of every table),
:func:`format_table`, :func:`write_csv` (one CSV per benchmark, the header's fields as leading
columns) and :func:`plot_lines`.

Options: :func:`add_config_args` / :func:`config_variants` turn fields of the kernel configs
(``ringflash.kernels.options.AttnConfig`` / ``DecodeConfig``) into command-line options taking one
or more values; every combination is one variant, applied with ``ringflash.backends.use_config``
or passed as ``config=`` to a launcher.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ the header


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def commit() -> str:
    """The checkout's commit (``git describe --always --dirty``), or ``unknown`` outside git."""
    try:
        res = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU's model and torch's thread count."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def run_info(device: torch.device | str | None = None) -> dict:
    """Device, versions, commit and date: the leading columns of every CSV row."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = dict(
        device=device_name(device),
        torch=torch.__version__,
        triton=_version("triton"),
        python=platform.python_version(),
    )
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda or "none"
        info["cudnn"] = str(torch.backends.cudnn.version())
    info.update(commit=commit(), date=str(datetime.date.today()))
    return info


def header(title: str, device: torch.device | str | None = None, info: dict | None = None) -> str:
    """``# title | device | torch .. | triton .. | ... | commit .. | date``: every table's first line."""
    info = info or run_info(device)
    fields = [info["device"]] + [f"{k} {v}" for k, v in info.items() if k != "device"]
    return f"# {title} | " + " | ".join(fields)


# ------------------------------------------------------------------------------------ timing


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` when a GPU is present (L2
    flushed before each call), else the host clock over a few calls after one warm-up call."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(max(3, min(rep // 10, 9))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def clean_flush_us(fn, reps=100, device="cuda") -> float:
    """Median us of ``fn`` after an L2 flush that only reads (``do_bench`` zeroes a buffer, which
    leaves dirty lines in L2 that the timed call pays to write back)."""
    buf = torch.empty(2**26, dtype=torch.float32, device=device).normal_()  # 256 MB
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(5):
        fn()
    for start, end in ev:
        buf.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def copy_bandwidth(nbytes: int = 2**31, device="cuda") -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (bytes read + bytes written)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def interleaved_medians(measures, rounds: int) -> list[float]:
    """Each of ``measures`` (callables returning one timing) once per round, in turn, for
    ``rounds`` rounds; the median of each. Interleaving makes clock drift hit every variant alike."""
    times = [[m() for m in measures] for _ in range(max(1, rounds))]
    return [statistics.median(col) for col in zip(*times, strict=True)]


def capture(fn):
    """``fn`` warmed up on a side stream, captured in a CUDA graph and replayed once:
    ``(replay closure, the captured call's outputs)``. Raises RuntimeError if capture fails."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return g.replay, out


def graphed(fn):
    """``fn`` captured in a CUDA graph; returns the replay closure (or None if capture fails)."""
    try:
        return capture(fn)[0]
    except RuntimeError as e:
        print(f"# CUDA graph capture failed: {str(e).splitlines()[0][:160]}")
        torch.cuda.synchronize()
        return None


def host_us(fn, calls: int = 50, rounds: int = 5) -> float:
    """Host microseconds per eager call of ``fn``, the GPU idle at the start: per round, a
    ``torch.cuda.synchronize()``, then ``calls`` calls timed on the host clock with no sync after
    them (the GPU work they queue is drained outside the timing); the median over rounds. A call
    that syncs itself (e.g. reading a tensor's value) counts the GPU time it waits for."""
    cuda = torch.cuda.is_available()
    fn()
    per_call = []
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls)
        if cuda:
            torch.cuda.synchronize()
    return statistics.median(per_call) * 1e6


def host_profile(fn, label: str, calls: int = 500, top: int = 20) -> None:
    """Print where the host time of ``calls`` eager calls of ``fn`` goes: ``cProfile``'s
    ``top`` functions by time spent in themselves (Python, torch operations, Triton's launcher),
    microseconds per call. The GPU work they queue is drained after the profile."""
    import cProfile
    import pstats

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, prim, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    total = sum(v[2] for v in stats.values())
    print(f"host profile of {label}: {total / calls * 1e6:.1f} us a call (profiled), by own time")
    for (file, line, name), (n, _, own, cum, _) in rows:
        where = f"{os.path.basename(file)}:{line}" if line else file
        per = (own / calls * 1e6, cum / calls * 1e6, n / calls)
        print("  {:8.2f} us own {:8.2f} us cum {:6.1f}x  {}  {}".format(*per, name, where))


def start_distributed():
    """Join the launcher's process group: ``(info, device, dtype)`` - this rank's GPU and bf16
    under NCCL, the CPU and float32 under gloo."""
    from ringflash.comm import init_distributed

    info = init_distributed()
    cuda = info.backend == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    return info, device, dtype


def dist_median_time(fn, device, reps, iters=1, alone=False):
    """Seconds per call of ``fn``: after one warm-up call, the median over ``reps`` of ``iters``
    back-to-back calls started together (barrier), the slowest rank's (all_reduce MAX). With
    ``alone`` only rank 0 runs ``fn``; the others take part in the barriers and report 0."""
    rank = dist.get_rank()
    cuda = device.type == "cuda"
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if alone and rank != 0:
            times.append(0.0)
            continue
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # as fast as the slowest rank
    return t.item()


def nan_if_fails(what: str, fn):
    """``fn()``, or NaN with a one-line note when it raises (a backend missing on this build)."""
    try:
        return fn()
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as e:
        print(f"# {what}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        return float("nan")


# ------------------------------------------------------------------------------------ options


def add_common_args(parser: argparse.ArgumentParser, tiny: str) -> None:
    """``--out DIR`` and ``--tiny`` (``tiny`` says what the tiny run is)."""
    parser.add_argument(
        "--out", default="bench_out", help="folder for the CSV (and PNG) (default: bench_out)"
    )
    parser.add_argument("--tiny", action="store_true", help=tiny)


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def add_config_args(parser: argparse.ArgumentParser, cls, names) -> None:
    """One option per field of the config dataclass ``cls`` in ``names`` (``--block-n 64 128``),
    each taking one or more values (booleans as ``on`` / ``off``); see :func:`config_variants`.
    A name that is not a field of ``cls`` raises at once (a renamed field breaks the parser)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    group = parser.add_argument_group(f"{cls.__name__} fields (several values: one variant each)")
    for name in names:
        if name not in fields:
            raise AttributeError(f"{cls.__name__} has no field {name!r}")
        default = fields[name].default
        kind = _on_off if isinstance(default, bool) else type(default) if default is not None else int
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            nargs="+",
            default=None,
            metavar="V",
            help=f"{cls.__name__}.{name} (library default {shown})",
        )


def config_variants(cls, args: argparse.Namespace, names) -> list[tuple[str, object | None]]:
    """Every combination of the values given for ``names`` (see :func:`add_config_args`):
    ``[(label, cls(...))]``; ``[("default", None)]`` when none was given (the library's own choice,
    no config passed)."""
    given = [(n, getattr(args, n)) for n in names if getattr(args, n, None)]
    if not given:
        return [("default", None)]
    out = []
    for values in itertools.product(*(vals for _, vals in given)):
        kw = dict(zip((n for n, _ in given), values, strict=True))
        label = ",".join(f"{n}={('on' if v else 'off') if isinstance(v, bool) else v}" for n, v in kw.items())
        out.append((label, cls(**kw)))
    return out


# ------------------------------------------------------------------------------------ output


def _cell(value, spec: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as aligned text: ``columns`` is ``[(header, key, format spec)]``; NaN prints ``n/a``
    (measured, but not available), a missing key nothing (not measured for that row)."""
    cells = [[_cell(r.get(key), spec) for _, key, spec in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))  # noqa: E731
    head = line([h for h, _, _ in columns])
    return "\n".join([head, "-" * len(head), *(line(c) for c in cells)])


def tokens(n: int) -> str:
    """A token count as people write it: ``4k``, ``1M``, ``1000``."""
    if n and n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def ratio(a, b) -> float:
    """``a / b``, NaN when either is missing or ``b`` is 0."""
    try:
        return a / b if b else float("nan")
    except TypeError:
        return float("nan")


def write_csv(path: str | os.PathLike, rows: list[dict], info: dict | None = None) -> None:
    """``rows`` to ``path``, each prefixed with ``info`` (:func:`run_info`); the columns are the
    union of the rows' keys in order of appearance (a row without a key leaves its cell empty)."""
    rows = [{**(info or {}), **r} for r in rows]
    if not rows:
        print(f"csv: nothing measured, {path} not written")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, restval="")
        w.writeheader()
        w.writerows(rows)
    print(f"csv: {path}")


def plot_lines(
    path: str | os.PathLike,
    series: dict[str, tuple[list, list]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
) -> bool:
    """One line per series ``name -> (xs, ys)`` into a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot written (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
    return True


def plot_bars(
    path: str | os.PathLike, labels: list[str], panels: dict[str, dict[str, list]], ylabel: str
) -> bool:
    """Grouped bars into a PNG: one panel per ``title -> {series: ys}``, one group of bars per label;
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot written (pip install matplotlib)")
        return False
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 0.4 * len(labels) + 2) * len(panels), 4.5))
    for ax, (title, series) in zip(list(axes) if len(panels) > 1 else [axes], panels.items(), strict=True):
        width = 0.8 / max(1, len(series))
        for i, (name, ys) in enumerate(series.items()):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(list(range(len(labels))), labels, rotation=60, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
    return True
