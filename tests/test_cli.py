import subprocess
import sys

import pytest
import torch

from ringflash.cli import env_report, main


def test_env_report_lists_versions_and_backends(capsys):
    rows = dict(env_report())
    assert rows["torch"] and rows["backend on cpu"] in ("torch", "triton")
    assert "gloo" in rows["torch.distributed"]
    want = "available" if torch.cuda.is_available() else "not available"
    assert rows['use_ring_transport("copy_engine")'].startswith(want)
    assert main(["env"]) == 0
    assert "backend on cpu" in capsys.readouterr().out


def test_cli_module_runs_and_rejects_unknown_command():
    ok = subprocess.run([sys.executable, "-m", "ringflash.cli", "env"], capture_output=True, text=True)
    assert ok.returncode == 0 and "torch" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ringflash.cli", "frobnicate"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_bench_tiny_on_cpu_writes_tables_csv_and_plots(tmp_path):
    """Run from outside the repository (a helper path once assumed the repository root)."""
    out = tmp_path / "bench"
    res = subprocess.run(
        [sys.executable, "-m", "ringflash.cli", "bench", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("cpu.csv", "cpu.png", "ring.csv", "ring.png"):
        assert (out / name).stat().st_size > 0, f"{name} missing or empty"
    header = (out / "ring.csv").read_text().splitlines()[0]
    assert "eff_fwd" in header and "world" in header
    assert "ours/sdpa" in res.stdout  # the CPU table was printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_rejects_gpu_only_benchmarks_without_cuda_and_unknown_names():
    res = subprocess.run(
        [sys.executable, "-m", "ringflash.cli", "bench", "attention"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "ringflash.cli", "bench", "frob"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "unknown benchmark 'frob'" in res.stderr
