"""launch/train_hf_llama.py end to end on 2 CPU ranks (gloo), tiny: every ``--attn`` mode, one sequence
per row and packed documents, under FSDP2 and DeepSpeed ZeRO (torchrun, and the deepspeed launcher
where it starts on CPU); the example checks its last step against one process and prints PASS."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import background
import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TINY = ["--steps", "2", "--seq-len", "128"]


def _run(cmd: list[str], timeout: float = 180) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return _checked(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout))


def _checked(proc: subprocess.CompletedProcess) -> str:
    """The example's stdout; it must have exited 0 and printed one PASS line."""
    cmd, out = proc.args, proc.stdout + proc.stderr
    # The lines that say why (a rank's error or abort), then the end of the output.
    why = "\n".join(ln for ln in out.splitlines() if re.search(r"Error|error:|terminate|what\(\)", ln))
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{why[-3000:]}\n...\n{out[-3000:]}"
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert len(lines) == 1 and lines[0].startswith("PASS"), out[-4000:]
    return proc.stdout


def _needs_deepspeed(args: list[str]) -> bool:
    return "alst" in args or "--zero" in args


CASES = {
    "ring-fsdp2-offloaded-activations-lean-norms": [
        "--attn",
        "ring",
        "--offload-activations",
        "--lean-norms",
    ],
    "ring-zero2-packed": ["--attn", "ring", "--zero", "2", "--packed"],
    "ulysses-fsdp2-offload-packed": ["--attn", "ulysses", "--offload", "--packed"],
    "ulysses-zero3-tiled-lean-norms": ["--attn", "ulysses", "--zero", "3", "--tiled", "--lean-norms"],
    "hybrid-fsdp2-tiled-packed": ["--attn", "hybrid", "--tiled", "--packed"],
    # 3 q heads over 2 ranks: the hybrid's Ulysses degree is gcd(3, 2) = 1, so the ring runs.
    "hybrid-ring-fsdp2": ["--attn", "hybrid", "--heads", "3", "--kv-heads", "1", "--hidden", "48"],
    "alst-fsdp2": ["--attn", "alst"],
}


# Each case is a background job (tests/background.py): the launches run beside the other tests.
JOBS = {
    name: background.job(
        f"train-hf-{name}",
        [*TORCHRUN, "launch/train_hf_llama.py", *args, *TINY],
        cwd=str(ROOT),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=180,
    )
    for name, args in CASES.items()
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.background(JOBS[n])) for n in CASES], ids=list(CASES)
)
def test_train_hf_llama_torchrun(name):
    args = CASES[name]
    if _needs_deepspeed(args):
        pytest.importorskip("deepspeed")
    out = _checked(background.result(JOBS[name])[0])
    if "--offload-activations" in args:
        assert "FSDP2 + offloaded activations + lean norms" in out, out
    if "hybrid" in args:
        assert ("ulysses 1 x ring 2" if "3" in args else "ulysses 2 x ring 1") in out, out


ALST_SCRIPT_JOB = background.job(
    "train-hf-alst-script",
    ["bash", "launch/train_hf_llama_cpu.sh", "2", "--tiled", "--packed", *TINY],
    cwd=str(ROOT),
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    timeout=180,
)


@pytest.mark.background(ALST_SCRIPT_JOB)
def test_train_hf_llama_alst_zero3_on_cpu_script():
    """ALST (ringflash as DeepSpeed's core attention), ZeRO-3, tiled MLP and loss, packed documents:
    launch/train_hf_llama_cpu.sh (torchrun starts the ranks, as launch/deepspeed_run_cpu.sh does)."""
    pytest.importorskip("deepspeed")
    out = _checked(background.result(ALST_SCRIPT_JOB)[0])
    assert "attn alst, ZeRO-3 + tiled + packed" in out, out


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_train_hf_llama_under_the_deepspeed_launcher():
    """The deepspeed launcher itself (DeepSpeed's CPU accelerator counts the CPU ranks as devices):
    ALST with ZeRO-3 and the optimizer state offloaded."""
    with socket.socket() as s:  # the launcher's default port (29500) may be taken by another job
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port]
    cmd += ["launch/train_hf_llama.py", "--attn", "alst", "--zero", "3"]
    out = _run([*cmd, "--offload", *TINY])
    assert "attn alst, ZeRO-3 + offload" in out, out
