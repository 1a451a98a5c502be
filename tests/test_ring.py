"""Ring attention on real gloo processes against the float64 oracle on the gathered inputs.

Each world size is spawned once and runs every case; each rank compares its own shard of the
output, LSE and gradients with the oracle's, and the parent test asserts per case (failures carry
the rank's traceback). Shapes are small and odd where the layout allows.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from dist_utils import one_triton_config, spawn
from oracle import assert_matches

import ringflash.parallel as rp
from ringflash import use_ring_prefetch
from ringflash.reference import attention_ref, attention_varlen_ref

FUNCS = {
    "contiguous": rp.ring_flash_attn_func,
    "zigzag": rp.zigzag_ring_flash_attn_func,
    "stripe": rp.stripe_flash_attn_func,
}
KV_FUNCS = {
    "contiguous": rp.ring_flash_attn_kvpacked_func,
    "zigzag": rp.zigzag_ring_flash_attn_kvpacked_func,
    "stripe": rp.stripe_flash_attn_kvpacked_func,
}
QKV_FUNCS = {
    "contiguous": rp.ring_flash_attn_qkvpacked_func,
    "zigzag": rp.zigzag_ring_flash_attn_qkvpacked_func,
    "stripe": rp.stripe_flash_attn_qkvpacked_func,
}


def _case(
    layout,
    causal=False,
    window=(-1, -1),
    B=2,
    L=None,
    H=(4, 2),
    D=16,
    softcap=0.0,
    pack=None,
    varlen=False,
    prefetch=None,
):
    L = L if L is not None else (8 if layout == "zigzag" else 7)
    mask = ("causal" if causal else "full") + (f"-w{window[0]}:{window[1]}" if window != (-1, -1) else "")
    parts = [
        "varlen" if varlen else layout,
        mask,
        f"B{B}" if not varlen else "",
        f"L{L}",
        f"H{H[0]}:{H[1]}",
        f"D{D}",
    ]
    parts += [f"cap{softcap:g}"] if softcap else []
    parts += [f"{pack}packed"] if pack else []
    parts += [f"prefetch{prefetch}"] if prefetch else []
    cid = "-".join(p for p in parts if p)
    return cid, dict(
        layout=layout,
        causal=causal,
        window=window,
        B=B,
        L=L,
        H=H,
        D=D,
        softcap=softcap,
        pack=pack,
        varlen=varlen,
        prefetch=prefetch,
    )


CASES = dict(
    [
        _case(lay, c, w)
        for lay in FUNCS
        for c, w in ((False, (-1, -1)), (True, (-1, -1)), (True, (5, 0)), (False, (3, 2)))
    ]
    + [
        _case("stripe", True, H=(4, 1), D=32),  # MQA
        _case("zigzag", True, H=(3, 3), D=8, softcap=2.0),
        _case("contiguous", True, B=1, L=5, H=(2, 2)),
        _case("zigzag", True, pack="kv"),
        _case("stripe", True, pack="qkv", H=(2, 2)),
        _case("contiguous", False, pack="kv", H=(4, 1)),
        _case("contiguous", True, varlen=True, L=9),
        _case("contiguous", False, varlen=True, L=9),
        _case("contiguous", True, (4, 0), varlen=True, L=9),
        _case("contiguous", True, varlen=True, L=9, pack="qkv", H=(2, 2)),
        # The forward holding one K/V block at a time (the plain ring), or three (the default is 2).
        _case("zigzag", True, prefetch=1),
        _case("zigzag", True, prefetch=3),
        _case("contiguous", False, (3, 2), prefetch=3),
        _case("contiguous", True, varlen=True, L=9, prefetch=3),
    ]
)
# A few cases for NCCL on GPUs (each new mask/shape compiles Triton kernels on every rank).
NCCL_CASES = {
    cid: CASES[cid]
    for cid in (
        "zigzag-causal-B2-L8-H4:2-D16",
        "stripe-causal-w5:0-B2-L7-H4:2-D16",
        "contiguous-full-w3:2-B2-L7-H4:2-D16",
        "varlen-causal-L9-H4:2-D16",
    )
}
# Over NCCL the Triton backend compiles every mask/shape variant on each rank (one tile config each,
# see one_triton_config), so it runs one case per layout and mask family (window, softcap, GQA/MQA,
# packed, varlen); the blockwise backend runs them all.
TRITON_NCCL_CASES = {
    cid: CASES[cid]
    for cid in (
        "contiguous-causal-B2-L7-H4:2-D16",
        "zigzag-causal-B2-L8-H4:2-D16",
        "zigzag-full-w3:2-B2-L8-H4:2-D16",
        "stripe-causal-w5:0-B2-L7-H4:2-D16",
        "stripe-causal-B2-L7-H4:1-D32",
        "zigzag-causal-B2-L8-H3:3-D8-cap2",
        "varlen-causal-L9-H4:2-D16",
        "varlen-causal-w4:0-L9-H4:2-D16",
    )
}
EIGHT_RANK_CASES = dict([_case("zigzag", True, L=4, B=1), _case("contiguous", True, varlen=True, L=5)])


def _cu_seqlens(total: int) -> torch.Tensor:
    """Documents of uneven lengths that cross shard boundaries, with one empty document."""
    g = torch.Generator().manual_seed(total)
    cuts = sorted(set(torch.randint(1, total, (max(2, total // 8),), generator=g).tolist()))
    return torch.tensor([0, cuts[0], cuts[0], *cuts[1:], total], dtype=torch.int32)


def _ring_call(c, q, k, v, dout, ql, kl, vl, sh, S, dim, kw):
    """The case's ring function (padded, packed or varlen form), forward and backward on this rank's
    shard: ``(out, lse, dq, dk, dv)``."""
    layout = c["layout"]
    if c["varlen"]:
        cu = _cu_seqlens(S)
        if c["pack"] == "qkv":
            qkv = torch.stack([sh(q), sh(k), sh(v)], dim=1).requires_grad_()
            out, lse, _ = rp.ring_flash_attn_varlen_qkvpacked_func(qkv, cu, S, **kw)
        else:
            out, lse, _ = rp.ring_flash_attn_varlen_func(ql, kl, vl, cu, S, **kw)
    elif c["pack"] == "kv":
        kv = torch.stack([sh(k), sh(v)], dim=2).requires_grad_()
        out, lse, _ = KV_FUNCS[layout](ql, kv, **kw)
    elif c["pack"] == "qkv":
        qkv = torch.stack([sh(q), sh(k), sh(v)], dim=2).requires_grad_()
        out, lse, _ = QKV_FUNCS[layout](qkv, **kw)
    else:
        out, lse, _ = FUNCS[layout](ql, kl, vl, **kw)
    out.backward(sh(dout))
    if c["pack"] == "kv":
        dq, dk, dv = ql.grad, kv.grad[:, :, 0], kv.grad[:, :, 1]
    elif c["pack"] == "qkv":
        dq, dk, dv = qkv.grad.unbind(dim + 1)
    else:
        dq, dk, dv = ql.grad, kl.grad, vl.grad
    return out, lse, dq, dk, dv


def _run_case(rank: int, world: int, c: dict, device: str) -> None:
    torch.manual_seed(1234)  # every rank draws the same full tensors
    hq, hk = c["H"]
    D, layout = c["D"], c["layout"]
    S = world * c["L"]
    lead = (S,) if c["varlen"] else (c["B"], S)
    dim = 0 if c["varlen"] else 1
    q, k, v = torch.randn(*lead, hq, D), torch.randn(*lead, hk, D), torch.randn(*lead, hk, D)
    dout = torch.randn(*lead, hq, D)
    q, k, v, dout = (x.to(device) for x in (q, k, v, dout))
    sh = lambda x: rp.shard(x, dim=dim, layout=layout)  # noqa: E731
    # The oracle runs on the inputs gathered from every rank's shard.
    qg, kg, vg = (rp.unshard(sh(x), dim=dim, layout=layout) for x in (q, k, v))
    assert torch.equal(qg, q) and torch.equal(kg, k) and torch.equal(vg, v), "unshard(shard(x)) != x"
    kw = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], return_attn_probs=True)
    ql, kl, vl = (sh(x).requires_grad_() for x in (q, k, v))
    with use_ring_prefetch(c["prefetch"]) if c["prefetch"] else contextlib.nullcontext():
        out, lse, dq, dk, dv = _ring_call(c, q, k, v, dout, ql, kl, vl, sh, S, dim, kw)
    out, lse, dq, dk, dv, dout, qg, kg, vg = (x.cpu() for x in (out, lse, dq, dk, dv, dout, qg, kg, vg))
    cu = _cu_seqlens(S) if c["varlen"] else None
    q64, k64, v64 = (x.double().requires_grad_() for x in (qg, kg, vg))
    rkw = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"])
    if c["varlen"]:
        ref, ref_lse = attention_varlen_ref(q64, k64, v64, cu, cu, **rkw)
    else:
        ref, ref_lse = attention_ref(q64, k64, v64, **rkw)
    ref.backward(dout.double())
    tag = f"rank {rank}/{world}"
    assert_matches(f"{tag} out", out, sh(ref.detach()), None, 2)
    assert_matches(
        f"{tag} lse", lse, rp.shard(ref_lse, dim=dim + 1 if not c["varlen"] else 1, layout=layout), None, 2
    )
    assert lse.dtype == torch.float32, f"{tag} lse dtype {lse.dtype}"
    assert_matches(f"{tag} dq", dq, sh(q64.grad), None, 3)
    assert_matches(f"{tag} dk", dk, sh(k64.grad), None, 3)
    assert_matches(f"{tag} dv", dv, sh(v64.grad), None, 3)


def run_cases(rank: int, world: int, cases: dict, device: str = "cpu", backend: str = "torch") -> dict:
    """Worker: run every case, returning ``{case_id: None or the failure text}``."""
    import traceback

    from ringflash.backends import use_backend

    if device == "cuda":
        device = f"cuda:{rank}"
        if backend == "triton":
            one_triton_config()
    res = {}
    with use_backend(backend):
        for cid, c in cases.items():
            try:
                _run_case(rank, world, c, device)
                res[cid] = None
            except Exception:  # noqa: BLE001 - reported per case to the parent
                res[cid] = traceback.format_exc()
    return res


_RESULTS: dict[int, list[dict]] = {}


def _results(world: int, cases: dict) -> list[dict]:
    if world not in _RESULTS:
        _RESULTS[world] = spawn(run_cases, world, cases, timeout=300)
    return _RESULTS[world]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("cid", list(CASES))
def test_ring_matches_oracle(world, cid):
    failures = [
        f"rank {r}:\n{res[cid]}" for r, res in enumerate(_results(world, CASES)) if res[cid] is not None
    ]
    assert not failures, f"{cid} on {world} ranks:\n" + "\n".join(failures)


@pytest.mark.parametrize("cid", list(EIGHT_RANK_CASES))
def test_ring_eight_ranks(cid):
    if 8 not in _RESULTS:
        _RESULTS[8] = spawn(run_cases, 8, EIGHT_RANK_CASES, timeout=300)
    failures = [f"rank {r}:\n{res[cid]}" for r, res in enumerate(_RESULTS[8]) if res[cid] is not None]
    assert not failures, f"{cid} on 8 ranks:\n" + "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ring_nccl(world, backend):
    """The same cases over NCCL, one GPU per rank, with the blockwise and the Triton backend."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    if backend == "triton":
        pytest.importorskip("triton")
    cases = TRITON_NCCL_CASES if backend == "triton" else CASES
    res = spawn(run_cases, world, cases, "cuda", backend, timeout=600, backend="nccl")
    failures = [
        f"{cid} rank {r}:\n{out[cid]}" for r, out in enumerate(res) for cid in cases if out[cid] is not None
    ]
    assert not failures, "\n".join(failures)


