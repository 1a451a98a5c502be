"""benchmarks/bench_train.py: its --tiny CPU run under torchrun (every method that applies, one step
each), the longest-length search with an out-of-memory error on one rank, and the extrapolation to
the model's depth."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import background
import pytest
import torch
from dist_utils import spawn

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train  # noqa: E402  (importable without a GPU)

TINY_JOB = background.job(
    "bench-train-tiny",
    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    + ["benchmarks/bench_train.py", "--tiny", "--out", "{out}"],
    cwd=str(ROOT),
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    # On a machine where DeepSpeed has not built its CPU shared-memory op yet, its first use
    # compiles it (minutes on 2 cores, beside the rest of the suite).
    timeout=600,
)


@pytest.mark.background(TINY_JOB)
def test_bench_train_tiny_runs_under_torchrun():
    pytest.importorskip("deepspeed")
    proc, out = background.result(TINY_JOB)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "4 layers (ran 2; '~' = extrapolated" in proc.stdout, proc.stdout
    with open(Path(out) / "train_W2.csv") as fh:
        rows = list(csv.DictReader(fh))
    by = {(r["method"], r["kind"]): r for r in rows}
    for m in ("ring", "hybrid", "alst-sdpa", "alst-ringflash"):
        tp = by[(m, "throughput")]
        assert float(tp["tokens_per_s_per_gpu"]) > 0 and tp["extrapolated"] == "True", tp
        assert int(by[(m, "longest at 2 layers")]["S"]) == 64, by[(m, "longest at 2 layers")]
    assert by[("hybrid", "throughput")]["plan"] == "ulysses 2 x ring 1"
    assert "CUDA" in by[("context-parallel", "n/a")]["note"]


ONE_RANK_JOB = background.job(
    "bench-train-one-rank",
    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    + ["benchmarks/bench_train.py", "--tiny", "--no-search", "--offload-activations", "--lean-norms"]
    + ["--methods", "ring", "alst-sdpa", "--out", "{out}"],
    cwd=str(ROOT),
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    # On a machine where DeepSpeed has not built its CPU shared-memory op yet, its first use
    # compiles it (minutes on 2 cores, beside the rest of the suite).
    timeout=600,
)


@pytest.mark.background(ONE_RANK_JOB)
def test_bench_train_one_rank_runs_alst_core_alone_with_offloaded_activations():
    """On one rank ALST registers nothing, so its row is its core attention alone (the baseline of
    the one-GPU figures); the offloaded checkpoints and lean norms still train."""
    pytest.importorskip("deepspeed")
    proc, out = background.result(ONE_RANK_JOB)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "(inputs offloaded to host memory)" in proc.stdout and "lean RMSNorms" in proc.stdout, proc.stdout
    assert "# host memory of the node" in proc.stdout and "longest row in 90% of it" in proc.stdout
    with open(Path(out) / "train_W1.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh) if r["kind"] == "throughput"}
    assert rows["alst-sdpa"]["plan"] == "one GPU: its core alone", rows
    assert all(float(r["tokens_per_s_per_gpu"]) > 0 for r in rows.values()), rows


def test_host_memory_bound_of_the_offloads():
    """Llama-3-8B's 8.03B parameters; the offloads' host bytes: 16 per parameter, and each layer's
    bf16 checkpoint per token."""
    arch = bench_train.Arch()
    assert bench_train.parameter_count(arch) == 8_030_261_248
    args = SimpleNamespace(offload=True, offload_activations=True)
    fixed, per_token, total = bench_train.host_bound(arch, args, torch.bfloat16)
    assert fixed == 16 * 8_030_261_248 and per_token == 32 * 4096 * 2 and total > 0
    assert (
        bench_train.host_bound(arch, SimpleNamespace(offload=False, offload_activations=False), None) is None
    )


class _FakeTrainer:
    """Steps that take S/1000 s and S*100 bytes, and run out of memory above ``limit`` tokens on
    rank 1 only (the other rank must learn it and fail the probe too)."""

    def __init__(self, rank, limit):
        self.rank, self.limit, self.device, self.recovered = rank, limit, torch.device("cpu"), 0

    def step(self, S):
        if S > self.limit and self.rank == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 1 ...")
        return S / 1000, S * 100

    def recover(self):
        self.recovered += 1


def _search_worker(rank, world):
    args = SimpleNamespace(start=64, search_max=1 << 20, max_step_s=1e9, resolution=0.05)
    t = _FakeTrainer(rank, limit=5000)
    good, why, peaks = bench_train.longest(t, args, gran=32)
    tp = bench_train.throughput(t, [1024, 8192], SimpleNamespace(warmup=1, steps=2))
    return good, why, sorted(peaks), t.recovered, tp


def test_longest_search_agrees_on_an_out_of_memory_rank():
    res = spawn(_search_worker, 2, timeout=120)
    for good, _, peaks, recovered, tp in res:
        assert 5000 * 0.95 - 32 <= good <= 5000 and good % 32 == 0, good
        assert peaks[-1] == good and peaks[:4] == [64, 128, 256, 512], peaks
        assert recovered >= 2, recovered  # every failed probe recovers on every rank
        assert tp[1024] == (1.024, 102400) and "OOM" in tp[8192], tp
    assert "3.50 GiB" in res[1][1] and res[0][1] == "OOM on another rank", (res[0][1], res[1][1])


def test_extrapolation_to_the_model_depth():
    """Measured at 4 and 2 layers, extrapolated to 32: time and memory grow by the per-layer cost;
    the longest length follows from the linear fit of the full-depth peak against the capacity."""
    arch = bench_train.Arch(layers=32)
    args = SimpleNamespace(layers=4)
    gib = 2**30
    # peak(S, layers) = 10 GiB + layers * (1 GiB + S * 64 KiB); time = layers * S * 1e-6 s
    res = {
        "tp": {S: (4 * S * 1e-6, 10 * gib + 4 * (gib + S * 65536)) for S in (8192, 16384)},
        "tp_half": {S: (2 * S * 1e-6, 10 * gib + 2 * (gib + S * 65536)) for S in (8192, 16384)},
    }
    out = bench_train.extrapolate(res, arch, args, capacity=80 * gib)
    secs, peak, extrapolated = out["full"][16384]
    assert extrapolated and secs == pytest.approx(32 * 16384e-6)
    assert peak == pytest.approx(10 * gib + 32 * (gib + 16384 * 65536))
    want = (80 * gib - 10 * gib - 32 * gib) / (32 * 65536)  # capacity = 42 GiB + S * 2 MiB
    assert out["predicted_max"] == pytest.approx(want, abs=1)


def test_extrapolation_when_noise_hides_the_layer_cost():
    """A shallower run as slow as the deeper one (noise on a tiny model) must not give a negative or
    zero per-layer time: the whole measured time scales with the depth instead, and the row says so."""
    arch = bench_train.Arch(layers=4)
    args = SimpleNamespace(layers=2)
    res = {"tp": {32: (0.010, 1000)}, "tp_half": {32: (0.012, 900)}}
    out = bench_train.extrapolate(res, arch, args, capacity=0)
    secs, peak, extrapolated = out["full"][32]
    assert extrapolated and secs == pytest.approx(0.020)
    assert peak == pytest.approx(1200)
    assert "scaled by depth" in out["measured"][32]
