"""Random legal inputs through every public function, against the float64 oracle.

Each draw picks shapes (lengths 0 and 1 included), GQA/MQA head groups, dtypes, masks, softcap,
a scale, and how every input tensor is laid out in memory: contiguous, a last dim with stride 2
(``x[..., ::2]``), heads as the innermost dim (a head-minor permute), a view at an offset into a
larger buffer, or (for K/V) a batch expanded with stride 0. Every backend must either handle each
layout exactly or reject it with a clear error; none may answer wrongly.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import ringflash as rf
from ringflash.reference import attention_ref, attention_varlen_ref
from tests.oracle import assert_matches

LAYOUTS = ("contiguous", "last-dim-stride", "head-minor", "offset", "expanded")
CUDA = torch.cuda.is_available()


@pytest.fixture
def device(request):
    """``cpu`` (the blockwise backend), or ``cuda`` (the Triton kernels), where the draw runs. On
    CUDA each kernel keeps one tile config: every draw is a new shape, which would autotune."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    if not CUDA:
        pytest.skip("needs CUDA")
    from dist_utils import one_triton_config, restore_triton_configs

    saved = one_triton_config(picks=(-1, 0, 0))
    yield torch.device("cuda")
    restore_triton_configs(saved)


def _devices(draws, n_cuda):
    """Every draw on CPU, the first ``n_cuda`` also on CUDA (each new shape compiles kernels)."""
    return [(c, "cpu") for c in draws] + [(c, "cuda") for c in draws[:n_cuda]]


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` (``[B, S, H, D]`` or ``[T, H, D]``) stored in ``layout``."""
    if layout == "last-dim-stride":
        buf = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device)
        buf[..., ::2] = values
        return buf[..., ::2]
    if layout == "head-minor":
        buf = values.transpose(-1, -2).contiguous()
        return buf.transpose(-1, -2)
    if layout == "offset":
        buf = torch.zeros(values.numel() + 37, dtype=values.dtype, device=values.device)
        out = buf[37:].view(values.shape)
        out.copy_(values)
        return out
    if layout == "expanded" and values.dim() == 4 and values.shape[0] > 1:
        # Every batch row holds row 0's values: the oracle sees the same (expanded) values.
        return values[:1].expand(values.shape)
    return values.clone()


def _draw(rng: random.Random, packed: bool = False):
    hk = rng.choice([1, 2])
    c = dict(
        B=rng.choice([0, 1, 1, 2, 3]) if not packed else 1,
        Sq=rng.choice([0, 1, 1, 2, 17, 33]),
        Sk=rng.choice([0, 1, 5, 17, 40]),
        Hk=hk,
        Hq=hk * rng.choice([1, 2, 4]),
        D=rng.choice([8, 16, 24, 40]),
        dtype=rng.choice(DTYPES),
        causal=rng.random() < 0.5,
        window=rng.choice([(-1, -1), (-1, -1), (3, 0), (6, 2), (0, -1)]),
        softcap=rng.choice([0.0, 0.0, 0.0, 5.0]),
        scale=rng.choice([None, None, 0.3]),
        layouts=[rng.choice(LAYOUTS) for _ in range(3)],
    )
    return c


def _case_id(c):
    return (
        f"B{c['B']}-Sq{c['Sq']}-Sk{c['Sk']}-H{c['Hq']}:{c['Hk']}-D{c['D']}-{str(c['dtype'])[6:]}"
        f"-c{int(c['causal'])}-w{c['window'][0]}:{c['window'][1]}-cap{c['softcap']:g}-{'/'.join(c['layouts'])}"
    )


def _tensors(c, gen, device="cpu"):
    shapes = [
        (c["B"], c["Sq"], c["Hq"], c["D"]),
        (c["B"], c["Sk"], c["Hk"], c["D"]),
        (c["B"], c["Sk"], c["Hk"], c["D"]),
    ]
    vals = [torch.randn(s, generator=gen).to(c["dtype"]).to(device) for s in shapes]
    xs = [laid_out(x, lay) for x, lay in zip(vals, c["layouts"], strict=True)]
    return xs, [x.double().cpu() for x in xs]


def _opts(c):
    return dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], softmax_scale=c["scale"])


def _check(name, got, ref64, lowp, factor):
    lowp = lowp.cpu() if got.dtype != torch.float32 else None
    assert_matches(name, got.cpu(), ref64, lowp, factor)


DRAWS = [_draw(random.Random(seed)) for seed in range(48)]


@pytest.mark.parametrize(
    "c, device",
    _devices(DRAWS, 16),
    ids=[f"{_case_id(c)}-{d}" for c, d in _devices(DRAWS, 16)],
    indirect=["device"],
)
def test_flash_attn_func_random(c, device):
    gen = torch.Generator().manual_seed(1)
    (q, k, v), (q64, k64, v64) = _tensors(c, gen, device)
    opts = _opts(c)
    q64.requires_grad_(), k64.requires_grad_(), v64.requires_grad_()
    ref, ref_lse = attention_ref(q64, k64, v64, **opts)
    low, _ = attention_ref(q, k, v, upcast=False, **opts)
    dout = torch.randn(ref.shape, generator=gen).to(c["dtype"]).to(device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    qs, ks, vs = (
        laid_out(x, lay) if lay != "expanded" else x for x, lay in zip(leaves, c["layouts"], strict=True)
    )
    out, lse, _ = rf.flash_attn_func(qs, ks, vs, return_attn_probs=True, **opts)
    _check("out", out, ref, low, 2)
    if c["dtype"] == torch.float32:
        assert_matches("lse", lse.cpu(), ref_lse, None, 0)
    if ref.numel() and k.numel():
        grads = torch.autograd.grad(out, leaves, dout)
        rgrads = torch.autograd.grad(ref, (q64, k64, v64), dout.double().cpu())
        low_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        low_out, _ = attention_ref(*low_leaves, upcast=False, **opts)
        lgrads = torch.autograd.grad(low_out, low_leaves, dout)
        for n, g, r, lg in zip(("dq", "dk", "dv"), grads, rgrads, lgrads, strict=True):
            _check(n, g, r, lg, 3)


VARLEN_DRAWS = [_draw(random.Random(100 + seed), packed=True) for seed in range(24)]


@pytest.mark.parametrize(
    "c, device",
    _devices(VARLEN_DRAWS, 8),
    ids=[f"{_case_id(c)}-{d}" for c, d in _devices(VARLEN_DRAWS, 8)],
    indirect=["device"],
)
def test_flash_attn_varlen_func_random(c, device):
    rng = random.Random(c["Sq"] * 31 + c["Sk"])
    gen = torch.Generator().manual_seed(2)
    n = rng.choice([1, 2, 4])
    lq = [rng.choice([0, 1, 3, 9]) for _ in range(n)]
    lk = [rng.choice([0, 1, 4, 11]) for _ in range(n)]
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    vals = [
        torch.randn(int(cu[-1]), h, c["D"], generator=gen).to(c["dtype"]).to(device)
        for cu, h in ((cu_q, c["Hq"]), (cu_k, c["Hk"]), (cu_k, c["Hk"]))
    ]
    xs = [laid_out(x, lay) for x, lay in zip(vals, c["layouts"], strict=True)]
    opts = _opts(c)
    ref, ref_lse = attention_varlen_ref(*(x.double().cpu() for x in xs), cu_q, cu_k, **opts)
    low, _ = attention_varlen_ref(*(x.cpu() for x in xs), cu_q, cu_k, upcast=False, **opts)
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    out, lse, _ = rf.flash_attn_varlen_func(*xs, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True, **opts)
    _check("out", out, ref, low, 2)
    if c["dtype"] == torch.float32:
        assert_matches("lse", lse.cpu(), ref_lse, None, 0)


@pytest.mark.parametrize("c", DRAWS[:24], ids=_case_id)
def test_packed_forms_random(c):
    gen = torch.Generator().manual_seed(3)
    (q, k, v), _ = _tensors(c, gen)
    opts = _opts(c)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), **opts)
    low, _ = attention_ref(q, k, v, upcast=False, **opts)
    _check("kvpacked", rf.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), **opts), ref, low, 2)
    qkv = torch.stack([q, q, q], 2)  # one head count for the three
    ref3, _ = attention_ref(q.double(), q.double(), q.double(), **opts)
    low3, _ = attention_ref(q, q, q, upcast=False, **opts)
    _check("qkvpacked", rf.flash_attn_qkvpacked_func(qkv, **opts), ref3, low3, 2)


@pytest.mark.parametrize(
    "c, device",
    _devices(DRAWS[:32], 8),
    ids=[f"{_case_id(c)}-{d}" for c, d in _devices(DRAWS[:32], 8)],
    indirect=["device"],
)
def test_flash_attn_with_kvcache_random(c, device):
    rng = random.Random(c["D"] * 7 + c["Sk"])
    gen = torch.Generator().manual_seed(4)
    B = max(c["B"], 1)
    cap, sq = max(c["Sk"], 1) + 4, rng.choice([1, 2])
    n_new = rng.choice([0, 1, 2])
    lens = [rng.randint(0, cap - n_new) for _ in range(B)]
    k_cache = torch.randn(B, cap, c["Hk"], c["D"], generator=gen).to(c["dtype"])
    v_cache = torch.randn(B, cap, c["Hk"], c["D"], generator=gen).to(c["dtype"])
    q = laid_out(torch.randn(B, sq, c["Hq"], c["D"], generator=gen).to(c["dtype"]), c["layouts"][0])
    new = [
        laid_out(torch.randn(B, n_new, c["Hk"], c["D"], generator=gen).to(c["dtype"]), c["layouts"][i])
        for i in (1, 2)
    ]
    kw = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], softmax_scale=c["scale"])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    refs, lows = [], []
    for b in range(B):
        want_k[b, lens[b] : lens[b] + n_new] = new[0][b]
        want_v[b, lens[b] : lens[b] + n_new] = new[1][b]
        n = lens[b] + n_new
        kb, vb = want_k[b : b + 1, :n], want_v[b : b + 1, :n]
        refs.append(attention_ref(q[b : b + 1].double(), kb.double(), vb.double(), **kw)[0])
        lows.append(attention_ref(q[b : b + 1], kb, vb, upcast=False, **kw)[0])
    kc, vc, qd = k_cache.to(device), v_cache.to(device), laid_out(q.to(device), c["layouts"][0])
    kn, vn = (
        laid_out(x.to(device), lay) if n_new else None for x, lay in zip(new, c["layouts"][1:], strict=True)
    )
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    out = rf.flash_attn_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=lens_t, **kw)
    assert torch.equal(kc.cpu(), want_k) and torch.equal(vc.cpu(), want_v), "the append wrote the wrong slots"
    _check("out", out, torch.cat(refs), torch.cat(lows), 2)


@pytest.mark.parametrize("seed", range(12))
def test_merge_and_combine_random(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, Sq, H, D = rng.choice([1, 2]), rng.choice([1, 5]), rng.choice([1, 3]), rng.choice([8, 16])
    Sk = rng.choice([2, 9, 20])
    q, k, v = (torch.randn(B, n, H, D, generator=gen, dtype=torch.float64) for n in (Sq, Sk, Sk))
    full, full_lse = attention_ref(q, k, v, diag_offset=0)
    cuts = sorted({0, Sk, *(rng.randint(0, Sk) for _ in range(rng.choice([1, 3])))})
    parts = [
        attention_ref(q, k[:, a:b], v[:, a:b], diag_offset=0)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    outs = torch.stack([o.float() for o, _ in parts])
    lses = torch.stack([lse.float() for _, lse in parts])
    out, lse = rf.combine_attn_partials(outs, lses)
    assert_matches("combine out", out, full, None, 0)
    assert_matches("combine lse", lse, full_lse, None, 0)
    merged, merged_lse = outs[0], lses[0]
    for o, l in zip(outs[1:], lses[1:], strict=True):
        merged, merged_lse = rf.merge_attn_states(merged, merged_lse, o, l)
    assert_matches("merge out", merged, full, None, 0)
    assert not math.isnan(merged.sum().item())


@pytest.mark.parametrize("c", DRAWS[:16], ids=_case_id)
def test_parallel_functions_without_a_group_random(c):
    """With no process group every sequence-parallel function is the local computation."""
    gen = torch.Generator().manual_seed(5)
    (q, k, v), (q64, k64, v64) = _tensors(c, gen)
    opts = _opts(c)
    ref, _ = attention_ref(q64, k64, v64, **opts)
    low, _ = attention_ref(q, k, v, upcast=False, **opts)
    if c["Sq"] != c["Sk"]:  # sequence-parallel shards hold queries and keys of the same tokens
        with pytest.raises(ValueError, match="same tokens"):
            rf.ring_flash_attn_func(q, k, v, **opts)
        return
    for fn in (
        rf.ring_flash_attn_func,
        rf.zigzag_ring_flash_attn_func,
        rf.stripe_flash_attn_func,
        rf.ulysses_attn_func,
        rf.usp_attn_func,
    ):
        _check(fn.__name__, fn(q, k, v, **opts), ref, low, 2)
