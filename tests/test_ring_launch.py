"""The launch examples and the multi-process benchmarks run end to end (torchrun always; mpirun where
installed)."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import background
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["launch/train_ring_lm.py", "--steps", "2", "--seq-len", "96", "--dim", "32", "--layers", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def _run(cmd: list[str], timeout: float = 240) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return _checked(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout))


def _checked(proc: subprocess.CompletedProcess) -> str:
    """The run's output, which must have exited 0."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def test_torchrun_training_matches_one_process():
    out = _run([*TORCHRUN, "3", *TRAIN, "--layout", "stripe"])
    assert "OK: 3 rank(s), layout stripe" in out, out[-2000:]


_TEARDOWN_SCRIPT = """
import gc, os, sys
import torch, torch.distributed as dist
import ringflash.parallel as rp
from ringflash.comm import init_distributed


def main():
    init_distributed()
    q = torch.randn(1, 32, 2, 16, requires_grad=True)
    opt = torch.optim.AdamW([q], lr=1e-3)  # imports torch._dynamo while the group exists
    for _ in range(2):
        opt.zero_grad()
        rp.zigzag_ring_flash_attn_func(q, q, q, causal=True).sum().backward()
        opt.step()
    dist.barrier()
    dist.destroy_process_group()


main()
gc.collect()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(sys.argv[1], f"threads_{os.environ['RANK']}.txt"), "w") as f:  # a file each:
    f.write("\\n".join(names))  # two ranks printing at once can interleave on one line
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_destroy_process_group_stops_the_group_threads(tmp_path):
    """After ``destroy_process_group`` no thread of the gloo group is left, even when an optimizer
    imported ``torch._dynamo`` while the group existed (``init_process_group`` pre-imports it): a
    group kept alive into the interpreter's teardown can abort the process at exit."""
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN_SCRIPT)
    out = _run([*TORCHRUN, "2", str(script), str(tmp_path)])
    reports = sorted(tmp_path.glob("threads_*.txt"))
    assert len(reports) == 2, out[-2000:]
    for report in reports:
        names = report.read_text().split("\n")
        assert names and not any("gloo" in n for n in names), f"{report.name}: {names}"


@pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or shutil.which("mpirun") is None,
    reason="mpi4py/mpirun not installed",
)
def test_mpirun_training_matches_one_process():
    out = _run(["mpirun", "-n", "2", sys.executable, *TRAIN])
    assert "OK: 2 rank(s), layout zigzag" in out, out[-2000:]


# bench_ring_nccl's packed rows by default: layout:method, for each document-length distribution.
PACKED_ROWS = ("contiguous:ring", "balanced:ring", "balanced:allgather")


BENCH_JOB = background.job(
    "torchrun-bench-cli",
    [sys.executable, "-m", "ringflash.cli", "bench", "--tiny", "--nproc", "2", "--out", "{out}"]
    + ["ring_nccl", "decode_sharded_nccl", "max_seqlen"],
    cwd=str(ROOT),
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    timeout=400,
)


@pytest.mark.background(BENCH_JOB)
def test_torchrun_benchmarks_run_through_the_cli():
    """The multi-process benchmarks at --tiny size, through ``ringflash bench`` (torchrun, 2 gloo
    processes on CPU): each writes its CSV, and the sharded results equal one device's."""
    proc, where = background.result(BENCH_JOB)
    tmp_path = Path(where)
    out = _checked(proc)
    assert "predicted max" in out and "ran  L=" in out, out[-2000:]

    def rows(name):
        with open(tmp_path / name) as fh:
            return list(csv.DictReader(fh))

    ring = {r["layout"]: r for r in rows("ring_nccl_W2.csv")}
    packed = {f"varlen {d} {v}" for d in ("longtail", "1k", "one") for v in PACKED_ROWS}
    assert set(ring) == {"zigzag", "contiguous", "stripe"} | packed, ring
    assert all(float(r["fwd_eff"]) > 0 and float(r["fb_eff"]) > 0 for r in ring.values()), ring
    (sharded,) = rows("decode_sharded_W2.csv")
    assert float(sharded["max_rel_err"]) < 1e-5, sharded  # sharded == one device, up to float32 rounding
    kinds = {(r["attention"], r["kind"]) for r in rows("max_seqlen_W2.csv")}
    assert {("ring", "fit"), ("sdpa", "fit"), ("ring", "ran")} <= kinds, kinds