def _transports_agree(rank: int, world: int):
    """Forward and backward, several calls in a row and two shapes interleaved, through NCCL and
    through the copy-engine transport: the same kernels on the same data give the same bits (with
    the forward holding one K/V block, as it does under the copy-engine transport)."""
    from ringflash import use_ring_prefetch, use_ring_transport

    dev = f"cuda:{rank}"
    one_triton_config()
    torch.manual_seed(rank)  # every rank's shard differs: a block from the wrong rank shows
    bad = []
    # (layout, B, L, Hq, Hk, D, window): two K/V shapes interleaved, so each has its own message
    # streams; the window cuts the ring short, so its dK/dV go home over several hops.
    cases = [
        ("zigzag", 2, 64, 8, 2, 64, (-1, -1)),
        ("contiguous", 1, 96, 4, 4, 32, (-1, -1)),
        ("stripe", 2, 64, 8, 2, 64, (-1, -1)),
        ("contiguous", 1, 96, 4, 4, 32, (100, 0)),
        ("zigzag", 1, 96, 4, 4, 32, (-1, -1)),
    ]
    for repeat in range(3):
        for name, B, L, Hq, Hk, D, window in cases:
            fn = FUNCS[name]
            q, k, v, do = (
                torch.randn(B, L, h, D, device=dev, dtype=torch.bfloat16) for h in (Hq, Hk, Hk, Hq)
            )
            got = {}
            for transport in ("nccl", "copy_engine"):
                qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
                # The copy-engine transport's forward holds one block (its copies go one rank
                # ahead), so NCCL's does too here: the same calls in the same order.
                with use_ring_transport(transport), use_ring_prefetch(1):
                    out = fn(qa, ka, va, causal=True, window_size=window)
                out.backward(do)  # outside the block: the backward keeps the forward's transport
                got[transport] = (out, qa.grad, ka.grad, va.grad)
            for what, a, b in zip(("out", "dq", "dk", "dv"), got["nccl"], got["copy_engine"], strict=True):
                if not torch.equal(a, b):
                    err = (a - b).abs().max()
                    bad.append(f"{name} B{B} L{L} window {window} repeat {repeat}: {what} differs by {err}")
    return bad


