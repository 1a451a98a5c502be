"""The Triton decode kernels (split-KV, combine, append) under Triton's interpreter, on CPU.

``TRITON_INTERPRET=1`` only takes effect if set before Triton is first imported, and the pytest
process may already have imported Triton (other test files, torch.compile); flipping it there
would also leak into those tests. So all cases run in ONE subprocess started with the variable
set (this file doubles as the worker: ``python tests/test_decode_interp.py --worker``), which
prints one JSON line of checks per case; each test then asserts its case's checks, so failures
name the test and the check. The cases are ``test_decode.CASES`` (lengths 0, 1, 17, 999, every
num_splits, paged and cache_batch_idx caches, causal/window/softcap, GQA/MQA), plus the sharded
combine kernel on stacked partials with empty shards, the fused step (append + attend + merge
in one launch) against the three-launch path, with the semaphore counters back at 0, and planned
calls against the full path (``test_plans``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import background  # noqa: E402
from test_decode import (  # noqa: E402
    CASES,
    assert_checks,
    case_id,
    run_case,
    unchecked_bad_values,
)
from test_decode_graphs import fused_vs_unfused  # noqa: E402
from test_device_errors import bad_cu_call, cu_bounds_cases, value_bits_cases  # noqa: E402
from test_kernels import _interp_env  # noqa: E402
from test_plans import (  # noqa: E402
    PLAN_CASES,
    PREFILL_CASES,
    VARLEN_CASES,
    plans_vs_full,
    prefill_plans_vs_full,
    varlen_plans_vs_full,
)

import ringflash  # noqa: E402
from ringflash.backends import use_backend  # noqa: E402


def combine_case():
    """The stacked-partials combine (sharded path) against merge.combine_attn_partials."""
    from ringflash.kernels.decode import combine_partials
    from ringflash.merge import combine_attn_partials

    g = torch.Generator().manual_seed(3)
    W, B, Sq, H, D = 5, 2, 3, 4, 16
    outs = torch.randn(W, B, Sq, H, D, generator=g)
    lses = torch.randn(W, B, Sq, H, generator=g) * 3
    lses[1] = -math.inf  # an empty shard
    lses[:, 1, 2, 0] = -math.inf  # a row no shard saw
    outs[:, 1, 2, 0] = 0.0
    out = torch.empty(B, Sq, H, D)
    lse = torch.empty(B, H, Sq)
    combine_partials(outs, lses, out, lse, split_dim=0)
    ref_o, ref_l = combine_attn_partials(outs, lses.permute(0, 1, 3, 2))
    fin = torch.isfinite(ref_l)
    return {
        "out": [(out - ref_o).abs().max().item(), 1e-5],
        "lse": [(lse[fin] - ref_l[fin]).abs().max().item(), 1e-5],
        "lse -inf pattern": [float((torch.isinf(lse) != ~fin).sum()), 0.0],
        "no-key row out": [out[1, 2, 0].abs().max().item(), 0.0],
    }


# The 16-bit contiguous-cache cases again with the cache's K/V tiles through TMA descriptors.
TMA_CASES = [dict(c, tma="on") for c in CASES if c["dtype"] != "fp32" and not c.get("page")]
# (splits, page) of the fused-vs-unfused cases: one split, a merge of 3, paged.
FUSED_INTERP = [(1, None), (3, None), (3, 8)]
# Bad values inside skip_value_checks(): the kernels clamp into the cache.
UNCHECKED = ["lens", "cbi", "paged"]
# What ringflash.check_device_errors() names after each of them, checked by the check kernel.
WHAT_DEVICE = {
    "lens": "negative cache_seqlens",
    "cbi": "cache_batch_idx entry outside",
    "paged": "block_table entry",
}


def _reply(run) -> dict:
    """``{"checks": run()}``, or the traceback of what ``run`` raised (reported; the worker goes on)."""
    try:
        return {"checks": run()}
    except Exception:
        import traceback

        return {"error": traceback.format_exc()}


def _worker_main():
    torch.set_num_threads(1)
    proto = sys.stdout
    sys.stdout = sys.stderr  # only the protocol goes to the real stdout
    for c in CASES + TMA_CASES:
        reply = _reply(lambda c=c: run_case(dict(c, backend="triton")))
        proto.write(json.dumps({"id": case_id(c), **reply}) + "\n")
        proto.flush()
    proto.write(json.dumps({"id": "combine", "checks": combine_case()}) + "\n")
    for splits, page in FUSED_INTERP:
        checks = fused_vs_unfused("cpu", splits, page, B=3, S=48, Hq=4, Hk=2, D=16, n_new=2)
        proto.write(json.dumps({"id": f"fused-{splits}-{page}", "checks": checks}) + "\n")
    for variant in UNCHECKED:
        checks = unchecked_bad_values("cpu", "triton", variant)
        proto.write(json.dumps({"id": f"unchecked-{variant}", "checks": checks}) + "\n")
    for variant in UNCHECKED:  # the same checked on the device (the check kernel), reported after
        checks = unchecked_bad_values("cpu", "triton", variant, checks="device")
        try:
            ringflash.check_device_errors()
            checks["reported"] = [1.0, 0.0]
        except ValueError as e:
            checks["reported"] = [float(WHAT_DEVICE[variant] not in str(e)), 0.0]
        proto.write(json.dumps({"id": f"device-{variant}", "checks": checks}) + "\n")
    with use_backend("triton"):
        proto.write(json.dumps({"id": "value-bits", "checks": value_bits_cases()}) + "\n")
        # Every call runs the attention kernels under the interpreter: fewer random cases than on
        # the CPU backend (the fixed cases plant both bits)
        proto.write(json.dumps({"id": "cu-bounds", **_reply(lambda: cu_bounds_cases(10))}) + "\n")
        proto.write(json.dumps({"id": "bad-cu-call", **_reply(bad_cu_call)}) + "\n")
    for i, c in enumerate(PLAN_CASES):
        proto.write(json.dumps({"id": f"plan-{i}", **_reply(lambda c=c: plans_vs_full(c))}) + "\n")
    for i, c in enumerate(PREFILL_CASES):
        reply = _reply(lambda c=c: prefill_plans_vs_full(c))
        proto.write(json.dumps({"id": f"prefill-plan-{i}", **reply}) + "\n")
    for i, c in enumerate(VARLEN_CASES):
        reply = _reply(lambda c=c: varlen_plans_vs_full(c))
        proto.write(json.dumps({"id": f"varlen-plan-{i}", **reply}) + "\n")


WORKER_JOB = background.job(
    "decode-interp",
    [sys.executable, os.path.abspath(__file__), "--worker"],
    cwd=REPO,
    env=_interp_env(),
    timeout=400,
)
pytestmark = pytest.mark.background(WORKER_JOB)


@pytest.fixture(scope="module")
def interp_results():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    proc, _ = background.result(WORKER_JOB)
    results = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        results[r["id"]] = r
    if not results:
        raise AssertionError(
            f"interpreter worker produced nothing (code {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return results


def _get(results, cid):
    assert cid in results, f"{cid}: the worker did not report this case"
    r = results[cid]
    if "error" in r:
        raise AssertionError(f"{cid} raised in the interpreter worker:\n{r['error']}")
    return r["checks"]


@pytest.mark.parametrize("p", CASES + TMA_CASES, ids=[case_id(c) for c in CASES + TMA_CASES])
def test_decode_triton_interpreter(interp_results, p):
    assert_checks(_get(interp_results, case_id(p)), case_id(p))


def test_combine_kernel_interpreter(interp_results):
    assert_checks(_get(interp_results, "combine"), "combine")


@pytest.mark.parametrize("splits,page", FUSED_INTERP, ids=[f"splits{s}-page{p}" for s, p in FUSED_INTERP])
def test_fused_step_interpreter(interp_results, splits, page):
    cid = f"fused-{splits}-{page}"
    assert_checks(_get(interp_results, cid), cid)


@pytest.mark.parametrize("variant", UNCHECKED)
def test_unchecked_bad_values_interpreter(interp_results, variant):
    cid = f"unchecked-{variant}"
    assert_checks(_get(interp_results, cid), cid)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker_main()


@pytest.mark.parametrize("variant", UNCHECKED)
def test_device_checks_interpreter(interp_results, variant):
    """The check kernel flags each kind of bad value; the call stays inside the cache."""
    assert_checks(_get(interp_results, f"device-{variant}"), variant)


def test_check_kernel_bits_interpreter(interp_results):
    """The check kernel's bits equal the torch checks' on random calls with bad values planted."""
    assert_checks(_get(interp_results, "value-bits"), "value-bits")


@pytest.mark.parametrize("cid", ["cu-bounds", "bad-cu-call"])
def test_cu_bounds_kernel_interpreter(interp_results, cid):
    """The ``cu_seqlens`` bounds kernel against the torch operations, and a call with a bad
    ``cu_seqlens`` through the Triton kernels computing the bounded one."""
    assert_checks(_get(interp_results, cid), cid)


@pytest.mark.parametrize("i", range(len(PLAN_CASES)))
def test_planned_calls_equal_the_full_path_interpreter(interp_results, i):
    """Replayed plans (``ringflash.decode._PLANS``) against the full path, bit for bit."""
    assert_checks(_get(interp_results, f"plan-{i}"), f"plan-{i}")


@pytest.mark.parametrize("i", range(len(PREFILL_CASES)))
def test_planned_prefill_equals_the_full_path_interpreter(interp_results, i):
    """Replayed inference plans of ``flash_attn_func`` (``ringflash.ops._PLANS``), bit for bit."""
    assert_checks(_get(interp_results, f"prefill-plan-{i}"), f"prefill-plan-{i}")


@pytest.mark.parametrize("i", range(len(VARLEN_CASES)))
def test_planned_varlen_equals_the_full_path_interpreter(interp_results, i):
    """Replayed inference plans of ``flash_attn_varlen_func`` (``ringflash.ops._VARLEN_PLANS``) bit
    for bit, and a planned call's bad ``cu_seqlens`` flagged by the device check kernel."""
    assert_checks(_get(interp_results, f"varlen-plan-{i}"), f"varlen-plan-{i}")
