"""flash_attn_with_kvcache against the float64 oracle: append + attend, splits, paged caches, GQA.

``run_case`` builds one case (a cache full of random data, lengths, new tokens, optional paging or
cache_batch_idx), runs the public function once per ``num_splits`` on a fresh copy of the cache
and returns ``{check: [error, bound]}``; a check passes when error <= bound. The same function
serves the PyTorch backend here, the Triton interpreter in ``test_decode_interp.py`` (a worker
subprocess) and the GPU cases (``GPU_CASES``). What it checks:

- the cache afterwards equals the cache before with exactly the appended slots written;
- out and lse against ``attention_ref`` in float64 on the row's first ``len + Snew`` keys
  (bottom-right masks): float32 within fixed bounds, float16/bfloat16 within 2x the error of
  plain PyTorch in that precision (flash-attn's rule) plus the dtype's rounding at the result's
  scale;
- rows with no key: lse exactly -inf and output exactly 0;
- every ``num_splits`` agrees with the first one (within the same bound).

Also here: the launch choices (tile width, split-KV routing, the split kernel's arguments), the
paged and int/None forms of the call, and the bad-input helpers (``unchecked_bad_values``,
``_bad_setup``) that ``test_decode_bad_input.py``, ``test_device_errors.py`` and
``test_decode_interp.py`` share.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib

import pytest
import torch

from ringflash.backends import use_backend
from ringflash.decode import flash_attn_with_kvcache
from ringflash.reference import attention_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def case_id(p):
    s = f"B{len(p['lens'])}-L{','.join(map(str, p['lens']))}-new{p.get('Snew', 0)}-q{p.get('Sq', 1)}"
    s += f"-H{p['Hq']}:{p['Hk']}-D{p['D']}-{p['dtype']}"
    if p.get("page"):
        s += f"-page{p['page']}"
    if p.get("cbi"):
        s += "-cbi"
    if p.get("causal"):
        s += "-causal"
    if p.get("window"):
        s += "-win{}:{}".format(*p["window"])
    if p.get("softcap"):
        s += f"-cap{p['softcap']:g}"
    if p.get("tma"):
        s += f"-tma{p['tma']}"
    if p.get("wide"):
        s += "-wide"
    return s


def build(p, g):
    """Inputs of case ``p``: q, k, v, the logical caches ``[B, cap, Hk, D]`` and the call kwargs."""
    dev, dt = p.get("device", "cpu"), DTYPES[p["dtype"]]
    lens, Snew, Sq = p["lens"], p.get("Snew", 0), p.get("Sq", 1)
    B, Hq, Hk, D = len(lens), p["Hq"], p["Hk"], p["D"]
    cap = p.get("cap", max(lens) + Snew)

    def rnd(*shape):
        return torch.randn(shape, generator=g).to(device=dev, dtype=dt)

    q = rnd(B, Sq, Hq, D)
    k = rnd(B, Snew, Hk, D) if Snew else None
    v = rnd(B, Snew, Hk, D) if Snew else None
    kw = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=dev))
    if p.get("page"):
        page = p["page"]
        per_row = math.ceil(cap / page)
        n_pages = B * per_row + 3  # spare pages must stay untouched too
        k_cache, v_cache = rnd(n_pages, page, Hk, D), rnd(n_pages, page, Hk, D)
        bt = torch.randperm(n_pages, generator=g)[: B * per_row].view(B, per_row).to(torch.int32)
        kw["block_table"] = bt.to(dev)
    elif p.get("cbi"):
        k_cache, v_cache = rnd(B + 2, cap, Hk, D), rnd(B + 2, cap, Hk, D)
        kw["cache_batch_idx"] = torch.randperm(B + 2, generator=g)[:B].to(torch.int32).to(dev)
    else:
        k_cache, v_cache = rnd(B, cap, Hk, D), rnd(B, cap, Hk, D)
    return q, k, v, k_cache, v_cache, kw


def logical_rows(cache, kw, n_rows):
    """The cache as ``[B, cap, Hk, D]`` in batch-row order, whatever its layout."""
    if "block_table" in kw:
        bt = kw["block_table"].long()
        return cache[bt].flatten(1, 2)
    if "cache_batch_idx" in kw:
        return cache[kw["cache_batch_idx"].long()]
    return cache[:n_rows]


def expected_cache(cache, new, kw, lens):
    """The cache after appending ``new`` ``[B, Snew, Hk, D]`` (None: unchanged)."""
    out = cache.clone()
    if new is None:
        return out
    for b, n in enumerate(lens):
        for s in range(new.shape[1]):
            pos = n + s
            if "block_table" in kw:
                page = cache.shape[1]
                out[int(kw["block_table"][b, pos // page]), pos % page] = new[b, s]
            else:
                row = int(kw["cache_batch_idx"][b]) if "cache_batch_idx" in kw else b
                out[row, pos] = new[b, s]
    return out


def oracle(q, k_rows, v_rows, n_keys, p, upcast):
    """Per-row ``attention_ref`` on the first ``n_keys[b]`` keys; float64 (upcast) or q's dtype."""
    cast = torch.float64 if upcast else q.dtype
    outs, lses = [], []
    for b, n in enumerate(n_keys):
        o, lse = attention_ref(
            q[b : b + 1].cpu().to(cast),
            k_rows[b : b + 1, :n].cpu().to(cast),
            v_rows[b : b + 1, :n].cpu().to(cast),
            causal=p.get("causal", False),
            window_size=tuple(p.get("window", (-1, -1))),
            softcap=p.get("softcap", 0.0),
            upcast=upcast,
        )
        if n == 0:  # no key at all: the convention, stated explicitly
            o, lse = torch.zeros_like(o), torch.full_like(lse, -math.inf)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_case(p):
    """Every check of case ``p``: ``{name: [error, bound]}`` (``p["tma"]``: under that
    ``use_tma`` mode; ``p["wide"]``: through ``decode_fwd`` with GPU tiles as wide as
    ``pick_block_n`` picks on fast memory, wherever the programs fit one wave)."""
    from ringflash.kernels.options import use_tma

    with use_tma(p.get("tma", "auto")):
        return _run_case(p)


