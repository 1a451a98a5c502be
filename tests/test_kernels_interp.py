"""Triton kernels (``ringflash.kernels``) against the float64 oracle under Triton's interpreter, on
CPU: the cases of ``test_kernels.run_case`` at small shapes (masks, windows, softcap, GQA, varlen,
diagonal offsets, accumulate mode, the split-KV forward), the 16-bit ones again through TMA
descriptors, and ``flash_attn_func`` / ``flash_attn_varlen_func`` plus the whole local suite on the
Triton backend.

The interpreter only works when ``TRITON_INTERPRET=1`` is set before Triton is first imported. The
pytest process may already have imported Triton (other test files, torch.compile), and flipping the
variable there would leak into them, so the cases run in ONE worker subprocess started with the
variable set: this file doubles as the worker (``python tests/test_kernels_interp.py --worker``),
reading one JSON case per line on stdin and answering one JSON line of measured errors and their
bounds. Each test sends its case and asserts every bound, so failures still name the test and the
tensor. The worker starts once per module (the interpreter is slow; shapes are small). The ops and
the local suite run in child processes of their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback

import background
import pytest
import torch
from test_kernels import (
    REPO,
    _assert_checks,
    _assert_interp_script_says_same,
    _case_id,
    _interp_env,
    _pad,
    interp_script_job,
    run_case,
)


def _worker_main():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    proto = sys.stdout
    sys.stdout = sys.stderr  # only the protocol goes to the real stdout
    torch.set_num_threads(1)
    for line in sys.stdin:
        try:
            reply = {"checks": run_case(json.loads(line))}
        except Exception:  # report, keep serving the other cases
            reply = {"error": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            cwd=REPO,
            env=_interp_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, case):
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"interpreter worker exited with code {self.proc.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise AssertionError("case raised in the worker:\n" + reply["error"])
        return reply["checks"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def interp():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    w = _Worker()
    yield w
    w.close()


CPU_CASES = [
    _pad(2, 1, 1, 2, 2, 32, "fp32"),
    _pad(2, 17, 17, 4, 2, 32, "fp32", causal=True),
    _pad(1, 127, 127, 2, 1, 80, "bf16", causal=True),
    _pad(1, 17, 45, 8, 2, 32, "fp16", causal=True),
    _pad(1, 45, 17, 2, 2, 32, "fp32", causal=True, expect_masked=True),
    _pad(1, 45, 17, 4, 2, 32, "bf16", causal=True, expect_masked=True),
    _pad(1, 64, 64, 4, 1, 128, "bf16"),
    _pad(1, 127, 127, 2, 2, 80, "fp16"),
    _pad(1, 40, 40, 2, 2, 64, "fp32", window=(8, 3)),
    _pad(1, 40, 40, 2, 2, 32, "fp16", causal=True, window=(5, -1)),
    _pad(1, 20, 50, 2, 1, 32, "fp32", window=(10, 0)),
    _pad(1, 33, 33, 2, 2, 32, "fp32", causal=True, softcap=5.0),
    _pad(1, 33, 40, 2, 2, 32, "bf16", softcap=30.0),
    _pad(1, 20, 20, 1, 1, 256, "fp32", causal=True),
    # Head dims that are no power of two (MLA-style 192 among them): padded tiles, masked columns.
    _pad(1, 33, 40, 2, 1, 192, "bf16", causal=True),
    _pad(1, 20, 20, 2, 2, 192, "fp32", window=(6, 2)),
    _pad(1, 17, 30, 2, 1, 96, "fp16", causal=True),
    _pad(1, 30, 50, 2, 2, 32, "fp32", causal=True, diag=-10, expect_masked=True),
    _pad(1, 30, 50, 2, 1, 32, "fp32", causal=True, diag=70),
    _pad(1, 33, 33, 2, 2, 32, "bf16", causal=True, qkv_packed=True),
    dict(
        lens_q=[1, 17, 40, 3],
        lens_k=[1, 17, 40, 0],
        Hq=2,
        Hk=2,
        D=32,
        dtype="fp32",
        causal=True,
        expect_masked=True,
    ),
    dict(lens_q=[5, 33, 1], lens_k=[20, 33, 9], Hq=4, Hk=2, D=32, dtype="bf16"),
    dict(
        lens_q=[9, 30, 4],
        lens_k=[9, 25, 12],
        Hq=2,
        Hk=1,
        D=32,
        dtype="fp32",
        causal=True,
        diag=[0, -3, 5],
        expect_masked=True,
    ),
    dict(lens_q=[20, 7], lens_k=[31, 7], Hq=2, Hk=2, D=64, dtype="fp16", window=(6, 2), softcap=10.0),
    _pad(1, 48, 48, 4, 2, 32, "fp32", causal=True, accumulate=True),
    _pad(2, 33, 50, 2, 2, 32, "bf16", accumulate=True),
    _pad(1, 40, 40, 2, 2, 32, "fp32", causal=True, accumulate=True, diag=-8, expect_masked=True),
    dict(lens_q=[3, 30, 1], lens_k=[3, 41, 8], Hq=4, Hk=2, D=32, dtype="fp32", causal=True, accumulate=True),
    # A few query rows against >= 1024 keys: the forward goes through the split-KV decode kernel.
    _pad(1, 1, 1100, 4, 2, 32, "fp32", causal=True, split_kv=True),
    _pad(1, 3, 1100, 4, 1, 32, "bf16", window=(200, 0), softcap=10.0, split_kv=True),
    _pad(2, 2, 1030, 2, 2, 32, "fp32", causal=True, diag=-5, expect_masked=True, split_kv=True),
    _pad(1, 1, 1030, 4, 2, 192, "bf16", causal=True, split_kv=True),
    _pad(1, 2, 1030, 2, 1, 80, "fp16", causal=True, split_kv=True),
    _pad(1, 3, 1000, 4, 1, 32, "fp32", causal=True, split_kv=False),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=[_case_id(c) for c in CPU_CASES])
def test_kernels_interpreter(interp, case):
    _assert_checks(interp.run(case), _case_id(case))


# The 16-bit cases again with TMA descriptors in the kernels (zero-filled tails instead of masks).
TMA_CASES = [dict(c, tma="on") for c in CPU_CASES if c["dtype"] != "fp32" and not c.get("split_kv")]


@pytest.mark.parametrize("case", TMA_CASES, ids=[_case_id(c) for c in TMA_CASES])
def test_kernels_interpreter_tma(interp, case):
    _assert_checks(interp.run(case), _case_id(case))


_OPS_SCRIPT = """
import torch
from ringflash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, use_backend
torch.manual_seed(0)
q, k, v, do = (torch.randn(2, 37, h, 32, dtype=torch.float64).float() for h in (4, 2, 2, 4))
cu = torch.tensor([0, 5, 30, 41], dtype=torch.int32)
qp, kp, vp, dop = (torch.randn(41, h, 32) for h in (4, 2, 2, 4))
def grads(backend):
    with use_backend(backend):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse, _ = flash_attn_func(*xs, causal=True, return_attn_probs=True)
        ((out * do).sum() + lse.exp().sum() * 0.1).backward()  # a gradient into the LSE too
        ys = [t.clone().requires_grad_() for t in (qp, kp, vp)]
        o2 = flash_attn_varlen_func(*ys, cu, cu, 25, 25, causal=True)
        (o2 * dop).sum().backward()
    return [out, lse] + [x.grad for x in xs] + [o2] + [y.grad for y in ys]
