"""The ``"cudnn"`` backend: which calls cuDNN serves (CPU), and its results against the float64
oracle, alone and under the ring (CUDA)."""

from __future__ import annotations

import pytest
import torch

import ringflash as rf
from ringflash import cudnn
from ringflash.backends import CudnnBackend, TorchBackend
from ringflash.reference import attention_ref
from tests.oracle import assert_matches, max_err

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cudnn.available()), reason="needs CUDA cuDNN")


def _meta(sq, sk, hq=8, hk=2, d=64, dtype=torch.bfloat16):
    q = torch.empty(2, sq, hq, d, dtype=dtype, device="meta")
    k = torch.empty(2, sk, hk, d, dtype=dtype, device="meta")
    return q, k, torch.empty_like(k)


# (what, call options, (Sq, Sk), head dim, dtype, served)
RULES = [
    ("no mask", dict(), (100, 300), 64, torch.bfloat16, True),
    ("causal square", dict(causal=True), (256, 256), 128, torch.float16, True),
    ("causal square at diagonal 0", dict(causal=True, diag_offset=0), (256, 256), 64, torch.bfloat16, True),
    ("causal, window (-1, 0)", dict(causal=True, window_size=(-1, 0)), (64, 64), 64, torch.bfloat16, True),
    ("causal, every key visible", dict(causal=True, diag_offset=299), (100, 300), 64, torch.bfloat16, True),
    ("causal bottom-right, Sq != Sk", dict(causal=True), (100, 300), 64, torch.bfloat16, False),
    ("causal at another diagonal", dict(causal=True, diag_offset=5), (64, 64), 64, torch.bfloat16, False),
    ("causal, one diagonal per sequence", dict(causal=True, diag_offset=torch.zeros(2)), (64, 64), 64,
     torch.bfloat16, False),
    ("sliding window", dict(window_size=(16, 16)), (64, 64), 64, torch.bfloat16, False),
    ("softcap", dict(softcap=30.0), (64, 64), 64, torch.bfloat16, False),
    ("packed", dict(cu_seqlens_q=torch.zeros(3, dtype=torch.int32)), (64, 64), 64, torch.bfloat16, False),
    ("float32", dict(), (64, 64), 64, torch.float32, False),
    ("head dim 80", dict(), (64, 64), 80, torch.bfloat16, True),
    ("head dim 100", dict(), (64, 64), 100, torch.bfloat16, False),
    ("head dim 256", dict(), (64, 64), 256, torch.bfloat16, False),
    ("no query rows", dict(), (0, 64), 64, torch.bfloat16, False),
]  # fmt: skip


@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_which_calls_cudnn_serves(rule):
    """The shapes and masks cuDNN computes exactly; everything else goes to the next backend."""
    _, opts, (sq, sk), d, dtype, served = rule
    q, k, v = _meta(sq, sk, d=d, dtype=dtype)
    assert cudnn.fits(q, k, v, softmax_scale=0.1, **opts) is served


def test_cudnn_backend_sends_what_it_does_not_serve_to_the_next():
    """CPU tensors are never cuDNN's: the backend's calls give the torch backend's results, bit
    for bit (forward, backward, delta)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 40, 4, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    kw = dict(softmax_scale=0.25, causal=True)
    be, ref = CudnnBackend(), TorchBackend()
    out, lse = be.attn_fwd(q, k, v, **kw)
    want = ref.attn_fwd(q, k, v, **kw)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    dout = torch.randn_like(out)
    delta = be.attn_bwd_delta(dout, out)
    assert torch.equal(delta, ref.attn_bwd_delta(dout, out))
    for a, b in zip(
        be.attn_bwd(dout, q, k, v, out, lse, delta=delta, **kw),
        ref.attn_bwd(dout, q, k, v, out, lse, delta=delta, **kw),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_only_plain_deltas_reach_cudnn():
    """A delta the backend made is ``rowsum(dout * out)``, which cuDNN recomputes; one with more
    folded in (an LSE gradient) must take the next backend."""
    dout, out = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    delta = CudnnBackend().attn_bwd_delta(dout, out)
    assert cudnn.plain_delta(delta) and cudnn.plain_delta(None) and cudnn.plain_delta(delta[..., 2:5])
    assert not cudnn.plain_delta(delta - 1.0)
    assert torch.allclose(delta, (dout * out).sum(-1).transpose(1, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_asking_for_cudnn_without_it_says_how_to_get_it():
    with pytest.raises(ValueError, match="backend 'cudnn' asked for.*CUDA build of torch"):
        with rf.use_backend("cudnn"):
            pass


def _oracle(q, k, v, dout, causal):
    """``(out, lse, grads)`` of the float64 oracle and ``(out, grads)`` of plain PyTorch in the
    inputs' precision (the error that ``assert_matches`` scales)."""
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_ref(q64, k64, v64, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    low_out, _ = attention_ref(ql, kl, vl, causal=causal, upcast=False)
    low_grads = torch.autograd.grad(low_out, (ql, kl, vl), dout)
    return (ref_out, ref_lse, ref_grads), (low_out, low_grads)


# (B, Sq, Sk, Hq, Hk, D, causal)
GPU_CASES = [
    (2, 512, 512, 8, 8, 128, True),
    (1, 1000, 1000, 8, 2, 64, True),
    (2, 300, 700, 8, 2, 128, False),
]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"S{c[1]}x{c[2]}-H{c[3]}:{c[4]}-D{c[5]}" for c in GPU_CASES])
def test_cudnn_matches_oracle(case, dtype):
    B, Sq, Sk, Hq, Hk, D, causal = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, s, h, D, device="cuda", generator=g).to(dtype) for s, h in
               ((Sq, Hq), (Sk, Hk), (Sk, Hk)))  # fmt: skip
    dout = torch.randn(B, Sq, Hq, D, device="cuda", generator=g).to(dtype)
    (ref_out, ref_lse, ref_grads), (low_out, low_grads) = _oracle(q, k, v, dout, causal)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with rf.use_backend("cudnn"):
        assert cudnn.serves(qs, ks, vs, softmax_scale=D**-0.5, causal=causal)
        out, lse, _ = rf.flash_attn_func(qs, ks, vs, causal=causal, return_attn_probs=True)
        grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    assert_matches("out", out, ref_out, low_out, 2)
    lse_err = max_err(lse, ref_lse)  # natural log, float32 statistics of 16-bit scores
    assert lse_err < 1e-3, f"lse: max error {lse_err:.3g}"
    for name, got, ref, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, strict=True):
        assert_matches(name, got, ref, low, 3)


