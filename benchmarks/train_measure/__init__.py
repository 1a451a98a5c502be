# ruff: noqa: N803 (S: the sequence length, as in bench_train.py)
"""How ``bench_train.py`` measures a method: one training step that may run out of memory on any
rank (``attempt``: every rank learns of the failure, the trainer recovers, the report names what
ran out), the median step time and peak per length (``throughput``), the longest length that
trains (doubling, then bisection: ``longest``) and the figures measured at fewer layers
extrapolated to the model's depth (``extrapolate``).

A folder rather than a module beside the scripts: every ``benchmarks/*.py`` is a script of the
suite (``ringflash bench``, and ``tests/test_cli.py`` checks each one's command line).
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import traceback
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from bench_train import Arch, Trainer


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_report(e: BaseException, device) -> str:
    """What ran out: the allocation that failed, where (the innermost frame of model or library
    code), and the largest block still allocated."""
    m = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", str(e))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    where = (
        f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
    )
    largest = 0
    if device.type == "cuda":
        blocks = (b for s in torch.cuda.memory._snapshot()["segments"] for b in s["blocks"])
        largest = max((b["size"] for b in blocks if b["state"] == "active_allocated"), default=0)
    return f"OOM: {m.group(1) if m else '?'} in {where}; largest live block {largest / 2**30:.2f} GiB"


def attempt(trainer: Trainer, S: int):
    """``(ok, seconds, peak, why)``: one step, an out-of-memory error on any rank a failure on all."""
    why, res = "", (0.0, 0)
    try:
        res = trainer.step(S)
    except torch.OutOfMemoryError as e:
        why = _oom_report(e, trainer.device)
        e.__traceback__ = None
    failed = torch.tensor([1.0 if why else 0.0], device=trainer.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        trainer.recover()
        _free(trainer.device)
        return False, 0.0, 0, why or "OOM on another rank"
    return True, res[0], res[1], ""


def throughput(trainer: Trainer, lengths, args) -> dict[int, tuple[float, int] | str]:
    """Median step time and peak at each length (or why it failed)."""
    out = {}
    for S in lengths:
        times, peak = [], 0
        for i in range(args.warmup + args.steps):
            ok, secs, pk, why = attempt(trainer, S)
            if not ok:
                out[S] = why
                break
            if i >= args.warmup:
                times.append(secs)
                peak = max(peak, pk)
        else:
            out[S] = (statistics.median(times), peak)
    return out


def longest(trainer: Trainer, args, gran: int) -> tuple[int, str, dict[int, int]]:
    """``(longest S that trained, what stopped the search, {S: peak} of the steps that ran)``."""
    good, bad, why, peaks = 0, 0, "", {}
    S = args.start
    while True:
        ok, secs, peak, reason = attempt(trainer, S)
        if not ok:
            bad, why = S, reason
            break
        good, peaks[S] = S, peak
        if secs > args.max_step_s:
            why = f"time: a step at {S:,} tokens took {secs:.0f} s (--max-step-s)"
            break
        if 2 * S > args.search_max:
            why = f"search cap {args.search_max:,} (--search-max)"
            break
        S *= 2
    while bad and bad - good > max(gran, int(good * args.resolution)):
        mid = (good + bad) // 2 // gran * gran
        if mid <= good:
            break
        ok, _, peak, reason = attempt(trainer, mid)
        if ok:
            good, peaks[mid] = mid, peak
        else:
            bad, why = mid, reason
    return good, why, peaks


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of y = a + b x."""
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else 0.0
    return my - b * mx, b


def extrapolate(res: dict, arch: Arch, args, capacity: int) -> dict:
    """Per-length ``(seconds, peak, extrapolated?)`` at the model's depth, and the predicted longest."""
    full, extra = {}, arch.layers - args.layers
    pts_mem = []
    for S, v in res.get("tp", {}).items():
        if isinstance(v, str):
            full[S] = v
            continue
        secs, peak = v
        h = res.get("tp_half", {}).get(S)
        if extra and isinstance(h, tuple):
            dl = args.layers - max(1, args.layers // 2)
            # A peak that does not grow with the depth (offloaded activations) adds nothing per layer.
            per_t, per_m = (secs - h[0]) / dl, max(0.0, (peak - h[1]) / dl)
            # On a tiny or noisy run the shallower run can take as long as the deeper one; a layer's time
            # is then unresolved, and scaling the whole time by the depth bounds it from above (a
            # negative or zero per-layer time would report an impossible or inflated throughput).
            scaled = per_t <= 0
            if scaled:
                per_t = secs / args.layers
            full[S] = (secs + extra * per_t, peak + extra * per_m, True)
            res.setdefault("measured", {})[S] = (
                f"{args.layers} layers {secs:.2f} s, {peak / 2**30:.1f} GiB; "
                + (f"{args.layers - dl} {h[0]:.2f} s, {h[1] / 2**30:.1f} GiB")
                + ("; time scaled by depth (per-layer time under noise)" if scaled else "")
            )
            pts_mem.append((S, peak + extra * per_m))
        else:
            full[S] = (secs, peak, False)
    res["full"] = full
    res["predicted_max"] = None
    if extra and capacity and len(pts_mem) >= 2:
        a, b = _fit(pts_mem)
        res["predicted_max"] = int((capacity - a) / b) if b > 0 else None
    return res
