"""How the Triton kernels are launched, under the interpreter: a launch whose call signature was
seen binds only its tensors to the kept arguments (forward and backward), the 64-bit offset code
equals the 32-bit code, and results the kernels allocate need no fill before the launch. Each case
runs as a script in a child process (``TRITON_INTERPRET=1`` must be set before Triton loads).
"""

from __future__ import annotations

import pytest
from test_kernels import _assert_interp_script_says_same, interp_script_job

_WIDE_SCRIPT = """
import torch
from ringflash.kernels import bwd, fwd
from ringflash.kernels.options import AttnConfig
torch.manual_seed(0)
q, k, v, do = (torch.randn(1, 77, h, 32) for h in (4, 2, 2, 4))
kw = dict(softmax_scale=32 ** -0.5, causal=True)
def run(config=None):
    out, lse = fwd.attn_fwd(q, k, v, config=config, **kw)
    return (out, lse, *bwd.attn_bwd(do, q, k, v, out, lse, config=config, **kw))
narrow = run()
wide = run(AttnConfig(int64_offsets=True))  # the 64-bit loop code
for a, b in zip(narrow, wide):
    assert torch.equal(a, b), (a - b).abs().max()
print("same")
"""
WIDE_JOB = interp_script_job("launch-wide", _WIDE_SCRIPT)


_SIGNATURE_SCRIPT = """
import torch
from ringflash.kernels import fwd
torch.manual_seed(0)
kw = dict(softmax_scale=32 ** -0.5, causal=True)
def fresh(q, k, v, **more):
    fwd._FWD_LAUNCHES.clear()
    return fwd.attn_fwd(q, k, v, **kw, **more)
q, k, v = (torch.randn(2, 40, h, 32) for h in (4, 2, 2))
first = fwd.attn_fwd(q, k, v, **kw)
assert len(fwd._FWD_LAUNCHES) == 1
q2, k2, v2 = (torch.randn_like(x) for x in (q, k, v))
again = fwd.attn_fwd(q2, k2, v2, **kw)  # the same signature: the kept arguments, new tensors
assert len(fwd._FWD_LAUNCHES) == 1
for a, b in zip(again, fresh(q2, k2, v2)):
    assert torch.equal(a, b)
qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same shape, other strides
for a, b in zip(fwd.attn_fwd(qt, k, v, **kw), first):
    assert torch.equal(a, b)
cu = torch.tensor([0, 9, 40, 80], dtype=torch.int32)
flat = [x.flatten(0, 1) for x in (q, k, v)]
pk = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=40, max_seqlen_k=40)
one = fwd.attn_fwd(*flat, **kw, **pk)
two = fwd.attn_fwd(*flat, **kw, **pk, diag_offset=torch.tensor([0, 3, -2], dtype=torch.int32))
for a, b in zip(two, fresh(*flat, **pk, diag_offset=torch.tensor([0, 3, -2], dtype=torch.int32))):
    assert torch.equal(a, b)
assert not torch.equal(one[1], two[1])
print("same")
"""
SIGNATURE_JOB = interp_script_job("launch-signature", _SIGNATURE_SCRIPT)


@pytest.mark.background(SIGNATURE_JOB)
def test_kernels_launch_arguments_kept_per_signature_under_interpreter():
    """A forward call whose signature was seen binds only its tensors to the kept arguments: the
    same results as deriving them again, for other data, other strides and per-sequence diagonals."""
    _assert_interp_script_says_same(SIGNATURE_JOB)


