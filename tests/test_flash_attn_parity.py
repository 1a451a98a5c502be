"""flash-attn's API, form for form: code switches by changing an import.

The packed varlen forms, paged keys in the varlen call, and ``flash_attn_with_kvcache`` with
flash-attn's argument order, rotary embedding applied while appending, and ``cache_leftpad``;
each against an independent computation."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from oracle import assert_matches

import ringflash as rf
from ringflash.reference import attention_ref, attention_varlen_ref

FA2_KVCACHE = [
    "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx",
    "cache_leftpad", "block_table", "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
    "alibi_slopes", "num_splits", "return_softmax_lse",
]  # fmt: skip


def test_kvcache_takes_flash_attns_arguments_in_flash_attns_order():
    names = list(inspect.signature(rf.flash_attn_with_kvcache).parameters)
    assert names[: len(FA2_KVCACHE)] == FA2_KVCACHE


_FA2_OPTIONS = [
    "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
    "return_attn_probs",
]  # fmt: skip
FA2_FORMS = {  # flash-attn 2's positional arguments of each form, in its order
    "flash_attn_func": ["q", "k", "v", *_FA2_OPTIONS],
    "flash_attn_kvpacked_func": ["q", "kv", *_FA2_OPTIONS],
    "flash_attn_qkvpacked_func": ["qkv", *_FA2_OPTIONS],
    "flash_attn_varlen_func": [
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", *_FA2_OPTIONS,
        "block_table",
    ],
    "flash_attn_varlen_kvpacked_func": [
        "q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", *_FA2_OPTIONS,
    ],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen", *_FA2_OPTIONS],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FA2_FORMS))
def test_every_form_takes_flash_attns_arguments_in_flash_attns_order(name):
    """A positional call written for flash-attn means the same here. A packed form passes what
    follows its own arguments on to the unpacked call after that call's tensors and lengths."""
    want = FA2_FORMS[name]
    params = list(inspect.signature(getattr(rf, name)).parameters.values())
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        target, head = (rf.flash_attn_varlen_func, 7) if "varlen" in name else (rf.flash_attn_func, 3)
        names += list(inspect.signature(target).parameters)[head:]
    assert names[: len(want)] == want
    for fn in (rf.flash_attn_func, rf.flash_attn_varlen_func):
        defaults = inspect.signature(fn).parameters
        assert defaults["window_size"].default == (-1, -1) and defaults["softcap"].default == 0.0