def _attend(p, q, kc, vc, k, v, kw, opts, num_splits):
    """One step (append + attend) through the public function, or for ``p["wide"]`` through the
    kernel's launcher with wide tiles allowed everywhere."""
    if not p.get("wide"):
        with use_backend(p.get("backend", "torch")):
            return flash_attn_with_kvcache(
                q, kc, vc, k, v, **kw, **opts, num_splits=num_splits, return_softmax_lse=True
            )
    from ringflash.kernels.decode import decode_fwd
    from ringflash.kernels.options import DecodeConfig

    wide = DecodeConfig(wide_min_gbps_per_sm=0.0, wide_min_keys=0)
    return decode_fwd(
        q,
        kc,
        vc,
        kw["cache_seqlens"],
        k_new=k,
        v_new=v,
        block_table=kw.get("block_table"),
        cache_batch_idx=kw.get("cache_batch_idx"),
        softmax_scale=q.shape[-1] ** -0.5,
        num_splits=num_splits,
        config=wide,
        **opts,
    )


def _run_case(p):
    g = torch.Generator().manual_seed(zlib.crc32(json.dumps(p, sort_keys=True).encode()))
    q, k, v, k_cache, v_cache, kw = build(p, g)
    dt = q.dtype
    lens = p["lens"]
    Snew = p.get("Snew", 0)
    n_keys = [n + Snew for n in lens]
    want_k = expected_cache(k_cache, k, kw, lens)
    want_v = expected_cache(v_cache, v, kw, lens)
    B = len(lens)
    k_rows, v_rows = logical_rows(want_k, kw, B), logical_rows(want_v, kw, B)
    ref_o, ref_l = oracle(q, k_rows, v_rows, n_keys, p, upcast=True)
    checks = {}
    masked = torch.isinf(ref_l)
    if dt == torch.float32:
        scale = max(1.0, ref_o.abs().max().item())
        bound_o, bound_l = (
            2e-5 * scale,
            2e-5 * max(1.0, ref_l[~masked].abs().max().item() if (~masked).any() else 1),
        )
    else:
        low_o, low_l = oracle(q, k_rows, v_rows, n_keys, p, upcast=False)
        rd = ref_o.to(dt)
        slack = 2 * (rd + 0.3 - 0.3 - rd).abs().max().item()
        bound_o = 2 * _err(low_o, ref_o) + slack + 1e-6
        bound_l = 2 * _err(low_l[~masked], ref_l[~masked]) + 1e-3
    first = None
    opts = dict(
        causal=p.get("causal", False),
        window_size=tuple(p.get("window", (-1, -1))),
        softcap=p.get("softcap", 0.0),
    )
    for ns in p.get("splits", [0]):
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = _attend(p, q, kc, vc, k, v, kw, opts, ns)
        tag = f"splits={ns}"
        checks[f"{tag} k_cache changed outside the appended slots"] = [
            float(not torch.equal(kc, want_k)),
            0.0,
        ]
        checks[f"{tag} v_cache changed outside the appended slots"] = [
            float(not torch.equal(vc, want_v)),
            0.0,
        ]
        checks[f"{tag} out dtype/shape"] = [float(out.dtype != dt or out.shape != q.shape), 0.0]
        checks[f"{tag} lse shape"] = [float(tuple(lse.shape) != (B, p["Hq"], q.shape[1])), 0.0]
        out, lse = out.cpu(), lse.cpu()
        checks[f"{tag} out finite"] = [float((~torch.isfinite(out)).sum()), 0.0]
        checks[f"{tag} out"] = [_err(out, ref_o), bound_o]
        checks[f"{tag} lse"] = [_err(lse[~masked], ref_l[~masked]), bound_l]
        checks[f"{tag} lse -inf pattern"] = [float((torch.isinf(lse) != masked).sum()), 0.0]
        rows = out.transpose(1, 2)[masked]
        checks[f"{tag} no-key rows out"] = [rows.abs().max().item() if rows.numel() else 0.0, 0.0]
        if first is None:
            first = out
        else:
            checks[f"{tag} vs splits={p.get('splits')[0]}"] = [_err(out, first), bound_o]
    checks["masked rows present"] = [float(bool(p.get("expect_masked")) and not masked.any()), 0.0]
    return checks