_BWD_SIGNATURE_SCRIPT = """
import torch
from ringflash.kernels import bwd, fwd
torch.manual_seed(0)
kw = dict(softmax_scale=32 ** -0.5, causal=True)
def grads(q, k, v, do, fresh=False, **more):
    out, lse = fwd.attn_fwd(q, k, v, **kw, **more)
    if fresh:
        bwd._BWD_LAUNCHES.clear()
    return bwd.attn_bwd(do, q, k, v, out, lse, **kw, **more)
def added(q, k, v, do, fresh=False, **more):  # into given float32 buffers, dQ written in q's dtype
    out, lse = fwd.attn_fwd(q, k, v, **kw, **more)
    if fresh:
        bwd._BWD_LAUNCHES.clear()
    dq, dk, dv = torch.zeros_like(q), torch.ones(k.shape), torch.ones(v.shape)
    return bwd.attn_bwd(do, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, accumulate=(False, True), **kw, **more)
q, k, v = (torch.randn(2, 40, h, 32) for h in (4, 2, 2))
do = torch.randn_like(q)
grads(q, k, v, do)
n = len(bwd._BWD_LAUNCHES)
q2, k2, v2, do2 = (torch.randn_like(x) for x in (q, k, v, do))
for a, b in zip(grads(q2, k2, v2, do2), grads(q2, k2, v2, do2, fresh=True)):
    assert torch.equal(a, b)
assert len(bwd._BWD_LAUNCHES) == n
qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # the same shape, other strides
for a, b in zip(grads(qt, k, v, do), grads(q, k, v, do)):
    assert torch.equal(a, b)
added(q, k, v, do)
for a, b in zip(added(q2, k2, v2, do2), added(q2, k2, v2, do2, fresh=True)):
    assert torch.equal(a, b)
cu = torch.tensor([0, 9, 40, 80], dtype=torch.int32)
flat = [x.flatten(0, 1) for x in (q, k, v, do)]
pk = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=40, max_seqlen_k=40)
diag = torch.tensor([0, 3, -2], dtype=torch.int32)
one = grads(*flat, **pk)
two = grads(*flat, **pk, diag_offset=diag)  # the same signature, other per-sequence diagonals
for a, b in zip(two, grads(*flat, **pk, diag_offset=diag, fresh=True)):
    assert torch.equal(a, b)
assert not torch.equal(one[0], two[0])
print("same")
"""
BWD_SIGNATURE_JOB = interp_script_job("launch-bwd-signature", _BWD_SIGNATURE_SCRIPT)


@pytest.mark.background(BWD_SIGNATURE_JOB)
def test_kernels_backward_arguments_kept_per_signature_under_interpreter():
    """The backward's derived launch arguments are kept per call signature too: a repeated
    signature gives the same gradients as deriving them again (other data, strides, write modes,
    per-sequence diagonals)."""
    _assert_interp_script_says_same(BWD_SIGNATURE_JOB)


_UNSEEN_SCRIPT = """
import torch
from unittest import mock
from ringflash.kernels import bwd, fwd
torch.manual_seed(0)
cu_q = torch.tensor([0, 5, 9, 9, 16], dtype=torch.int32)  # sequence 1: rows 5-8, no keys
cu_k = torch.tensor([0, 7, 7, 12, 20], dtype=torch.int32)  # sequence 2: keys 7-11, no queries
q, k, v = torch.randn(16, 4, 32), torch.randn(20, 2, 32), torch.randn(20, 2, 32)
dout = torch.randn(16, 4, 32)
kw = dict(softmax_scale=32 ** -0.5, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=7, max_seqlen_k=8)
real = torch.empty
def recycled(*a, **k):  # memory as a caching allocator hands it back: anything, here NaN
    t = real(*a, **k)
    return t.fill_(float("nan")) if t.is_floating_point() else t
with mock.patch.object(torch, "empty", recycled):
    out, lse = fwd.attn_fwd(q, k, v, **kw)
    dq, dk, dv = bwd.attn_bwd(dout, q, k, v, out, lse, **kw)
assert (out[5:9] == 0).all() and (lse[:, 5:9] == float("-inf")).all()
assert (dq[5:9] == 0).all() and (dk[7:12] == 0).all() and (dv[7:12] == 0).all()
assert not any(x.isnan().any() for x in (out, lse, dq, dk, dv))
o2, l2 = torch.full_like(out, 7.0), torch.full_like(lse, 3.0)  # given buffers: those rows kept
fwd.attn_fwd(q, k, v, **kw, out=o2, lse=l2, merge=False)
assert (o2[5:9] == 7).all() and (l2[:, 5:9] == 3).all()
rows, keys = [*range(5), *range(9, 16)], [*range(7), *range(12, 20)]
assert torch.equal(o2[rows], out[rows]) and torch.equal(l2[:, rows], lse[:, rows])
g = [torch.full_like(x, 7.0) for x in (q, k, v)]
bwd.attn_bwd(dout, q, k, v, out, lse, dq=g[0], dk=g[1], dv=g[2], accumulate=(False, False), **kw)
assert (g[0][5:9] == 7).all() and (g[1][7:12] == 7).all() and (g[2][7:12] == 7).all()
assert torch.equal(g[0][rows], dq[rows])
assert torch.equal(g[1][keys], dk[keys]) and torch.equal(g[2][keys], dv[keys])
print("same")
"""
UNSEEN_JOB = interp_script_job("launch-unseen", _UNSEEN_SCRIPT)


