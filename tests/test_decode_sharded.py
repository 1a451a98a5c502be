"""Sharded-KV decoding on real gloo processes (1-4 ranks) against the float64 oracle.

Every rank draws the same global inputs (fixed seed), keeps its contiguous shard of each
sequence's cache (uneven, some shards empty), and runs (1) ``sharded_flash_attn_with_kvcache``
with the new tokens appended on the rank that owns each sequence's end and positions found by
its own all_gather, and (2) ``ShardedKVCache`` built from a contiguous prefill, stepping with
causal multi-token queries and a window. Each rank checks its result against the oracle on the
full sequence; the parent checks that all ranks returned bitwise-equal outputs.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from dist_utils import spawn

from ringflash.parallel.sharded_decode import ShardedKVCache, sharded_flash_attn_with_kvcache
from ringflash.reference import attention_ref

Hq, Hk, D = 4, 2, 16


def _ref(q, k_full, v_full, lens, **kw):
    outs, lses = [], []
    for b, n in enumerate(lens):
        o, lse = attention_ref(
            q[b : b + 1].double(), k_full[b : b + 1, :n].double(), v_full[b : b + 1, :n].double(), **kw
        )
        if n == 0:
            o, lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _check(name, out, lse, ref_o, ref_l):
    assert not torch.isnan(out).any(), f"{name}: NaN in out"
    fin = torch.isfinite(ref_l)
    assert torch.equal(torch.isinf(lse), ~fin), f"{name}: lse -inf pattern"
    err_o = (out.double() - ref_o).abs().max().item()
    err_l = (lse.double()[fin] - ref_l[fin]).abs().max().item() if fin.any() else 0.0
    assert err_o < 2e-5 and err_l < 2e-5, f"{name}: out err {err_o:.3g}, lse err {err_l:.3g}"


def _shard_bounds(n, world, b):
    """Uneven contiguous cut of n keys over world ranks, empty shards included."""
    g = torch.Generator().manual_seed(100 + 7 * b + world)
    cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
    if world > 2:
        cuts[0] = 0  # rank 0 empty
    return [0, *cuts, n]


def _worker(rank, world, device="cpu"):
    """Every check on ``device`` ("cpu", or "cuda" = GPU ``rank`` over NCCL); inputs drawn on the CPU."""
    torch.manual_seed(0)
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    results = {}
    # (1) the free function: lengths 0, 1, 17, 40; 1 new token on the owner rank; then 3 query
    # tokens causal, then a window.
    lens = [0, 1, 17, 40]
    B = len(lens)
    for name, Sq, Snew, opts in (
        ("1tok", 1, 1, dict()),
        ("3tok-causal", 3, 3, dict(causal=True)),
        ("2tok-window", 2, 0, dict(window_size=(6, 0))),
    ):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # same on every rank
        q = torch.randn(B, Sq, Hq, D, generator=g)
        k_old = torch.randn(B, max(lens), Hk, D, generator=g)
        v_old = torch.randn(B, max(lens), Hk, D, generator=g)
        k_new = torch.randn(B, Snew, Hk, D, generator=g)
        v_new = torch.randn(B, Snew, Hk, D, generator=g)
        cap = max(lens) + Snew
        kc = torch.randn(B, cap, Hk, D)  # garbage beyond the local length
        vc = torch.randn(B, cap, Hk, D)
        local = []
        for b, n in enumerate(lens):
            lo, hi = _shard_bounds(n, world, b)[rank : rank + 2]
            kc[b, : hi - lo] = k_old[b, lo:hi]
            vc[b, : hi - lo] = v_old[b, lo:hi]
            local.append(hi - lo)
        owner = world - 1  # new tokens appended on the last rank (its run ends each sequence)
        out, lse = sharded_flash_attn_with_kvcache(
            q.to(dev),
            kc.to(dev),
            vc.to(dev),
            k_new.to(dev) if rank == owner else None,
            v_new.to(dev) if rank == owner else None,
            cache_seqlens=torch.tensor(local, dtype=torch.int32, device=dev),
            return_softmax_lse=True,
            **opts,
        )
        out, lse = out.cpu(), lse.cpu()
        k_full = torch.cat([k_old, k_new], 1)
        v_full = torch.cat([v_old, v_new], 1)
        # the full sequence of row b: its old tokens then the new ones
        kf = torch.stack([torch.cat([k_old[b, :n], k_new[b], k_old[b, n:]]) for b, n in enumerate(lens)])
        vf = torch.stack([torch.cat([v_old[b, :n], v_new[b], v_old[b, n:]]) for b, n in enumerate(lens)])
        del k_full, v_full
        ref_o, ref_l = _ref(q, kf, vf, [n + Snew for n in lens], **opts)
        _check(f"rank {rank}/{world} {name}", out, lse, ref_o, ref_l)
        results[name] = (out.tolist(), lse.tolist())  # plain data: tensors cannot cross os._exit

    # (2) ShardedKVCache from a contiguous prefill of L tokens per rank, then steps.
    L, B2 = 5, 2
    g = torch.Generator().manual_seed(42)
    k_all = torch.randn(B2, L * world + 12, Hk, D, generator=g)
    v_all = torch.randn(B2, L * world + 12, Hk, D, generator=g)
    cache = ShardedKVCache.from_prefill(
        k_all[:, rank * L : (rank + 1) * L].to(dev),
        v_all[:, rank * L : (rank + 1) * L].to(dev),
        max_new_tokens=7,
    )
    n = L * world
    for i, (Sq, opts) in enumerate(
        ((1, dict(causal=True)), (3, dict(causal=True)), (2, dict(window_size=(4, 0))))
    ):
        qg = torch.Generator().manual_seed(i)
        q = torch.randn(B2, Sq, Hq, D, generator=qg)
        new_k, new_v = k_all[:, n : n + Sq].to(dev), v_all[:, n : n + Sq].to(dev)
        out, lse = cache.step(q.to(dev), new_k, new_v, return_softmax_lse=True, **opts)
        out, lse = out.cpu(), lse.cpu()
        n += Sq
        ref_o, ref_l = _ref(q, k_all, v_all, [n] * B2, **opts)
        _check(f"rank {rank}/{world} cache step {i}", out, lse, ref_o, ref_l)
        results[f"cache{i}"] = (out.tolist(), lse.tolist())
    assert cache.total_length(0) == n
    # Full: appending beyond every rank's room raises before writing, on every rank.
    before = cache.k.clone()
    with pytest.raises(ValueError, match="full"):
        cache.append(torch.zeros(B2, 8, Hk, D, device=dev), torch.zeros(B2, 8, Hk, D, device=dev))
    assert torch.equal(cache.k, before), "a refused append wrote to the cache"
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_decode_exact_on_every_rank(world):
    results = spawn(_worker, world, timeout=240)
    for name in results[0]:
        for r in range(1, world):
            assert results[r][name][0] == results[0][name][0], f"{name}: rank {r} out differs from rank 0"
            assert results[r][name][1] == results[0][name][1], f"{name}: rank {r} lse differs from rank 0"


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_decode_nccl(world):
    """The same checks over NCCL, one GPU per rank (the Triton split-KV and combine kernels)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    results = spawn(_worker, world, "cuda", timeout=600, backend="nccl")
    for name in results[0]:
        for r in range(1, world):
            assert results[r][name] == results[0][name], f"{name}: rank {r} differs from rank 0"