def assert_checks(checks, cid):
    bad = [f"{n}: error {e:.3g} > bound {b:.3g}" for n, (e, b) in checks.items() if not e <= b]
    assert not bad, f"{cid}: " + "; ".join(bad)


def case(lens, Hq=4, Hk=2, D=32, dtype="fp32", **kw):
    return dict(lens=lens, Hq=Hq, Hk=Hk, D=D, dtype=dtype, **kw)


# Shared with the interpreter tests: lengths 0, 1, 17, 999; append or not; GQA/MQA; every mask.
CASES = [
    case([0, 1, 17, 999], Snew=1, splits=[0, 1, 3, 8]),
    case([0, 1, 17, 999], Snew=0, splits=[0, 1, 5], expect_masked=True),
    case([5, 0, 40], Hq=6, Hk=2, Snew=3, Sq=3, causal=True, splits=[0, 1, 4]),
    case([17, 999], Hq=4, Hk=1, Snew=2, Sq=2, causal=True, page=16, splits=[0, 2]),
    case([30, 0, 9], Snew=0, page=8, splits=[1, 3], expect_masked=True),
    case([20, 6], Snew=1, cbi=True, splits=[0, 2]),
    case([50, 3], Snew=4, Sq=4, window=(8, 0), splits=[0, 3]),
    case([64, 12], Snew=0, Sq=2, window=(5, 2), softcap=10.0, splits=[0, 2]),
    # New tokens outside the window (the query sees only the last 2): still written to the cache.
    case([30, 7], Snew=4, window=(1, 0), splits=[0, 3]),
    case([100, 1], Hq=8, Hk=2, D=64, dtype="bf16", Snew=1, splits=[0, 4]),
    case(
        [33, 0], Hq=4, Hk=4, D=16, dtype="fp16", Snew=2, Sq=2, causal=True, splits=[0, 2], expect_masked=False
    ),
    # Head dims that are no power of two (192: MLA-style models).
    case([40, 3], Hq=4, Hk=2, D=80, dtype="bf16", Snew=1, splits=[0, 3]),
    case([20, 9], Hq=2, Hk=1, D=192, dtype="fp16", Snew=2, Sq=2, causal=True, splits=[0, 2]),
    # A cache of no slots: every row sees no key.
    case([0, 0], Snew=0, cap=0, splits=[0, 2], expect_masked=True),
]