def test_positional_options_mean_flash_attns_in_the_packed_forms():
    """``(dropout_p, softmax_scale, causal, window_size)`` given by position, as flash-attn's
    callers may: the same call as by name."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    want = rf.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, window_size=(2, 0))
    got = rf.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), 0.0, 0.3, True, (2, 0))
    torch.testing.assert_close(got, want)
    got = rf.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), 0.0, 0.3, True, (2, 0))
    torch.testing.assert_close(got, want)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    qkv = torch.stack([q[0], k[0], v[0]], 1)
    got = rf.flash_attn_varlen_qkvpacked_func(qkv, cu, 9, 0.0, 0.3, True, (2, 0))
    torch.testing.assert_close(got, want[0])


def test_varlen_packed_forms_match_the_unpacked_call():
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 11, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    want = rf.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True)
    kv = torch.stack([k, v], 1).requires_grad_()
    got = rf.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7, causal=True)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert kv.grad is not None and kv.grad.shape == kv.shape
    qkv = torch.stack([q, k, v], 1)
    torch.testing.assert_close(rf.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True), want)
    with pytest.raises(ValueError, match=r"qkv must be \[T, 3, H, D\] with 3 at dim 1"):
        rf.flash_attn_varlen_qkvpacked_func(kv, cu, 7)


def test_varlen_with_paged_keys_matches_contiguous_keys():
    torch.manual_seed(1)
    page, lens = 4, [5, 9, 0, 3]
    cu = torch.tensor([0, 5, 14, 14, 17], dtype=torch.int32)
    q = torch.randn(17, 4, 8)
    k, v = torch.randn(17, 2, 8), torch.randn(17, 2, 8)
    pages = torch.randn(12, page, 2, 8)
    vpages = torch.randn(12, page, 2, 8)
    table = torch.tensor([[3, 7, 0], [1, 5, 9], [0, 0, 0], [11, 0, 0]], dtype=torch.int32)
    for b, n in enumerate(lens):  # write each sequence's keys into its pages
        for t in range(n):
            pages[table[b, t // page], t % page] = k[cu[b] + t]
            vpages[table[b, t // page], t % page] = v[cu[b] + t]
    want = rf.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True)
    pages.requires_grad_()
    got = rf.flash_attn_varlen_func(q, pages, vpages, cu, cu, 9, 9, causal=True, block_table=table)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert pages.grad[2].abs().sum() == 0, "a page no sequence uses gets no gradient"


@pytest.mark.parametrize(
    "bad",
    ["page out of range", "negative page", "cu_seqlens_k decreasing", "too few pages", "v pages differ"],
)
def test_paged_varlen_bad_input_says_what(bad):
    """Paged keys given to the varlen call: pages outside the cache, a bad ``cu_seqlens_k``, too
    few pages for a sequence, or K and V pools of different pages raise ValueError, as
    ``flash_attn_with_kvcache`` does (no silent clamping, no unrelated torch error)."""
    q, pages, vpages = torch.randn(5, 2, 8), torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    match = {
        "page out of range": "outside the cache's 4 pages",
        "negative page": "outside the cache's 4 pages",
        "cu_seqlens_k decreasing": "non-decreasing",
        "too few pages": "longer than its block_table",
        "v pages differ": "paged caches of the same",
    }[bad]
    if bad == "page out of range":
        table[1, 0] = 99
    elif bad == "negative page":
        table[0, 0] = -5
    elif bad == "cu_seqlens_k decreasing":
        cu_k[2] = -1
    elif bad == "too few pages":
        cu_k[2] = 17
    else:
        vpages = vpages[:, :2]
    with pytest.raises(ValueError, match=match):
        rf.flash_attn_varlen_func(q, pages, vpages, cu_q, cu_k, 3, 4, block_table=table)


def _rotate_ref(x, pos, cos, sin, interleaved):
    """Rotary by complex multiplication (float64), an independent formulation."""
    rd = 2 * cos.shape[1]
    xr = x[..., :rd].double()
    pairs = xr.unflatten(-1, (-1, 2)) if interleaved else torch.stack(xr.chunk(2, -1), -1)
    z = torch.view_as_complex(pairs.contiguous())
    ang = torch.polar(torch.ones_like(cos.double()), torch.atan2(sin.double(), cos.double()))[
        pos
    ]  # [B, S, rd/2]
    z = z * ang.unsqueeze(2)
    r = torch.view_as_real(z)
    r = r.flatten(-2) if interleaved else torch.cat([r[..., 0], r[..., 1]], -1)
    return torch.cat([r.to(x.dtype), x[..., rd:]], -1)


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rotary_while_appending(interleaved, causal):
    torch.manual_seed(2)
    B, cap, Hk, Hq, D, rd, n_new = 2, 16, 2, 4, 16, 8, 2
    theta = torch.rand(40, rd // 2) * 6
    cos, sin = theta.cos(), theta.sin()
    kc, vc = torch.randn(B, cap, Hk, D), torch.randn(B, cap, Hk, D)
    q, k, v = torch.randn(B, n_new, Hq, D), torch.randn(B, n_new, Hk, D), torch.randn(B, n_new, Hk, D)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    pad = torch.tensor([0, 3], dtype=torch.int32)
    want_k = kc.clone()
    outs = []
    for b in range(B):
        # flash-attn's rule: cache slot positions, which cache_leftpad does not shift.
        pos = (lens[b] + torch.arange(n_new))[None]
        kr = _rotate_ref(k[b : b + 1], pos, cos, sin, interleaved)
        qpos = pos if causal else torch.full_like(pos, int(lens[b]))
        qr = _rotate_ref(q[b : b + 1], qpos, cos, sin, interleaved)
        want_k[b, lens[b] : lens[b] + n_new] = kr[0]
        vv = torch.cat([vc[b : b + 1, : lens[b]], v[b : b + 1]], 1)
        kk = want_k[b : b + 1, : lens[b] + n_new]
        o, _ = attention_ref(qr.double(), kk[:, pad[b] :].double(), vv[:, pad[b] :].double(), causal=causal)
        outs.append(o)
    got = rf.flash_attn_with_kvcache(
        q, kc, vc, k, v, cos, sin, lens, None, pad, causal=causal, rotary_interleaved=interleaved
    )
    torch.testing.assert_close(kc, want_k, msg="the rotated keys are what the cache holds")
    assert_matches("out", got, torch.cat(outs), None, 0)


@pytest.mark.parametrize("sq,n_new", [(1, 3), (3, 1)])
def test_rotary_queries_at_cache_seqlens_onward_when_fewer_or_more_than_the_append(sq, n_new):
    """flash-attn's rule when the queries are not the appended tokens: causal query ``t`` is
    rotated at ``cache_seqlens + t`` (while the mask stays bottom-right aligned)."""
    torch.manual_seed(4)
    cap, H, D, rd = 12, 2, 16, 16
    theta = torch.rand(cap, rd // 2) * 6
    cos, sin = theta.cos(), theta.sin()
    kc, vc = torch.randn(1, cap, H, D), torch.randn(1, cap, H, D)
    q, k, v = torch.randn(1, sq, H, D), torch.randn(1, n_new, H, D), torch.randn(1, n_new, H, D)
    n = 6
    lens = torch.tensor([n], dtype=torch.int32)
    want_k = kc.clone()
    want_k[0, n : n + n_new] = _rotate_ref(k, (n + torch.arange(n_new))[None], cos, sin, False)[0]
    qr = _rotate_ref(q, (n + torch.arange(sq))[None], cos, sin, False)
    vv = torch.cat([vc[:, :n], v], 1)
    want, _ = attention_ref(qr.double(), want_k[:, : n + n_new].double(), vv.double(), causal=True)
    got = rf.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, causal=True, rotary_interleaved=False)
    torch.testing.assert_close(kc, want_k, msg="the rotated keys are what the cache holds")
    assert_matches("out", got, want, None, 0)


def test_leftpad_hides_the_slots_before_it():
    torch.manual_seed(3)
    kc, vc = torch.randn(2, 10, 1, 8), torch.randn(2, 10, 1, 8)
    q = torch.randn(2, 1, 2, 8)
    lens = torch.tensor([7, 10], dtype=torch.int32)
    pad = torch.tensor([4, 0], dtype=torch.int32)
    got = rf.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=pad)
    ref0, _ = attention_ref(q[:1].double(), kc[:1, 4:7].double(), vc[:1, 4:7].double())
    ref1, _ = attention_ref(q[1:].double(), kc[1:].double(), vc[1:].double())
    assert_matches("out", got, torch.cat([ref0, ref1]), None, 0)
    with pytest.raises(ValueError, match="cache_leftpad must be in"):
        rf.flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, cache_leftpad=torch.tensor([8, 0], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="cannot be combined with block_table"):
        table = torch.zeros(2, 3, dtype=torch.int32)
        rf.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, cache_leftpad=pad, block_table=table)


_LEFTPAD_TRITON = """
import sys
sys.path.insert(0, "tests")
import torch, ringflash as rf
from test_flash_attn_parity import test_leftpad_hides_the_slots_before_it, test_rotary_while_appending
with rf.use_backend("triton"):
    test_leftpad_hides_the_slots_before_it()
    test_rotary_while_appending(True, True)
print("ok")
"""


def test_leftpad_and_rotary_through_the_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=repo)
    r = subprocess.run(
        [sys.executable, "-c", _LEFTPAD_TRITON],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_varlen_ref_helper_is_the_oracle():
    """(The packed tests above lean on flash_attn_varlen_func; it is checked against the oracle.)"""
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (torch.randn(7, 2, 8) for _ in range(3))
    ref, _ = attention_varlen_ref(q.double(), k.double(), v.double(), cu, cu, causal=True)
    assert_matches("varlen", rf.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True), ref, None, 0)