@pytest.mark.parametrize("world", [2, 4])
def test_ring_copy_engine_transport_matches_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    res = spawn(_transports_agree, world, timeout=600, backend="nccl")
    bad = [f"rank {r}: {line}" for r, lines in enumerate(res) for line in lines]
    assert not bad, "\n".join(bad)


def _unshard_disagreeing(rank, world):
    got = {}
    cases = (
        ("shape", torch.randn(1, 4 + rank)),
        ("dtype", torch.randn(1, 4, dtype=[torch.float32, torch.float64][rank])),
    )
    for kind, x in cases:
        try:
            rp.unshard(x, layout="contiguous")
            got[kind] = "returned"
        except ValueError as e:
            got[kind] = str(e)
    return got


def test_unshard_of_disagreeing_shards_fails_every_rank():
    for got in spawn(_unshard_disagreeing, 2, timeout=60):
        assert "disagree on shard shape" in got["shape"] and "disagree on dtype" in got["dtype"], got


def test_shard_says_what_it_takes():
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        rp.shard([1, 2], layout="contiguous")
    with pytest.raises(ValueError, match="is not a dim"):
        rp.shard(torch.randn(4), dim=2, layout="contiguous")
    with pytest.raises(ValueError, match="is not a dim"):
        rp.unshard(torch.tensor(1.0), dim=0, layout="contiguous")
    # No default layout: the ring functions' layouts differ, and shards in another layout than the
    # attention's would give a wrong result without an error.
    for fn in (rp.shard, rp.unshard, lambda x: rp.shard_for(x, 0, 2)):
        with pytest.raises(ValueError, match="layout is required.*ring_flash_attn_func: 'contiguous'"):
            fn(torch.randn(1, 8, 2, 4))


def test_single_process_fallback():
    """No process group initialised: the same API runs locally and matches the oracle."""
    assert not torch.distributed.is_initialized()
    q, k, v = torch.randn(2, 13, 4, 16), torch.randn(2, 13, 2, 16), torch.randn(2, 13, 2, 16)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=True)
    for fn in FUNCS.values():
        out, lse, _ = fn(q, k, v, causal=True, return_attn_probs=True)
        assert_matches(f"{fn.__name__} out", out, ref, None, 2)
        assert_matches(f"{fn.__name__} lse", lse, ref_lse, None, 2)
    assert torch.equal(rp.shard(q, layout="zigzag"), q) and torch.equal(rp.unshard(q, layout="stripe"), q)