ref, got = grads("torch"), grads("triton")
for i, (a, b) in enumerate(zip(ref, got)):
    err = (a - b).abs().max().item()
    assert err < 1e-4 * max(1.0, a.abs().max().item()), (i, err)
# A NaN key (seen by every row of its batch row under the causal mask) gives NaN rows and LSEs
# there, forward and decoding, so a merge of the partial carries it; the other batch row is finite.
kn = k.clone()
kn[0, 0, 0, 0] = float("nan")
lens = torch.full((2,), 37, dtype=torch.int32)
with use_backend("triton"):
    out, lse, _ = flash_attn_func(q, kn, v, causal=True, return_attn_probs=True)
    q1 = q[:, :1].contiguous()
    o1, l1 = flash_attn_with_kvcache(q1, kn, v, cache_seqlens=lens, return_softmax_lse=True)
for o, l in ((out, lse), (o1, l1)):
    assert o[0, :, :2].isnan().all() and l[0, :2].isnan().all() and o[1].isfinite().all(), "NaN key"
print("same")
"""


OPS_JOB = interp_script_job("ops-autograd-interp", _OPS_SCRIPT)
LOCAL_SUITE_JOB = background.job(
    "local-suite-interp",
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_local.py"],
    cwd=REPO,
    env=_interp_env(RINGFLASH_TEST_BACKEND="triton"),
    timeout=900,
)


@pytest.mark.background(OPS_JOB)
def test_ops_autograd_through_triton_backend_under_interpreter():
    """flash_attn_func / flash_attn_varlen_func with autograd on the Triton backend (the delta
    kernel, dK/dV and dQ, an LSE gradient folded into delta) match the PyTorch backend; under the
    interpreter at a small shape."""
    _assert_interp_script_says_same(OPS_JOB)


@pytest.mark.background(LOCAL_SUITE_JOB)
def test_local_suite_through_triton_backend_under_interpreter():
    """The whole local test suite (``tests/test_local.py``: masks, GQA, varlen, softcap, odd
    lengths, fully masked rows, LSE gradients, torch.compile) with every call on the Triton kernels
    under the interpreter (``RINGFLASH_TEST_BACKEND``, see conftest.py)."""
    pytest.importorskip("triton")
    r, _ = background.result(LOCAL_SUITE_JOB)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    ok = r.returncode == 0 and " passed" in summary and "failed" not in summary and "error" not in summary
    assert ok, r.stdout[-3000:] + r.stderr[-2000:]


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()