@cuda
def test_cudnn_merges_into_a_running_state_and_falls_back_for_other_masks():
    """Accumulate mode (two key halves merged by LSE) equals one call; a windowed call under
    ``use_backend("cudnn")`` is the Triton kernel's, bit for bit."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (
        torch.randn(1, 256, h, 64, device="cuda", generator=g, dtype=torch.bfloat16) for h in (4, 2, 2)
    )
    be = rf.backends.get_backend("cudnn")
    kw = dict(softmax_scale=0.125)
    whole = be.attn_fwd(q, k, v, **kw)
    out = torch.zeros(1, 256, 4, 64, device="cuda")
    lse = torch.full((1, 4, 256), float("-inf"), device="cuda")
    for half in (slice(0, 128), slice(128, 256)):
        be.attn_fwd(q, k[:, half], v[:, half], out=out, lse=lse, **kw)
    assert (out - whole[0].float()).abs().max().item() < 2e-2
    assert (lse - whole[1]).abs().max().item() < 1e-3
    win = dict(kw, causal=True, window_size=(32, 0))
    assert not cudnn.serves(q, k, v, **win)
    got = be.attn_fwd(q, k, v, **win)
    want = rf.backends.get_backend("triton").attn_fwd(q, k, v, **win)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@cuda
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_with_cudnn_steps_matches_oracle(layout):
    """The simulated ring (W = 4) with its local steps on cuDNN: forward and backward against the
    float64 oracle (float32 merges, so the error does not grow with the ranks)."""
    from ringflash.parallel import shard_for
    from ringflash.parallel.simulate import simulate_ring_attn, simulate_ring_attn_backward

    W, S, H, D = 4, 2048, 8, 128
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, dout = (
        torch.randn(1, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)
    )
    shards = [[shard_for(x, r, W, 1, layout) for r in range(W)] for x in (q, k, v, dout)]
    with rf.use_backend("cudnn"):
        outs, lses, _ = simulate_ring_attn(*shards[:3], layout, causal=True)
        *grads, _ = simulate_ring_attn_backward(shards[3], *shards[:3], outs, lses, layout, causal=True)
    (ref_out, _, ref_grads), (low_out, low_grads) = _oracle(q, k, v, dout, True)
    ref_shards = [[shard_for(x, r, W, 1, layout) for r in range(W)] for x in (ref_out, low_out)]
    for r in range(W):
        assert_matches(f"out rank {r}", outs[r], ref_shards[0][r], ref_shards[1][r], 2)
    for i, name in enumerate(("dq", "dk", "dv")):
        for r in range(W):
            ref = shard_for(ref_grads[i], r, W, 1, layout)
            low = shard_for(low_grads[i], r, W, 1, layout)
            assert_matches(f"{name} rank {r}", grads[i][r], ref, low, 3)


@cuda
def test_ring_error_on_cudnn_steps_does_not_grow_with_the_ranks():
    """Drift: cuDNN returns bf16 partials, which the ring merges in float32. The zigzag ring's error
    against the float64 oracle at 8 ranks stays within 1.5x of 2 ranks', forward and backward."""
    from ringflash.parallel import shard_for, unshard_from
    from ringflash.parallel.simulate import simulate_ring_attn, simulate_ring_attn_backward

    S, H, D = 4096, 8, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, dout = (
        torch.randn(1, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)
    )
    (ref_out, _, ref_grads), _ = _oracle(q, k, v, dout, True)
    errs = {}
    for W in (2, 8):
        shards = [[shard_for(x, r, W, 1, "zigzag") for r in range(W)] for x in (q, k, v, dout)]
        with rf.use_backend("cudnn"):
            outs, lses, _ = simulate_ring_attn(*shards[:3], "zigzag", causal=True)
            *grads, _ = simulate_ring_attn_backward(shards[3], *shards[:3], outs, lses, "zigzag", causal=True)
        got = [unshard_from(x, 1, "zigzag") for x in (outs, *grads)]
        errs[W] = [max_err(a, b) for a, b in zip(got, (ref_out, *ref_grads), strict=True)]
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert errs[8][i] <= 1.5 * errs[2][i] + 1e-3, (
            f"{name}: {errs[8][i]:.3g} at 8 ranks, {errs[2][i]:.3g} at 2"
        )
