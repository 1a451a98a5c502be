"""Timing helpers shared by the benchmark scripts: CUDA-graph capture, ranks timed together, and
variants timed in interleaved rounds."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def interleaved_medians(measures, rounds: int) -> list[float]:
    """Each of ``measures`` (callables returning one timing) once per round, in turn, for
    ``rounds`` rounds; the median of each. Interleaving makes clock drift hit every variant alike."""
    times = [[m() for m in measures] for _ in range(rounds)]
    return [statistics.median(col) for col in zip(*times, strict=True)]


def with_setting(owner, name: str, value, fn):
    """``fn`` wrapped to run with ``owner.name`` set to ``value`` (restored after each call): a
    library switch that a benchmark times both ways."""

    def run():
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return fn()
        finally:
            setattr(owner, name, saved)

    return run


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
    except RuntimeError:
        torch.cuda.synchronize()
        return None


def start_distributed():
    """Join the launcher's process group: ``(info, device, dtype, device name)`` - this rank's GPU
    and bf16 under NCCL, the CPU and float32 under gloo."""
    from ringflash.comm import init_distributed

    info = init_distributed()
    cuda = info.backend == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    return info, device, dtype, torch.cuda.get_device_name() if cuda else "cpu"


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
