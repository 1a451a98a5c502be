"""Local attention through the public API against the float64 oracle (blockwise backend on CPU)."""

import math
import os

import pytest
import torch

import ringflash as rf
from ringflash.reference import attention_ref, attention_varlen_ref
from tests.oracle import assert_matches

# The suite also runs with every call on the Triton kernels under the interpreter
# (test_kernels_interp.py), where a 1000-token call takes a minute: its 32x16 tiles already loop over
# many blocks at 127 tokens, so the long cases run on the blockwise backend only.
_ON_INTERPRETER = (
    os.environ.get("RINGFLASH_TEST_BACKEND") == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
)
blockwise_only = pytest.mark.skipif(_ON_INTERPRETER, reason="long case: blockwise backend only")

# (B, Sq, Sk, Hq, Hk, D, causal, window, softcap)
CASES = [
    (2, 17, 17, 4, 4, 32, False, (-1, -1), 0.0),
    (1, 127, 127, 8, 2, 64, True, (-1, -1), 0.0),
    (2, 33, 70, 8, 2, 80, True, (-1, -1), 0.0),  # seqlen_q < seqlen_k
    (2, 70, 33, 4, 1, 64, True, (-1, -1), 0.0),  # seqlen_q > seqlen_k: fully masked top rows
    (1, 1, 45, 4, 1, 128, True, (-1, -1), 0.0),
    (1, 100, 100, 4, 2, 32, False, (9, 4), 0.0),  # sliding window
    (1, 64, 90, 4, 2, 32, True, (20, -1), 0.0),
    (2, 40, 40, 2, 2, 64, True, (-1, -1), 30.0),  # softcap
    pytest.param((1, 1000, 1000, 2, 1, 32, True, (-1, -1), 0.0), marks=blockwise_only),
    (1, 20, 20, 2, 1, 256, False, (-1, -1), 0.0),
]


def case_id(c):
    B, Sq, Sk, Hq, Hk, D, causal, window, softcap = c
    parts = [f"B{B}-Sq{Sq}-Sk{Sk}-H{Hq}:{Hk}-D{D}"]
    if causal:
        parts.append("causal")
    if window != (-1, -1):
        parts.append(f"win{window[0]}:{window[1]}")
    if softcap:
        parts.append(f"cap{softcap:g}")
    return "-".join(parts)


def _inputs(shapes, dtype):
    lowp = [torch.randn(s).to(dtype) for s in shapes]
    return lowp, [t.double().requires_grad_() for t in lowp]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flash_attn_func_matches_oracle(case, dtype, small_blocks):
    B, Sq, Sk, Hq, Hk, D, causal, window, softcap = case
    (q, k, v), (q64, k64, v64) = _inputs([(B, Sq, Hq, D), (B, Sk, Hk, D), (B, Sk, Hk, D)], dtype)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    ref_out, ref_lse = attention_ref(q64, k64, v64, **opts)
    dout = torch.randn(ref_out.shape).to(dtype)
    ref_grads = _grads(ref_out, (q64, k64, v64), dout.double())

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, none = rf.flash_attn_func(qs, ks, vs, return_attn_probs=True, **opts)
    assert none is None and out.dtype == dtype and lse.dtype == torch.float32
    grads = _grads(out, (qs, ks, vs), dout)

    lowp_out, lowp_grads = None, (None, None, None)
    if dtype != torch.float32:
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        lowp_out, _ = attention_ref(ql, kl, vl, upcast=False, **opts)
        lowp_grads = _grads(lowp_out, (ql, kl, vl), dout)
    assert_matches("out", out, ref_out, lowp_out, 2)
    assert_matches("lse", lse, ref_lse, None, 0)
    for name, g, r, lp in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads, strict=True):
        assert_matches(name, g, r, lp, 3)