def _bad_step_worker(rank, world, case):
    """One rank passes a bad ``step`` (``case``), then every rank a good one."""
    from ringflash.decode import flash_attn_with_kvcache

    L, B, Snew = 3, 2, 2
    g = torch.Generator().manual_seed(7)  # the same global inputs on every rank
    k_all = torch.randn(B, L * world + Snew, Hk, D, generator=g)
    v_all = torch.randn(B, L * world + Snew, Hk, D, generator=g)
    q = torch.randn(B, Snew, Hq, D, generator=g)
    mine = slice(rank * L, (rank + 1) * L)
    cache = ShardedKVCache.from_prefill(k_all[:, mine], v_all[:, mine], max_new_tokens=4)
    k_new, v_new = k_all[:, L * world :], v_all[:, L * world :]
    bad_k, bad_v = k_new, v_new
    if rank == 1:
        if case == "kv-heads":
            bad_k = bad_v = torch.randn(B, Snew, Hk + 1, D)
        elif case == "k-on-one-rank":
            bad_k = bad_v = None
        elif case == "snew":
            bad_k, bad_v = k_new[:, :1], v_new[:, :1]
    tables = [t.clone() for t in (cache.k, cache.v, cache.seqlens, cache.key_offsets, cache.global_seqlens)]
    lengths = [row[:] for row in cache.lengths]
    with pytest.raises(ValueError, match="every rank raises|disagree"):
        cache.step(q, bad_k, bad_v, causal=True)
    now = (cache.k, cache.v, cache.seqlens, cache.key_offsets, cache.global_seqlens)
    assert all(torch.equal(a, b) for a, b in zip(tables, now, strict=True)), "a refused step wrote"
    assert cache.lengths == lengths, "a refused step changed the length table"

    out = cache.step(q, k_new, v_new, causal=True)
    full_k, full_v = k_all.clone(), v_all.clone()  # one process: the whole cache, then the append
    ref = flash_attn_with_kvcache(q, full_k, full_v, k_new, v_new, cache_seqlens=L * world, causal=True)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max().item()
    assert cache.total_length(0) == L * world + Snew
    return out.tolist()


@pytest.mark.parametrize("case", ["kv-heads", "k-on-one-rank", "snew"])
def test_sharded_cache_bad_step_on_one_rank(case):
    """A bad ``k``/``v`` on one rank, or ranks that differ in whether or how much they append:
    every rank raises ValueError (no hang), nothing is written anywhere, and the next good step
    matches one process."""
    outs = spawn(_bad_step_worker, 2, case, timeout=60, pg_timeout=15)
    assert outs[0] == outs[1]
