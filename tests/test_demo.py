"""`ringflash demo`: impossible configurations, the end-to-end run on CPU, and a broken reference."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ringflash.demo.run import DemoError, plan


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=4, seq_len=6, layout="zigzag"), "too short for 4 ranks"),
        (dict(world_size=3, seq_len=100, layout="zigzag"), "does not divide into 6 equal chunks"),
        (dict(world_size=2, seq_len=64, layout="diagonal"), "unknown layout"),
        (dict(world_size=0, seq_len=64), "at least 1"),
        (dict(world_size=2, seq_len=64, device="cuda"), "no CUDA GPU"),
        (dict(world_size=1, seq_len=64, steps=0), "--steps must be at least 1"),
        (dict(world_size=1, seq_len=64, gen_tokens=0), "--gen-tokens must be at least 1"),
    ],
    ids=["too-short", "not-divisible", "bad-layout", "zero-ranks", "no-gpu", "no-steps", "no-tokens"],
)
def test_plan_rejects_impossible_combinations(kwargs, match):
    with pytest.raises(DemoError, match=match):
        plan(**kwargs)


def _demo(*args):
    cmd = [sys.executable, "-m", "ringflash.cli", "demo", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_bad_combination_is_one_line_and_nonzero():
    res = _demo("--world-size", "3", "--seq-len", "100")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "does not divide" in res.stderr


def test_demo_two_ranks_passes_its_checks():
    res = _demo("--world-size", "2", "--seq-len", "128", "--steps", "2", "--gen-tokens", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    for check in ("loss/grad match", "tokens match", "ranks agree"):
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(check))
        assert line.rstrip().endswith("PASS"), line


def test_demo_fails_against_a_broken_reference():
    res = _demo(
        "--world-size",
        "2",
        "--seq-len",
        "128",
        "--steps",
        "1",
        "--gen-tokens",
        "2",
        "--break-reference",
        "1.1",
    )
    assert res.returncode == 1, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("loss/grad match"))
    assert line.rstrip().endswith("FAIL")


def test_demo_under_torchrun_uses_the_launched_ranks():
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "ringflash.cli",
        "demo",
        "--seq-len",
        "64",
        "--steps",
        "1",
        "--gen-tokens",
        "2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("world size") == 1  # only rank 0 prints the table
    assert any(ln.startswith("world size") and ln.rstrip().endswith("2") for ln in res.stdout.splitlines())
    assert "tokens match      PASS" in res.stdout


def test_sharded_inference_example_matches_one_process_token_by_token():
    script = Path(__file__).resolve().parent.parent / "launch" / "generate_sharded.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(script),
        "--prompt-len",
        "96",
        "--new-tokens",
        "5",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    sharded = next(ln for ln in lines if ln.startswith("tokens (sharded)")).split(":", 1)[1]
    single = next(ln for ln in lines if ln.startswith("tokens (one process)")).split(":", 1)[1]
    assert sharded.strip() == single.strip() and len(ast.literal_eval(sharded.strip())) == 5
    assert any(ln.startswith("OK: 2 rank(s)") for ln in lines)