def test_inference_calls_skip_autograd_and_match_it_bitwise():
    """Without gradients the local calls run the same kernels outside autograd: bitwise equal."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 40, 4, 16), torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    cu = torch.tensor([0, 7, 40, 80], dtype=torch.int32)
    qg = q.clone().requires_grad_()
    for fn, args in (
        (rf.flash_attn_func, ()),
        (rf.flash_attn_varlen_func, (cu, cu, 40, 40)),
    ):
        flat = (lambda x: x.flatten(0, 1)) if args else (lambda x: x)
        with_grad = fn(flat(qg), flat(k), flat(v), *args, causal=True, return_attn_probs=True)
        assert with_grad[0].grad_fn is not None
        with torch.no_grad():
            plain = fn(flat(qg), flat(k), flat(v), *args, causal=True, return_attn_probs=True)
        assert plain[0].grad_fn is None
        assert torch.equal(plain[0], with_grad[0].detach()) and torch.equal(plain[1], with_grad[1].detach())


@blockwise_only
def test_default_blocks_long_causal():
    q, k, v = (torch.randn(1, 1300, 2, 32, dtype=torch.float64) for _ in range(3))
    out, lse, _ = rf.flash_attn_func(q.float(), k.float(), v.float(), causal=True, return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    assert_matches("out", out, ref_out, None, 0)
    assert_matches("lse", lse, ref_lse, None, 0)


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    q = torch.randn(1, 10, 2, 16, requires_grad=True)
    k = torch.randn(1, 4, 2, 16, requires_grad=True)
    v = torch.randn(1, 4, 2, 16, requires_grad=True)
    out, lse, _ = rf.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    # bottom-right alignment: query i sees keys j <= i - 6, so rows 0..5 see nothing
    assert torch.all(lse[:, :, :6] == -math.inf) and torch.isfinite(lse[:, :, 6:]).all()
    assert torch.all(out[:, :6] == 0)
    out.sum().backward()
    for name, g in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries"
    assert torch.all(q.grad[:, :6] == 0)


def test_window_aligns_bottom_right():
    q, k, v = (torch.randn(1, 8, 1, 16) for _ in range(3))
    out, lse, _ = rf.flash_attn_func(q[:, :2], k, v, causal=True, window_size=(0, 0), return_attn_probs=True)
    assert torch.isfinite(lse).all()  # diagonal only, bottom-right aligned: keys 6 and 7
    ref_out, _ = attention_ref(q[:, :2].double(), k.double(), v.double(), causal=True, window_size=(0, 0))
    assert_matches("out", out, ref_out, None, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_oracle(dtype, causal, small_blocks):
    lens_q = [1, 17, 5, 40, 2]
    lens_k = [1, 17, 9, 40, 0] if not causal else [3, 17, 5, 41, 0]
    Hq, Hk, D = 4, 2, 32
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    (q, k, v), (q64, k64, v64) = _inputs(
        [(sum(lens_q), Hq, D), (sum(lens_k), Hk, D), (sum(lens_k), Hk, D)], dtype
    )
    ref_out, ref_lse = attention_varlen_ref(q64, k64, v64, cu_q, cu_k, causal=causal)
    dout = torch.randn(ref_out.shape).to(dtype)
    ref_grads = _grads(ref_out, (q64, k64, v64), dout.double())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = rf.flash_attn_varlen_func(
        qs, ks, vs, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_attn_probs=True
    )
    assert lse.shape == (Hq, sum(lens_q))
    grads = _grads(out, (qs, ks, vs), dout)
    lowp_out, lowp_grads = None, (None, None, None)
    if dtype != torch.float32:
        ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
        lowp_out, _ = attention_varlen_ref(ql, kl, vl, cu_q, cu_k, causal=causal, upcast=False)
        lowp_grads = _grads(lowp_out, (ql, kl, vl), dout)
    assert_matches("out", out, ref_out, lowp_out, 2)
    assert_matches("lse", lse, ref_lse, None, 0)
    for name, g, r, lp in zip(("dq", "dk", "dv"), grads, ref_grads, lowp_grads, strict=True):
        assert_matches(name, g, r, lp, 3)


def test_packed_forms_match_unpacked():
    q, k, v = (torch.randn(2, 19, 4, 32) for _ in range(3))
    ref = rf.flash_attn_func(q, k, v, causal=True)
    kv = torch.stack([k, v], dim=2).requires_grad_()
    qkv = torch.stack([q, k, v], dim=2).requires_grad_()
    out_kv = rf.flash_attn_kvpacked_func(q, kv, causal=True)
    out_qkv = rf.flash_attn_qkvpacked_func(qkv, causal=True)
    torch.testing.assert_close(out_kv, ref)
    torch.testing.assert_close(out_qkv, ref)
    out_qkv.sum().backward()
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0


@pytest.mark.parametrize("uses", ["out+lse", "lse", "out"])
def test_gradient_through_lse_is_exact(uses):
    # Only one output in the loss: the other's gradient arrives as None (not materialized).
    q64, k64, v64 = (torch.randn(1, 12, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref_out, ref_lse = attention_ref(q64, k64, v64, causal=True)
    w = torch.randn_like(ref_lse)

    def loss(out, lse):
        terms = {"out": out.sum(), "lse": (lse * w.to(lse.dtype)).sum()}
        return sum(terms[u] for u in uses.split("+"))

    ref_g = torch.autograd.grad(loss(ref_out, ref_lse), (q64, k64, v64), allow_unused=True)
    ref_g = [torch.zeros_like(x) if gx is None else gx for x, gx in zip((q64, k64, v64), ref_g, strict=True)]
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    out, lse, _ = rf.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    g = torch.autograd.grad(loss(out, lse), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), g, ref_g, strict=True):
        assert_matches(name, a, b, None, 0)


def test_torch_compile_fullgraph():
    class TinyAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).unbind(2)
            return rf.flash_attn_func(q, k, v, causal=True).sum()

    model = TinyAttention()
    x = torch.randn(2, 24, 32)
    eager = model(x)
    eager.backward()
    eager_grad = model.qkv.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(model.qkv.weight.grad, eager_grad)


def test_torch_compile_fullgraph_varlen():
    # The varlen path reads cu_seqlens for its checks outside tracing; under torch.compile nothing
    # on the way (the value-check switch included) may break the graph.
    q, k, v = (torch.randn(30, 2, 16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)

    def f(q, k, v):
        return rf.flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, causal=True).sum()

    eager = f(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    got = torch.compile(f, fullgraph=True)(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_use_backend_torch_and_unknown():
    q = torch.randn(1, 5, 1, 8)
    with rf.use_backend("torch"):
        out = rf.flash_attn_func(q, q, q)
    torch.testing.assert_close(out, rf.flash_attn_func(q, q, q))
    with pytest.raises(ValueError, match="unknown backend"):
        with rf.use_backend("cuda-magic"):
            pass


@pytest.mark.parametrize(
    "use, current, default, outer, inner, error",
    [
        ("use_tma", "backends.tma_mode", "auto", "off", "on", "unknown TMA mode"),
        (
            "use_ring_transport",
            "parallel.options.ring_transport",
            "nccl",
            "copy_engine",
            "nccl",
            "unknown ring transport",
        ),
        ("use_ring_prefetch", "parallel.options.ring_prefetch", 2, 1, 3, "whole number of K/V blocks"),
    ],
)
def test_mode_context_managers_nest_and_unknown_is_an_error(use, current, default, outer, inner, error):
    import importlib

    module, name = current.rsplit(".", 1)
    use, current = getattr(rf, use), getattr(importlib.import_module(f"ringflash.{module}"), name)
    assert current() == default
    with use(outer):
        with use(inner):
            assert current() == inner
        assert current() == outer
    assert current() == default
    with pytest.raises(ValueError, match=error):
        with use("fast"):
            pass
    assert current() == default


def test_ring_forward_prefetch_choice():
    """The ring's forward holds ``use_ring_prefetch`` blocks, except under the copy-engine
    transport, which passes blocks one rank ahead only."""
    from ringflash.parallel.options import forward_prefetch

    assert forward_prefetch("nccl") == 2
    with rf.use_ring_prefetch(3):
        assert forward_prefetch("nccl") == 3
        assert forward_prefetch("copy_engine") == 1
    with rf.use_ring_prefetch(1):
        assert forward_prefetch("nccl") == 1


@pytest.mark.parametrize("case", [c for c in CASES if not c[-1]][:6], ids=case_id)
def test_explicit_products_path_matches_oracle(case):
    """The blockwise path used off-CPU (and for softcap): explicit products, no fused CPU kernel."""
    from ringflash.backends import use_config
    from ringflash.blockwise import BlockwiseConfig

    with use_config(BlockwiseConfig(block_q=16, block_k=8, score_budget=0, fused_cpu=False)):
        _check_case_against_oracle(case)


def _check_case_against_oracle(case):
    B, Sq, Sk, Hq, Hk, D, causal, window, softcap = case
    (q, k, v), (q64, k64, v64) = _inputs([(B, Sq, Hq, D), (B, Sk, Hk, D), (B, Sk, Hk, D)], torch.float32)
    ref_out, ref_lse = attention_ref(q64, k64, v64, causal=causal, window_size=window)
    out, lse, _ = rf.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert_matches("out", out, ref_out, None, 0)
    assert_matches("lse", lse, ref_lse, None, 0)
