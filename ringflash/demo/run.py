"""``ringflash demo``: train and generate with a sequence sharded over whatever hardware is there.

Hardware choice (``--device auto``): every local GPU with NCCL when there are several, one GPU
(the single-GPU fallback: every function runs locally) when there is one, else ``--world-size``
CPU processes (default 4) with gloo. Under torchrun the launched processes are used as they are.

The run (1) trains a small causal LM for a few steps with its sequence sharded by ring attention
and checks loss and gradients against the same model on one process, then (2) prefills a prompt
with ring attention, generates tokens greedily with the sharded KV cache, and checks them token
by token against one process. It ends with a table and exits non-zero when a check fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..comm.init import init_process_group
from ..parallel.layouts import LAYOUTS

LOSS_TOL = 1e-4
GRAD_TOL = 1e-3


class DemoError(ValueError):
    """An impossible demo configuration; its message is one line for the user."""


@dataclasses.dataclass
class DemoConfig:
    world_size: int
    seq_len: int
    layout: str
    device: str  # "cpu" or "cuda"
    steps: int
    gen_tokens: int = 8
    vocab: int = 128
    dim: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    reference_scale_error: float = 1.0  # != 1 breaks the reference on purpose (tests)
    quiet: bool = False


def plan(world_size=None, seq_len=1024, layout="zigzag", device="auto", steps=3, **extra) -> DemoConfig:
    """Choose the hardware and check the combination; raises ``DemoError`` with a one-line reason."""
    if layout not in LAYOUTS:
        raise DemoError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda asked for, but no CUDA GPU is visible")
    if device not in ("cpu", "cuda"):
        raise DemoError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if world_size is None:
        world_size = torch.cuda.device_count() if device == "cuda" else 4
    if world_size < 1:
        raise DemoError(f"--world-size must be at least 1, got {world_size}")
    if device == "cuda" and world_size > torch.cuda.device_count():
        raise DemoError(
            f"--world-size {world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}"
        )
    if steps < 1:
        raise DemoError(f"--steps must be at least 1, got {steps}")
    if extra.get("gen_tokens", 1) < 1:
        raise DemoError(f"--gen-tokens must be at least 1, got {extra['gen_tokens']}")
    chunks = 2 * world_size if layout == "zigzag" and world_size > 1 else world_size
    if seq_len < chunks:
        raise DemoError(
            f"--seq-len {seq_len} is too short for {world_size} ranks with layout {layout} "
            f"(needs at least {chunks} tokens)"
        )
    if seq_len % chunks:
        raise DemoError(
            f"--seq-len {seq_len} does not divide into {chunks} equal chunks ({layout} layout over "
            f"{world_size} ranks); try {seq_len - seq_len % chunks}"
        )
    return DemoConfig(world_size, seq_len, layout, device, steps, **extra)


def _progress_printer(enabled: bool):
    """A one-line progress bar on stderr (rank 0 only)."""

    def show(done: int, total: int, label: str) -> None:
        if not enabled:
            return
        width = 24
        fill = int(width * done / max(total, 1))
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {label:<60}{end}")
        sys.stderr.flush()

    return show


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(rank: int, cfg: DemoConfig, group) -> dict:
    """One rank's demo: the training check, then the generation check. Returns its results."""
    from .generate import generate_check
    from .train import train_check

    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cfg.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    progress = _progress_printer(rank == 0 and not cfg.quiet)
    t0 = time.perf_counter()
    train = train_check(cfg, group, device, progress)
    gen = generate_check(cfg, train.pop("model"), group, device, progress)
    return {
        "rank": rank,
        **train,
        **gen,
        "seconds": time.perf_counter() - t0,
        "peak_mib": _peak_memory_mib(device),
    }


def _spawned(rank, cfg, init_file, out_dir):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world_size))
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)
    init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=cfg.world_size,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        res = worker(rank, cfg, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def run(cfg: DemoConfig) -> list[dict]:
    """Run the demo on ``cfg.world_size`` ranks (spawned here) and return every rank's results."""
    if dist.is_available() and dist.is_initialized():
        # Launched by torchrun & co.: this process is one rank; gather everyone's results.
        res = worker(dist.get_rank(), cfg, dist.group.WORLD)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, res)
        return everyone
    if cfg.world_size == 1:
        return [worker(0, cfg, None)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(cfg, os.path.join(tmp, "rendezvous"), tmp), nprocs=cfg.world_size, join=True)
        results = []
        for r in range(cfg.world_size):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                results.append(json.load(f))
    return results


def verdicts(results: list[dict]) -> dict[str, bool]:
    """The checks: training matches one process, generated tokens match one process."""
    r0 = results[0]
    return {
        "loss/grad match": all(r["loss_err"] <= LOSS_TOL and r["grad_err"] <= GRAD_TOL for r in results),
        "tokens match": all(r["tokens_match"] for r in results),
        "ranks agree": all(r["tokens"] == r0["tokens"] for r in results),
    }


def table(cfg: DemoConfig, results: list[dict]) -> str:
    """The closing summary table."""
    backend = (
        "nccl" if cfg.device == "cuda" and cfg.world_size > 1 else ("gloo" if cfg.world_size > 1 else "local")
    )
    worst = max(max(r["loss_err"], r["grad_err"], r["gen_logit_err"]) for r in results)
    rows = [
        ("world size", str(cfg.world_size)),
        ("backend", f"{backend} ({cfg.device}), layout {cfg.layout}"),
        ("sequence length", f"{cfg.seq_len} (train), prompt {cfg.seq_len} + {cfg.gen_tokens} generated"),
        ("train tokens/s", f"{min(r['train_tokens_per_s'] for r in results):,.0f}"),
        ("decode tokens/s", f"{min(r['decode_tokens_per_s'] for r in results):,.1f}"),
        ("peak memory/rank", f"{max(r['peak_mib'] for r in results):,.0f} MiB"),
        ("max error vs ref", f"{worst:.2e} (loss, rel. grad, logits)"),
    ]
    rows += [(name, "PASS" if ok else "FAIL") for name, ok in verdicts(results).items()]
    width = max(len(n) for n, _ in rows)
    line = "-" * (width + 50)
    return "\n".join([line] + [f"{n:<{width}}  {v}" for n, v in rows] + [line])