@pytest.mark.background(UNSEEN_JOB)
def test_kernels_packed_results_need_no_fill_under_interpreter():
    """A packed forward and backward that allocate their results write every row themselves, those
    of a sequence with no keys (or no queries) as 0 and -inf / zero gradients (no zero fill before
    the launches), while given buffers keep them."""
    _assert_interp_script_says_same(UNSEEN_JOB)


@pytest.mark.background(WIDE_JOB)
def test_kernels_wide_offset_code_matches_under_interpreter():
    """The 64-bit loop code (used when offsets pass 2^31 elements, see the CUDA test below) gives
    the same results as the 32-bit code; forced on at a small shape under the interpreter."""
    _assert_interp_script_says_same(WIDE_JOB)


_ROWS_SCRIPT = """
import torch
from ringflash.backends import Backend
from ringflash.kernels.rows import gather_rows, sum_rows_into
torch.manual_seed(0)
n, heads, dim = 37, 3, 24
parts = torch.randn(150, heads, dim)
parts[5] = -0.0
sources = torch.randint(-1, 150, (4, 2 * n))
sources[:, 3] = -1  # a row no source sends: zeros
rows = torch.randperm(60)[:n]
for dtype in (torch.float32, torch.bfloat16):
    grads = [torch.full((60, 5, dim), float("nan"), dtype=dtype) for _ in range(4)]
    views = [g[:, 1 : 1 + heads] for g in grads]  # a head slice, strided as a piece of KV heads
    sum_rows_into(parts, views[0], views[1], sources, rows)
    Backend().sum_rows_into(parts, views[2], views[3], sources, rows)  # the torch operations
    for a, b in ((grads[0], grads[2]), (grads[1], grads[3])):
        mine, ref = a[rows, 1 : 1 + heads].float(), b[rows, 1 : 1 + heads].float()
        # float32: the same bits; bfloat16: the interpreter rounds its cast toward zero where the
        # compiled kernel and torch round to nearest (bitwise on a GPU: the CUDA test)
        ulp = 0.0 if dtype == torch.float32 else 2.0**-7
        assert torch.allclose(mine, ref, rtol=ulp, atol=0.0), (mine - ref).abs().max()
        untouched = torch.ones(60, dtype=torch.bool)
        untouched[rows] = False
        assert a[untouched].isnan().all() and a[:, 0].isnan().all(), "rows and heads outside kept"
    assert torch.equal(grads[0][rows[3]][1 : 1 + heads], torch.zeros(heads, dim, dtype=dtype))
    want = sum(parts[s] for s in sources[:, n + 7].tolist() if s >= 0)
    got = grads[3][rows[7], 1 : 1 + heads]
    assert torch.equal(got, (0.0 + want).to(dtype)), "the torch operations: 0 + each source in order"
k, v = torch.randn(60, 5, dim), torch.randn(60, 5, dim)
for dtype in (torch.float32, torch.bfloat16):
    ks, vs = k.to(dtype)[:, 1 : 1 + heads], v.to(dtype)[:, 1 : 1 + heads]  # strided head slices
    pick = torch.cat([torch.randperm(120)[:50], torch.tensor([0, 59, 60, 119])])  # both ends of each
    got = gather_rows(ks, vs, pick)
    assert got.is_contiguous() and torch.equal(got, Backend().gather_rows(ks, vs, pick)), dtype
    assert gather_rows(ks, vs, pick[:0]).shape == (0, heads, dim)
print("same")
"""
ROWS_JOB = interp_script_job("launch-rows", _ROWS_SCRIPT)


@pytest.mark.background(ROWS_JOB)
def test_rows_summed_from_sources_equal_the_torch_operations_under_interpreter():
    """The one-pass sum of the all-gather's returned dK/dV rows (``kernels.rows``) gives the torch
    operations' float32 sums (in source order; their bfloat16 cast to the interpreter's rounding),
    writes only its rows and heads of a strided gradient, and zeros where no source sends a row;
    the one-pass gather of outgoing rows from strided K and V equals their concatenation's select."""
    _assert_interp_script_says_same(ROWS_JOB)
