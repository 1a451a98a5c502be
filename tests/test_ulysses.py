"""Ulysses and hybrid (Ulysses x ring) attention on real gloo processes against the float64 oracle.

Each world size is spawned once and runs every case; every rank compares its shard of the output,
LSE and gradients (dq, dk, dv) with the oracle's on the full inputs. GQA/MQA cases cover the KV
head replication (Hk < W, and Hk neither dividing nor divided by W).
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_utils import one_triton_config, spawn
from oracle import assert_matches

from ringflash.comm.alltoall import all_to_all
from ringflash.comm.groups import build_usp_groups, usp_grid
from ringflash.parallel.hybrid import usp_attn_func, usp_degrees, usp_positions, usp_shard, usp_unshard
from ringflash.parallel.sharding import shard
from ringflash.parallel.ulysses import kv_replication, ulysses_attn_func
from ringflash.reference import attention_ref


def _case(
    kind, H, causal=True, window=(-1, -1), L=5, B=2, D=16, grid=None, layout="contiguous", dtype="f32",
    uly=True,
):  # fmt: skip
    """A case; ``uly=False``: the Ulysses group passed as None (a degree of 1, as documented)."""
    mask = ("causal" if causal else "full") + (f"-w{window[0]}:{window[1]}" if window != (-1, -1) else "")
    g = f"-{grid[0]}x{grid[1]}-{layout}" + ("" if uly else "-ulysses_group=None") if grid else ""
    cid = f"{kind}{g}-{mask}-B{B}-L{L}-H{H[0]}:{H[1]}-D{D}-{dtype}"
    return cid, dict(
        kind=kind, H=H, causal=causal, window=window, L=L, B=B, D=D, grid=grid, layout=layout, dtype=dtype,
        uly=uly,
    )  # fmt: skip


CASES = {
    2: dict(
        [
            _case("ulysses", (4, 2)),
            _case("ulysses", (4, 1), causal=False),  # MQA: each KV head repeated twice
            _case("ulysses", (2, 2), window=(3, 1), causal=False, L=7, D=32),
            _case("ulysses", (6, 3), L=3),  # Hk = 3 over 2 ranks: lcm replication to 6
            _case("ulysses", (4, 2), dtype="bf16", L=8),
            _case("usp", (4, 1), grid=(1, 2), layout="zigzag", L=6),  # pure ring through usp
        ]
    ),
    4: dict(
        [
            _case("ulysses", (8, 2), L=3),  # Hk = 2 < W = 4: each KV head twice
            _case("ulysses", (4, 1), causal=False, L=3),  # MQA over 4 ranks
            _case("ulysses", (12, 3), L=2, B=1),  # lcm(3, 4) = 12
            _case("usp", (4, 2), grid=(2, 2), layout="zigzag", L=4),
            _case("usp", (2, 1), grid=(2, 2), layout="stripe", L=3, window=(4, 0)),
            _case("usp", (6, 2), grid=(2, 2), layout="contiguous", L=3, causal=False),
            _case("usp", (4, 4), grid=(4, 1), layout="zigzag", L=3),
            _case("usp", (2, 2), grid=(1, 4), layout="zigzag", L=4, B=1),
            _case("usp", (4, 2), grid=(1, 4), layout="zigzag", L=4, B=1, uly=False),
        ]
    ),
}


def _run_case(rank, world, c, groups, dev="cpu"):
    torch.manual_seed(99)
    hq, hk = c["H"]
    B, D, S = c["B"], c["D"], world * c["L"]
    dt = torch.bfloat16 if c["dtype"] == "bf16" else torch.float32
    q, k, v = torch.randn(B, S, hq, D), torch.randn(B, S, hk, D), torch.randn(B, S, hk, D)
    dout = torch.randn(B, S, hq, D)
    q, k, v, dout = (x.to(dt).float() for x in (q, k, v, dout))  # inputs exact in dt
    kw = dict(causal=c["causal"], window_size=c["window"], return_attn_probs=True)
    if c["kind"] == "ulysses":
        sh = lambda x: shard(x, dim=1, layout="contiguous")  # noqa: E731
        fn = lambda a, b, e: ulysses_attn_func(a, b, e, **kw)  # noqa: E731
    else:
        uly, ring = groups[c["grid"]]
        uly = uly if c["uly"] else None
        lay = c["layout"]
        sh = lambda x: usp_shard(x, uly, ring, dim=1, layout=lay)  # noqa: E731
        fn = lambda a, b, e: usp_attn_func(a, b, e, ulysses_group=uly, ring_group=ring, layout=lay, **kw)  # noqa: E731
        back = usp_unshard(sh(q).to(dev), uly, ring, layout=lay).cpu()
        assert torch.equal(back, q), "usp_unshard(usp_shard(q)) != q"
        pos = usp_positions(c["L"], uly, ring, layout=lay)
        assert torch.equal(sh(torch.arange(S)[None])[0], pos), "usp_positions disagrees with usp_shard"
    ql, kl, vl = (sh(x).to(dev, dt).requires_grad_() for x in (q, k, v))
    out, lse, _ = fn(ql, kl, vl)
    out.backward(sh(dout).to(dev, dt))
    out, lse = out.detach().cpu(), lse.cpu()
    dq, dk, dv = (x.grad.cpu() for x in (ql, kl, vl))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = attention_ref(q64, k64, v64, causal=c["causal"], window_size=c["window"])
    ref.backward(dout.double())
    lowp = {}
    if dt != torch.float32:  # plain PyTorch in the same precision, for the 2x / 3x rule
        ql2, kl2, vl2 = (x.to(dt).requires_grad_() for x in (q, k, v))
        r2, _ = attention_ref(ql2, kl2, vl2, causal=c["causal"], window_size=c["window"], upcast=False)
        r2.backward(dout.to(dt))
        lowp = dict(out=sh(r2.detach()), dq=sh(ql2.grad), dk=sh(kl2.grad), dv=sh(vl2.grad))
    tag = f"rank {rank}/{world}"
    assert out.shape == ql.shape and out.dtype == dt, f"{tag} out shape/dtype {out.shape} {out.dtype}"
    assert_matches(f"{tag} out", out, sh(ref.detach()), lowp.get("out"), 2)
    assert_matches(f"{tag} lse", lse, sh(ref_lse.transpose(1, 2)).transpose(1, 2), None, 2)
    assert_matches(f"{tag} dq", dq, sh(q64.grad), lowp.get("dq"), 3)
    assert_matches(f"{tag} dk", dk, sh(k64.grad), lowp.get("dk"), 3)
    assert_matches(f"{tag} dv", dv, sh(v64.grad), lowp.get("dv"), 3)


def run_cases(rank, world, cases, device="cpu", backend="torch"):
    """Worker: every case (and the bad inputs) on ``device`` ("cpu", or "cuda" = GPU ``rank``)."""
    import traceback

    from ringflash.backends import use_backend

    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    if device == "cuda" and backend == "triton":
        one_triton_config()
    groups = {}
    for grid in sorted({c["grid"] for c in cases.values() if c["grid"]}):
        groups[grid] = tuple(build_usp_groups(*grid))
    res = {}
    with use_backend(backend):
        for cid, c in cases.items():
            try:
                _run_case(rank, world, c, groups, dev)
                res[cid] = None
            except Exception:  # noqa: BLE001 - reported per case to the parent
                res[cid] = traceback.format_exc()
        res["bad-input"] = _bad_inputs(rank, world, dev)
    return res


def _expect(fn, text):
    try:
        fn()
    except ValueError as e:
        assert text in str(e), f"error {e!r} does not mention {text!r}"
        return
    raise AssertionError(f"no ValueError (expected one mentioning {text!r})")


def _bad_inputs(rank, world, dev="cpu"):
    """Invalid arguments raise ValueError on every rank (never a hang); returns None or the failure."""
    import traceback

    try:
        q = torch.randn(1, 4, 2 * world + 1, 8, device=dev)
        k = torch.randn(1, 4, 1, 8, device=dev)
        _expect(lambda: ulysses_attn_func(q, k, k), "divide by")  # heads cannot be split
        # Only rank 0 is wrong (a different local length): everyone raises.
        qq = torch.randn(1, 4 + (rank == 0), world, 8, device=dev)
        _expect(lambda: ulysses_attn_func(qq, qq, qq), "disagree on q shape (rank 0: [1, 5,")
        bad = torch.randn(1, 4, world, 8, device=dev)
        _expect(lambda: ulysses_attn_func(bad, bad, bad, dropout_p=0.1), "dropout")
        _expect(lambda: build_usp_groups(3, world), "does not tile")
        # A packed stream whose cu_seqlens are this rank's own, not the global stream's.
        from ringflash import ulysses_attn_varlen_func

        p = torch.randn(6, world, 8, device=dev)
        cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=dev)
        _expect(lambda: ulysses_attn_varlen_func(p, p, p, cu, 4), f"world_size * local tokens = {world} * 6")
        return None
    except Exception:  # noqa: BLE001
        return traceback.format_exc()


_RESULTS: dict[int, list[dict]] = {}


def _results(world):
    if world not in _RESULTS:
        _RESULTS[world] = spawn(run_cases, world, CASES[world], timeout=240)
    return _RESULTS[world]


@pytest.mark.parametrize(
    "cid", [f"{w}:{c}" for w in CASES for c in CASES[w]] + ["2:bad-input", "4:bad-input"]
)
def test_sp_matches_oracle(cid):
    world, name = cid.split(":", 1)
    failures = [
        f"rank {r}:\n{res[name]}" for r, res in enumerate(_results(int(world))) if res[name] is not None
    ]
    assert not failures, f"{name} on {world} ranks:\n" + "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sp_nccl(world, backend):
    """The same cases over NCCL, one GPU per rank, with the blockwise and the Triton backend."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    if backend == "triton":
        pytest.importorskip("triton")
    res = spawn(run_cases, world, CASES[world], "cuda", backend, timeout=600, backend="nccl")
    failures = [f"{cid} rank {r}:\n{err}" for r, out in enumerate(res) for cid, err in out.items() if err]
    assert not failures, "\n".join(failures)


