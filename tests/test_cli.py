import ast
import csv
import importlib
import subprocess
import sys
from pathlib import Path

import background
import pytest
import torch

from ringflash.cli import BENCHES, child_error, env_report, main, run_benches


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


BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
# The benchmark scripts, and the modules they share (not scripts: no command line of their own).
HELPERS = ["bench_timing", "packed_calls"]
SCRIPTS = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in HELPERS)


TINY_BENCH_JOB = background.job(
    "bench-cli-tiny",
    [
        sys.executable,
        "-m",
        "ringflash.cli",
        "bench",
        "cpu",
        "ring",
        "packed",
        "--tiny",
        "--out",
        "{out}/bench",
    ],
    cwd="{out}",
    timeout=600,
)


@pytest.mark.background(TINY_BENCH_JOB)
def test_bench_tiny_on_cpu_writes_tables_csv_and_plots():
    """Every one-process benchmark that runs on CPU, at --tiny size, through the CLI, from outside
    the repository (a helper path once assumed the repository root)."""
    res, where = background.result(TINY_BENCH_JOB)
    out = Path(where) / "bench"
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("cpu.csv", "cpu.png", "ring.csv", "ring.png", "packed.csv"):
        assert (out / name).stat().st_size > 0, f"{name} missing or empty"
    for name in ("cpu.csv", "ring.csv", "packed.csv"):
        with open(out / name) as fh:
            rows = list(csv.DictReader(fh))
        assert rows and rows[0]["device"] and rows[0]["torch"] == torch.__version__, name
    ring = {(r["layout"], r["world"]) for r in csv.DictReader(open(out / "ring.csv"))}
    assert {("zigzag", "2"), ("contiguous", "4"), ("stripe", "4")} <= ring, ring
    packed = list(csv.DictReader(open(out / "packed.csv")))
    assert all(float(r["eff_fwd"]) > 0 and float(r["base_fwd_ms"]) > 0 for r in packed), packed
    assert "ours/sdpa" in res.stdout  # the CPU table was printed, with its baseline
    assert "hides the K/V transfer" in res.stdout  # the ring's communication bound
    assert res.stdout.count("| torch ") >= 3  # each table's header names the versions


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
def test_bench_rejects_gpu_only_benchmarks_without_cuda_and_unknown_names(capsys):
    def bench(*args):
        code = main(["bench", *args])
        return code, capsys.readouterr().err

    for name in ("attention", "decode"):
        code, err = bench(name, "--tiny")
        assert code == 2 and "needs a CUDA GPU" in err
    code, err = bench("ring_nccl")  # multi-GPU: only its --tiny smoke form runs on CPU
    assert code == 2 and "--tiny runs its smoke form" in err
    code, err = bench("frob")
    assert code == 2 and "unknown benchmark 'frob'" in err
    code, err = bench("cpu", "--tiny", "--nproc", "0")
    assert code == 2 and "--nproc must be at least 1" in err
    code, err = bench("cpu", "--tiny", "--out", "/proc/no-such-folder")
    assert code == 2 and "cannot write the results to" in err


def test_bench_child_failure_shows_the_childs_error(tmp_path, monkeypatch, capsys):
    """A failing script's own error reaches the user (not a bare exit code), the other scripts
    still run, and the run fails; from any working directory."""
    scripts = tmp_path / "checkout" / "benchmarks"
    scripts.mkdir(parents=True)
    (scripts / "bench_cpu.py").write_text(
        "print('cpu starts', flush=True)\nraise RuntimeError('the KV cache is upside down')\n"
    )
    (scripts / "bench_ring.py").write_text(
        "import argparse, pathlib\nap = argparse.ArgumentParser()\nap.add_argument('--out')\n"
        "ap.add_argument('--tiny', action='store_true')\na = ap.parse_args()\n"
        "pathlib.Path(a.out, 'ring.csv').write_text('x\\n1\\n')\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc = run_benches(["cpu", "ring"], tmp_path / "out", True, scripts, 2)
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err  # the child's traceback, as it printed it
    assert "cpu failed (exit 1): RuntimeError: the KV cache is upside down" in err, err
    assert "CalledProcessError" not in err
    assert (tmp_path / "out" / "ring.csv").is_file()  # the next script still ran


def test_child_error_takes_the_scripts_exception_not_torchruns():
    lines = [
        "Traceback (most recent call last):",
        '  File "bench_ring_nccl.py", line 3, in <module>',
        "    raise ValueError('layout zigzag needs S divisible by 2W')",
        "ValueError: layout zigzag needs S divisible by 2W",
        "E1206 torch.distributed.elastic.multiprocessing.api: failed (exitcode: 1)",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
    ]
    assert child_error(lines) == "ValueError: layout zigzag needs S divisible by 2W"
    assert child_error(["Killed"]) == "Killed"
    assert child_error([]) == "no output on stderr"


def test_every_benchmark_script_is_in_the_suite():
    """A script added to benchmarks/ is run by ``ringflash bench`` (and so by the tests below)."""
    assert sorted(f"bench_{n}" for n in BENCHES) == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_imports_and_builds_its_parser(script, monkeypatch, capsys):
    """Every script, the GPU-only ones too, imports against the library as it is now and builds
    its command line: a renamed function, launcher or config field breaks this test, not the
    script on the next GPU run."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    mod = importlib.import_module(script)
    parser = mod.build_parser()
    assert {"--out", "--tiny"} <= set(parser._option_string_actions)
    with pytest.raises(SystemExit) as stop:
        mod.main(["--help"])
    assert stop.value.code == 0
    assert "--out" in capsys.readouterr().out


def _library_names(tree: ast.Module) -> set[str]:
    names = {"ringflash"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("ringflash")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ringflash"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


@pytest.mark.parametrize("script", SCRIPTS + HELPERS)
def test_benchmark_uses_only_public_names_of_the_library(script):
    """No script reads a private name of ringflash, assigns one of its attributes or patches it:
    tunables are config fields and context managers (docs/performance.md), so a benchmark cannot
    silently time something else after a redesign."""
    tree = ast.parse((BENCH_DIR / f"{script}.py").read_text())
    lib = _library_names(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ringflash"):
            bad += [f"from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            bad += [f"from {node.module}" for part in node.module.split(".") if part.startswith("_")]
        elif isinstance(node, ast.Attribute) and _root(node) in lib and node.attr.startswith("_"):
            bad.append(f"line {node.lineno}: reads .{node.attr}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            bad += [
                f"line {node.lineno}: assigns {ast.unparse(t)}"
                for t in targets
                if isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t) in lib
            ]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            # Anywhere, not only on a library name: a helper that sets what it is given is a patch.
            if node.func.id in ("setattr", "delattr"):
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"benchmarks/{script}.py: " + "; ".join(bad)