@pytest.mark.parametrize("p", CASES, ids=[case_id(c) for c in CASES])
def test_decode_torch_backend(p):
    assert_checks(run_case(dict(p, backend="torch")), case_id(p))


@pytest.mark.parametrize("p", CASES[:5], ids=[case_id(c) for c in CASES[:5]])
def test_paged_matches_contiguous(p):
    """The same logical cache, paged and contiguous, gives the same output."""
    g = torch.Generator().manual_seed(1)
    pp = dict(p, page=p.get("page") or 16)
    q, k, v, k_cache, v_cache, kw = build(pp, g)
    B = len(p["lens"])
    kc_rows = logical_rows(k_cache, kw, B).clone()
    vc_rows = logical_rows(v_cache, kw, B).clone()
    opts = dict(causal=p.get("causal", False), window_size=tuple(p.get("window", (-1, -1))))
    o_paged = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kw, **opts)
    o_contig = flash_attn_with_kvcache(q, kc_rows, vc_rows, k, v, cache_seqlens=kw["cache_seqlens"], **opts)
    assert torch.allclose(o_paged, o_contig, atol=1e-6, rtol=1e-6), "paged vs contiguous out"
    assert torch.equal(logical_rows(k_cache, kw, B), kc_rows), "paged vs contiguous k_cache after append"


@pytest.mark.parametrize(
    "gbps,programs,keys,row_bytes,want",
    [
        (37.0, 128, 4096, 256, 128),  # an H200 at batch 16: one wave, long splits
        (37.0, 132, 1024, 256, 128),
        (37.0, 128, 256, 256, 64),  # short splits (batch 1 at 4k)
        (37.0, 256, 4096, 256, 64),  # two waves: two 64-key programs share an SM instead
        (37.0, 128, 4096, 512, 64),  # head dim 256 in 16 bits: three stages would not fit
        (25.4, 128, 4096, 256, 64),  # an H100
        (0.0, 128, 4096, 256, 64),  # bandwidth unknown
    ],
)
def test_pick_block_n(gbps, programs, keys, row_bytes, want):
    """Wide tiles only for one wave of long splits of narrow rows on memory fast per SM."""
    from ringflash.kernels.decode import pick_block_n

    assert pick_block_n(programs, keys, row_bytes, 132, gbps) == want


@pytest.mark.parametrize(
    "batch,seqlen_q,hq,hk,seqlen_k,want",
    [
        (1, 1, 32, 8, 32768, True),  # one token of a generate loop, long context
        (4, 4, 32, 8, 8192, True),  # 4 tokens x a group of 4 = 16 rows a program
        (1, 1, 32, 8, 1023, False),  # too short to spread
        (1, 17, 32, 8, 8192, False),  # 68 rows: more than one program holds
        (5, 1, 32, 8, 8192, False),  # 160 (row, head) programs fill 132 SMs already
        (1, 64, 8, 8, 4096, True),
    ],
)
def test_split_kv_pays(batch, seqlen_q, hq, hk, seqlen_k, want):
    from ringflash.kernels.decode import MAX_BLOCK_M, split_kv_pays

    assert MAX_BLOCK_M == 64
    assert split_kv_pays(batch, seqlen_q, hq, hk, seqlen_k, 132) == want


