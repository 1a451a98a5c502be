"""Bad input raises ValueError on every rank (never a hang); a dead rank makes the others fail."""

from __future__ import annotations

import os
import time

import pytest
import torch
from dist_utils import spawn

import ringflash.parallel as rp

PG_TIMEOUT = 5.0


def _expect_value_error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except ValueError as e:
        return str(e)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise ValueError")


def _bad_inputs(rank: int, world: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    L, msgs = 6, {}
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    q, k, v = (torch.randn(1, L, h, 8).to(dev) for h in (4, 2, 2))
    short = [x[:, : L - 1 if rank == 1 else L] for x in (q, k, v)]
    msgs["unequal"] = _expect_value_error(rp.ring_flash_attn_func, *short, causal=True)
    odd = [x[:, :5] for x in (q, k, v)]
    msgs["zigzag_odd"] = _expect_value_error(rp.zigzag_ring_flash_attn_func, *odd, causal=True)
    local_cu = torch.tensor([0, 2, L], dtype=torch.int32)  # a shard's cu_seqlens, not the global one
    msgs["local_cu"] = _expect_value_error(rp.ring_flash_attn_varlen_func, q[0], k[0], v[0], local_cu, L)
    msgs["dropout"] = _expect_value_error(rp.stripe_flash_attn_func, q, k, v, dropout_p=0.1)
    q_bad = q.double() if rank == 1 else q
    msgs["one_rank_dtype"] = _expect_value_error(rp.ring_flash_attn_func, q_bad, k, v)
    msgs["causal_mismatch"] = _expect_value_error(rp.ring_flash_attn_func, q, k, v, causal=rank == 0)
    # Only rank 0 records the call for a backward: its backward's collectives would wait forever.
    qg = q.clone().requires_grad_(rank == 0)
    msgs["grad_mismatch"] = _expect_value_error(rp.zigzag_ring_flash_attn_func, qg, k, v, causal=True)
    msgs["grad_mismatch_ulysses"] = _expect_value_error(rp.ulysses_attn_func, qg, k, v, causal=True)
    msgs["gqa"] = _expect_value_error(rp.ring_flash_attn_func, q[:, :, :3], k, v)
    msgs["kvpacked"] = _expect_value_error(rp.ring_flash_attn_kvpacked_func, q, torch.stack([k, v, v], 2))
    msgs["shard"] = _expect_value_error(rp.shard, torch.randn(1, 2 * world + 1, 2), None, 1, "contiguous")
    from ringflash import use_ring_prefetch

    with use_ring_prefetch(1 + rank):
        msgs["prefetch"] = _expect_value_error(rp.zigzag_ring_flash_attn_func, q, k, v, causal=True)
    if device == "cpu":  # the copy-engine transport needs CUDA tensors and an NCCL group
        from ringflash import use_ring_transport
        from ringflash.parallel import ring_attn

        with use_ring_transport("copy_engine"):
            msgs["transport"] = _expect_value_error(rp.zigzag_ring_flash_attn_func, q, k, v, causal=True)
        # Past that check (as on GPUs): ranks that chose different transports, or sit on different
        # nodes, are told so on every rank before any transfer (the ring's fields, agreed on).
        import torch.distributed as dist

        from ringflash.comm.agree import agree

        def agree_on(**fields):
            return _expect_value_error(
                agree, [(dist.group.WORLD, world)], None, fields, "the ring", ring_attn._HINTS
            )

        msgs["mixed"] = agree_on(**{"ring transport": "copy_engine" if rank == 1 else "nccl"})
        msgs["nodes"] = agree_on(**{"ring transport": "copy_engine", "node": 1000 + rank})
    # The ring is still in step after all of that: a good call works.
    out = rp.zigzag_ring_flash_attn_func(q, k, v, causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()
    return msgs


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bad_input_raises_on_every_rank(device):
    """gloo on CPU; on 2 GPUs over NCCL, where the check runs on a gloo group of the same ranks."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    backend = "nccl" if device == "cuda" else "gloo"
    res = spawn(_bad_inputs, 2, device, timeout=120, pg_timeout=PG_TIMEOUT, backend=backend)
    for msgs in res:
        assert "q shape" in msgs["unequal"] and "equal length" in msgs["unequal"], msgs["unequal"]
        assert "even number of tokens" in msgs["zigzag_odd"], msgs["zigzag_odd"]
        assert "global cu_seqlens" in msgs["local_cu"] and "12" in msgs["local_cu"], msgs["local_cu"]
        assert "dropout" in msgs["dropout"], msgs["dropout"]
        # Every rank reads the failing rank's own error.
        assert "rank 1: q has dtype torch.float64" in msgs["one_rank_dtype"], msgs["one_rank_dtype"]
        assert "disagree on causal" in msgs["causal_mismatch"], msgs["causal_mismatch"]
        for key in ("grad_mismatch", "grad_mismatch_ulysses"):
            want = "disagree on gradients (rank 0: True, rank 1: False) (every rank must call with gradients"
            assert want in msgs[key], msgs[key]
        assert "must be a multiple of nheads of k/v" in msgs["gqa"], msgs["gqa"]
        assert "with 2 at dim 2" in msgs["kvpacked"], msgs["kvpacked"]
        assert "divide by the world size" in msgs["shard"], msgs["shard"]
        assert "disagree on ring prefetch (rank 0: 1, rank 1: 2)" in msgs["prefetch"], msgs["prefetch"]
        if device == "cpu":
            assert "copy_engine" in msgs["transport"] and "gloo group" in msgs["transport"], msgs["transport"]
            want = "disagree on ring transport (rank 0: 'nccl', rank 1: 'copy_engine')"
            assert want in msgs["mixed"], msgs["mixed"]
            assert "disagree on node" in msgs["nodes"] and "one node" in msgs["nodes"], msgs["nodes"]


def _die_mid_ring(rank: int, world: int, mode: str):
    from ringflash.comm import ring

    if rank == 1:
        original, calls = ring.RingComm.post, [0]

        def post(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:  # the second hop of the forward ring
                if mode == "stuck":  # alive but silent: only the timeout can tell
                    time.sleep(PG_TIMEOUT + 20)
                os._exit(1)
            return original(self, *args, **kwargs)

        ring.RingComm.post = post
    q, k, v = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    t0 = time.monotonic()
    try:
        rp.ring_flash_attn_func(q, k, v, causal=True)
    except Exception as e:  # noqa: BLE001 - any error is the expected outcome
        return "raised", type(e).__name__, str(e)[:300], time.monotonic() - t0
    return "returned", "", "", time.monotonic() - t0


@pytest.mark.parametrize("mode", ["exit", "stuck"])
def test_dead_rank_fails_the_others_within_timeout(mode):
    res = spawn(_die_mid_ring, 3, mode, timeout=60, pg_timeout=PG_TIMEOUT, expect_dead={1})
    for rank in (0, 2):
        status, kind, msg, secs = res[rank]
        assert status == "raised", f"rank {rank} finished a ring whose rank 1 died"
        assert secs < PG_TIMEOUT + 10, (
            f"rank {rank} took {secs:.1f} s to notice the dead rank ({kind}: {msg})"
        )


def _assert_on_rank_one(rank: int, world: int):
    assert rank != 1, "deliberate failure on rank 1"
    return rank


def test_worker_assertions_reach_the_parent():
    with pytest.raises(AssertionError, match="deliberate failure on rank 1"):
        spawn(_assert_on_rank_one, 2, timeout=60)