def test_local_fallback_and_helpers():
    """No process group: Ulysses and USP run locally; replication factors and grids are as documented."""
    q, k = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16)
    ref, ref_lse = attention_ref(q.double(), k.double(), k.double(), causal=True)
    for fn in (ulysses_attn_func, usp_attn_func):
        out, lse, _ = fn(q, k, k, causal=True, return_attn_probs=True)
        assert_matches(f"{fn.__name__} out", out, ref, None, 2)
        assert_matches(f"{fn.__name__} lse", lse, ref_lse, None, 2)
    assert [kv_replication(32, hk, 8) for hk in (8, 4, 2, 1, 16)] == [1, 2, 4, 8, 1]
    assert kv_replication(12, 3, 4) == 4 and kv_replication(6, 3, 2) == 2
    assert usp_degrees(32, 16) == (16, 1) and usp_degrees(32, 64) == (32, 2) and usp_degrees(12, 8) == (4, 2)
    uly, ring = usp_grid(2, 3, 6)
    assert uly == [[0, 1], [2, 3], [4, 5]] and ring == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(ValueError, match="does not tile"):
        usp_grid(2, 3, 8)
    with pytest.raises(ValueError, match="does not tile"):
        build_usp_groups(2, 1)
    assert all_to_all([q], [2], [1]) == [q]
    assert math.gcd(4, 2) == 2