@pytest.mark.parametrize("D", [80, 96, 160, 192, 224, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_split_launch_args_every_head_dim(D, dtype):
    """The split kernel's launch arguments for head dims that are no power of two: the L2
    prefetch's line count (an arange's length) is a power of two covering the row, whose extra
    lines start past the row (the kernel clamps them onto its last line). Built on CPU; the
    prefetch itself runs only on NVIDIA GPUs (see the CUDA cases at head dims 80 and 192)."""
    pytest.importorskip("triton")
    from ringflash.kernels.decode import prefetch_lines, split_args
    from ringflash.kernels.options import DecodeConfig

    B, Hq, Hk, S = 2, 8, 2, 100
    q = torch.zeros(B, 1, Hq, D, dtype=dtype)
    kc, vc = torch.zeros(B, S, Hk, D, dtype=dtype), torch.zeros(B, S, Hk, D, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32)
    out, lse = torch.empty(B, 1, Hq, D, dtype=dtype), torch.empty(B, Hq, 1)
    grid, args, _, _ = split_args(
        q,
        kc,
        vc,
        lens,
        out,
        lse,
        n_new=0,
        k_new=None,
        v_new=None,
        block_table=None,
        cache_batch_idx=None,
        softmax_scale=D**-0.5,
        causal=True,
        window_size=(-1, -1),
        softcap=0.0,
        num_splits=0,
        diag_offset=None,
        config=DecodeConfig(),
    )
    lines, step = args["PREFETCH_LINES"], args["PREFETCH_STEP"]
    assert (lines, step) == prefetch_lines(D, kc.element_size())
    assert lines & (lines - 1) == 0, f"D={D}: {lines} prefetch lines is no power of two"
    assert step * kc.element_size() == 128
    assert lines * step >= D, "the prefetch misses part of the row"
    true_lines = -(-D * kc.element_size() // 128)
    assert all(i * step >= D for i in range(true_lines, lines)), "an extra line starts inside the row"
    assert args["HEAD_DIM"] == D and args["D_PAD"] >= D and args["D_PAD"] & (args["D_PAD"] - 1) == 0
    assert grid[1] == B * Hk


def test_int_seqlens_and_no_seqlens():
    """``cache_seqlens`` as an int, and None (whole cache, no append), match the tensor form."""
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    full = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([10, 10], dtype=torch.int32))
    assert torch.equal(flash_attn_with_kvcache(q, kc, vc, cache_seqlens=10), full)
    assert torch.equal(flash_attn_with_kvcache(q, kc, vc), full)
    ref, _ = attention_ref(q.double(), kc.double(), vc.double())
    assert _err(full, ref) < 1e-5


GPU_CASES = [
    case(
        [0, 1, 4095, 17000],
        Hq=32,
        Hk=8,
        D=128,
        dtype="bf16",
        Snew=1,
        splits=[0, 1, 7, 64],
    ),
    case([3000, 0, 999], Hq=32, Hk=8, D=128, dtype="bf16", Snew=4, Sq=4, causal=True, splits=[0, 3]),
    case([5000, 256], Hq=16, Hk=2, D=128, dtype="bf16", Snew=1, page=256, splits=[0, 5]),
    case([777, 12], Hq=8, Hk=8, D=64, dtype="fp16", Snew=2, Sq=2, page=16, causal=True, splits=[0, 2]),
    case([2049, 100], Hq=8, Hk=1, D=256, dtype="bf16", Snew=1, cbi=True, splits=[0, 3]),
    case(
        [4000, 30], Hq=8, Hk=2, D=80, dtype="bf16", Snew=3, Sq=3, window=(512, 0), softcap=30.0, splits=[0, 2]
    ),
    case([1500, 0], Hq=8, Hk=2, D=128, dtype="fp32", Snew=0, splits=[0, 4], expect_masked=True),
    # Head dims 192 (MLA-style) and 80 on a contiguous cache: the L2 prefetch's padded lines.
    case([3000, 77], Hq=16, Hk=2, D=192, dtype="bf16", Snew=1, splits=[0, 3]),
    case([2500, 0, 31], Hq=8, Hk=8, D=80, dtype="fp16", Snew=2, Sq=2, causal=True, splits=[0, 4]),
]


# The 16-bit contiguous-cache cases again with the cache's tiles through TMA descriptors, and
# the cases whose tiles may be wide (head dim <= 128 in 16 bits) with wide tiles on any GPU.
GPU_CASES += [dict(c, tma="on") for c in GPU_CASES if c["dtype"] != "fp32" and not c.get("page")] + [
    dict(c, wide=True) for c in GPU_CASES if c["dtype"] != "fp32" and c["D"] <= 128
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p", GPU_CASES, ids=[case_id(c) for c in GPU_CASES])
def test_decode_cuda(p):
    assert_checks(run_case(dict(p, device="cuda", backend="triton")), case_id(p))


def unchecked_bad_values(dev, backend, variant, checks="off"):
    """Bad lengths, rows or pages under ``use_value_checks(checks)`` (``"off"``: as inside
    ``skip_value_checks()``; ``"device"``: checked on the device, reported later; None: the
    device's default), the call not raising: ``{check: [error, bound]}``.

    The cache is the middle of a larger allocation whose first and last rows (or pages) are guards,
    placed where an unclamped write would land: nothing may be written there, and the output stays
    finite. ``variant``: "lens" (a negative length on the first row, one past the cache on the
    last), "cbi" (cache_batch_idx one below and one above the cache's rows) or "paged" (block_table
    pages one below and one above the pool, lengths past the pages)."""
    from ringflash import use_value_checks

    g = torch.Generator().manual_seed(11)
    B, cap, Hq, Hk, D, n_new = 2, 8, 4, 2, 16, 2
    q = torch.randn(B, 1, Hq, D, generator=g).to(dev)
    k = torch.randn(B, n_new, Hk, D, generator=g).to(dev)
    v = torch.randn(B, n_new, Hk, D, generator=g).to(dev)
    kw = {}
    if variant == "paged":
        page, n_pages = 2, 6
        alloc = torch.randn(2, n_pages + 2, page, Hk, D, generator=g).to(dev)
        kc, vc = alloc[0, 1:-1], alloc[1, 1:-1]
        kw["block_table"] = torch.tensor([[-1, -1, -1, -1], [6, 6, 6, 6]], dtype=torch.int32, device=dev)
        lens = torch.tensor([cap - 2, cap + 3], dtype=torch.int32, device=dev)
    else:
        alloc = torch.randn(2, B + 2, cap, Hk, D, generator=g).to(dev)
        kc, vc = alloc[0, 1:-1], alloc[1, 1:-1]
        lens = torch.tensor([-3, cap + 1], dtype=torch.int32, device=dev)
        if variant == "cbi":
            kw["cache_batch_idx"] = torch.tensor([-1, B], dtype=torch.int32, device=dev)
            lens = torch.tensor([0, cap - 2], dtype=torch.int32, device=dev)
    guards = alloc[:, [0, -1]].clone()
    mode = use_value_checks(checks) if checks is not None else contextlib.nullcontext()
    with use_backend(backend), mode:
        out, lse = flash_attn_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True, **kw
        )
    return {
        "guard rows/pages untouched": [float(not torch.equal(alloc[:, [0, -1]], guards)), 0.0],
        "out finite": [float((~torch.isfinite(out)).sum()), 0.0],
        "lse finite": [float((~torch.isfinite(lse)).sum()), 0.0],
    }


def _bad_setup():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    return q, kc, vc, k, v, lens
