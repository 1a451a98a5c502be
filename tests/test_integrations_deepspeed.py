"""DeepSpeed integration on real gloo processes, against the float64 oracle.

- DeepSpeed's own ``deepspeed.sequence.layer.DistributedAttention`` with ringflash as the local
  attention (skipped when deepspeed is not installed);
- ringflash's drop-in ``DistributedAttention`` (needs no DeepSpeed) with a sequence-parallel degree
  beyond the KV and query head counts: Ulysses with KV replication, hybrid and ring, both
  ``batch_dim_idx`` layouts, a custom local attention, and its bad-input errors.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from dist_utils import refreshed_untracked, spawn
from oracle import assert_matches

from ringflash.integrations.deepspeed import DistributedAttention, local_attention
from ringflash.parallel.sharding import shard
from ringflash.reference import attention_ref

HAS_DS = importlib.util.find_spec("deepspeed") is not None


def _check(rank, world, attn, H, batch_dim_idx=0, L=3, B=2, D=16, ref_causal=None, **kw):
    """Run ``attn(q, k, v, batch_dim_idx, **kw)`` on contiguous shards; compare out, dq, dk, dv."""
    torch.manual_seed(7)
    hq, hk = H
    S = world * L
    q, k, v = torch.randn(B, S, hq, D), torch.randn(B, S, hk, D), torch.randn(B, S, hk, D)
    dout = torch.randn(B, S, hq, D)

    def sh(x):
        x = shard(x, dim=1, layout="contiguous")
        return x.transpose(0, 1).contiguous() if batch_dim_idx == 1 else x

    ql, kl, vl = (sh(x).requires_grad_() for x in (q, k, v))
    out = attn(ql, kl, vl, batch_dim_idx, **kw)
    out.backward(sh(dout))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    causal = kw.get("causal", False) if ref_causal is None else ref_causal
    ref, _ = attention_ref(q64, k64, v64, causal=causal)
    ref.backward(dout.double())
    tag = f"rank {rank}/{world} H{hq}:{hk} bdim{batch_dim_idx}"
    assert_matches(f"{tag} out", out, sh(ref.detach()), None, 2)
    assert_matches(f"{tag} dq", ql.grad, sh(q64.grad), None, 3)
    assert_matches(f"{tag} dk", kl.grad, sh(k64.grad), None, 3)
    assert_matches(f"{tag} dv", vl.grad, sh(v64.grad), None, 3)


def _deepspeed_worker(rank, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention as DSAttention

    from ringflash import flash_attn_func
    from ringflash.backends import use_backend

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the process group dist_utils made
    with use_backend("torch"):
        # flash_attn_func itself: DeepSpeed hands it [B, S, H/P, D] for batch_dim_idx 0.
        _check(rank, world, DSAttention(flash_attn_func, dist.group.WORLD, 2, 1), (4, 2), causal=True)
        for bdim in (0, 1):
            ds = DSAttention(
                local_attention(bdim, causal=True), dist.group.WORLD, scatter_idx=2, gather_idx=1
            )
            _check(rank, world, ds, (4, 2), bdim, ref_causal=True)
    return deepspeed.__version__


@pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install ringflash[deepspeed])")
def test_deepspeed_distributed_attention_with_ringflash_local_attention():
    versions = spawn(_deepspeed_worker, 2, timeout=180)
    assert all(v == versions[0] for v in versions)


def _dropin_worker(rank, world):
    import torch.distributed as dist

    from ringflash.backends import use_backend

    res = {}
    with use_backend("torch"):
        attn = DistributedAttention(None, dist.group.WORLD)
        res["plans"] = [attn.plan(h) for h in (4, 2, 3, 8)]
        _check(rank, world, attn, (4, 1), causal=True)  # Ulysses, each KV head repeated 4 times
        _check(rank, world, attn, (2, 1), causal=True)  # hybrid 2 x 2 (2 q heads < 4 ranks)
        _check(rank, world, attn, (2, 2), batch_dim_idx=1)  # hybrid, [S, B, H, D]
        _check(rank, world, attn, (3, 1), causal=True, L=2)  # ring: gcd(3, 4) = 1
        zig = DistributedAttention(None, None, layout="zigzag")
        res["zigzag-plan"] = zig.plan(2)

        def mine(q, k, v, causal=False):  # a user's own local attention, [B, S, H/P, D]
            return attention_ref(q, k, v, causal=causal)[0]

        _check(rank, world, DistributedAttention(mine, dist.group.WORLD), (4, 2), causal=True)
        errors = []
        for make, call in (
            (lambda: DistributedAttention(mine, None), lambda a, x: a(x, x, x, 0)),  # 2 heads over 4 ranks
            (lambda: DistributedAttention(None, None, scatter_idx=1), None),
            (lambda: DistributedAttention(None, None), lambda a, x: a(x, x, x, 0, torch.ones(1))),
            (lambda: DistributedAttention(None, None), lambda a, x: a(x, x, x, 0, bogus=1)),
        ):
            try:
                a = make()
                call(a, torch.randn(1, 2, 2, 8))
            except ValueError as e:
                errors.append(str(e))
        res["errors"] = errors
    return res


def test_dropin_beyond_head_count():
    res = spawn(_dropin_worker, 4, timeout=180)
    assert res[0]["plans"] == [("ulysses", 4, 1), ("hybrid", 2, 2), ("ring", 1, 4), ("ulysses", 4, 1)]
    assert res[0]["zigzag-plan"] == ("hybrid", 2, 2)
    errs = res[0]["errors"]
    assert len(errs) == 4, errs
    assert "local_attention=None" in errs[0] and "scatter_idx" in errs[1]
    assert "rotary_pos_emb" in errs[2] and "bogus" in errs[3]


def _one_rank_differs_worker(rank, world):
    """Rank 0 alone passes an unknown option, or alone marks a packed batch by position ids: every
    rank raises ValueError (no rank is left in a collective the others never enter)."""
    from ringflash.backends import use_backend

    q, kv = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 2, 8)
    seen = {}
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with use_backend("torch"):
        cases = (
            ("option", {"bogus": 1}),
            ("position_ids", {"position_ids": torch.arange(6)[None]}),
            ("probs", {"return_attn_probs": True}),
            ("short_positions", {"position_ids": torch.arange(5)[None]}),
            ("cu_k", {"cu_seq_lens_q": cu, "cu_seq_lens_k": torch.tensor([0, 6, 12], dtype=torch.int32)}),
        )
        for case, extra in cases:
            try:
                DistributedAttention(None, None)(q, kv, kv, 0, causal=True, **(extra if rank == 0 else {}))
                seen[case] = "returned"
            except ValueError as e:
                seen[case] = str(e)
    return seen


def test_dropin_option_on_one_rank_fails_every_rank():
    for seen in spawn(_one_rank_differs_worker, 2, timeout=120):
        assert "bogus" in seen["option"], seen
        # Rank 0's gather of position ids meets rank 1's Ulysses agreement: both raise.
        assert "disagree on position_ids shape (rank 0: [1, 6], rank 1: None)" in seen["position_ids"], seen
        assert "rank 0: return_attn_probs is not supported" in seen["probs"], seen
        assert (
            "rank 0: position_ids must be this rank's [B=1, S_local=6], got (1, 5)" in seen["short_positions"]
        )
        assert "rank 0: cu_seq_lens_q and cu_seq_lens_k differ" in seen["cu_k"], seen


def _one_document_worker(rank, world, hq, layout, sharding):
    """One sequence marked by its position ids, sharded as the docs say for each path: a packed row
    of one document (``shard(..., cu_seqlens=cu)``), or a plain sequence in the hybrid's order
    (``usp_shard``). Both must equal the oracle (a one-document stripe row was once taken for a
    plain sequence and run through Ulysses in the wrong order)."""
    from ringflash.backends import use_backend
    from ringflash.parallel import positions
    from ringflash.parallel.hybrid import usp_positions_for

    torch.manual_seed(5)
    n = 4 * world
    q, k, v = (torch.randn(1, n, h, 8, dtype=torch.float64).float() for h in (hq, 2, 2))
    attn = DistributedAttention(None, None, layout=layout)
    algo, u, r = attn.plan(hq)
    if sharding == "packed":
        idx = positions(layout, rank, world, n // world)  # one document: the plain layout
    else:
        idx = usp_positions_for(rank % u, rank // u, u, r, n // world, layout if r > 1 else "contiguous")
    with use_backend("torch"):
        out = attn(q[:, idx], k[:, idx], v[:, idx], 0, causal=True, position_ids=idx[None])
    ref, _ = attention_ref(q.double(), k.double(), v.double(), causal=True)
    assert_matches(f"rank {rank} {algo} {layout} {sharding}", out, ref[:, idx], None, 2)


@pytest.mark.parametrize(
    "world, hq, layout, sharding",
    [
        (2, 4, "stripe", "packed"),
        (2, 4, "zigzag", "packed"),
        (4, 6, "stripe", "packed"),
        (4, 6, "stripe", "usp"),
    ],
)
def test_dropin_one_sequence_marked_by_position_ids(world, hq, layout, sharding):
    spawn(_one_document_worker, world, hq, layout, sharding, timeout=180)


def test_dropin_layout_is_checked():
    with pytest.raises(ValueError, match="unknown layout 'bogus'"):
        DistributedAttention(None, None, layout="bogus")
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="takes a packed batch"):
        DistributedAttention(None, None, layout="balanced")(x, x, x, 0)


def test_local_attention_adapter_single_process():
    q, k = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16)
    ref, _ = attention_ref(q.double(), k.double(), k.double(), causal=True)
    out = local_attention(causal=True)(q, k, k)
    assert_matches("bdim0", out, ref, None, 2)
    out1 = local_attention(1)(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1), 0.0, None, True)
    assert_matches("bdim1", out1.transpose(0, 1), ref, None, 2)
    with pytest.raises(ValueError, match="batch_dim_idx"):
        local_attention(2)
    out2 = DistributedAttention(None, None)(q, k, k, 0, causal=True)  # no process group: local
    assert_matches("drop-in local", out2, ref, None, 2)


@pytest.mark.skipif(not HAS_DS, reason="deepspeed is not installed (pip install ringflash[deepspeed])")
def test_deepspeed_launcher_example_trains_on_cpu(tmp_path):
    """launch/deepspeed_train_lm.py under torchrun on 4 CPU ranks: ZeRO-2, hybrid 2 x 2, exact first loss."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        "bash",
        os.path.join(root, "launch", "deepspeed_run_cpu.sh"),
        "4",
        "--steps",
        "2",
        "--seq-len",
        "64",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "OK: 4 rank(s), hybrid (ulysses 2 x ring 2), ZeRO stage 2" in res.stdout, out[-4000:]


def _packed_worker(rank, world, hq, hk, marks):
    """The drop-in with a packed batch (one row of documents, marked as transformers marks it):
    Ulysses when the heads divide, the ring when they do not; against the oracle per document."""
    import itertools

    from ringflash.backends import use_backend
    from ringflash.parallel import doc_positions
    from ringflash.reference import attention_varlen_ref

    torch.manual_seed(3)
    lens = [5, 1, 9, 2, 7]  # 24 tokens
    lens[-1] += (-sum(lens)) % world
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v, dout = (torch.randn(T, h, 16) for h in (hq, hk, hk, hq))
    pos = torch.cat([torch.arange(n) for n in lens])
    sh = lambda x: shard(x, dim=0, layout="contiguous", cu_seqlens=cu)  # noqa: E731
    ql, kl, vl = (sh(x)[None].requires_grad_() for x in (q, k, v))
    kw = (
        dict(position_ids=sh(pos)[None])
        if marks == "position_ids"
        else dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    )
    with use_backend("torch"):
        out = DistributedAttention(None, None)(ql, kl, vl, 0, causal=True, **kw)
        out.backward(sh(dout)[None])
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = attention_varlen_ref(*leaves, cu, cu, causal=True)
    ref.backward(dout.double())
    idx = doc_positions("contiguous", tuple(cu.tolist()), rank, world)
    tag = f"rank {rank}/{world} H{hq}:{hk} {marks}"
    assert_matches(f"{tag} out", out[0], ref.detach()[idx], None, 2)
    for name, got, x in zip(("dq", "dk", "dv"), (ql, kl, vl), leaves, strict=True):
        assert_matches(f"{tag} {name}", got.grad[0], x.grad[idx], None, 3)


@pytest.mark.parametrize(
    "hq, hk, marks", [(4, 2, "position_ids"), (3, 1, "cu")], ids=["ulysses-posids", "ring-cu"]
)
def test_dropin_takes_packed_batches(hq, hk, marks):
    spawn(_packed_worker, 2, hq, hk, marks, timeout=120)


def _reused_positions_worker(rank, world):
    """Two "layers" (drop-in modules) over two packed batches whose documents differ; rank 1 passes
    one position-id tensor refreshed in place where torch keeps no version (as a collective into a
    reused buffer writes), rank 0 new tensors: every call follows its batch's documents, and no
    rank gathers alone (the first module built refreshes on every rank)."""
    import itertools

    from ringflash.backends import use_backend
    from ringflash.parallel import doc_positions
    from ringflash.reference import attention_varlen_ref

    layers = [DistributedAttention(None, None) for _ in range(2)]
    reused = None
    for lens in ([5, 1, 9, 9], [11, 3, 4, 6]):
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        q, k, v = (torch.randn(24, h, 16, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
        mine = shard(torch.cat([torch.arange(n) for n in lens]), dim=0, layout="contiguous")[None]
        if rank == 1:
            reused = mine = refreshed_untracked(reused, mine)
        ref, _ = attention_varlen_ref(q.double(), k.double(), v.double(), cu, cu, causal=True)
        idx = doc_positions("contiguous", tuple(cu.tolist()), rank, world)
        for n, layer in enumerate(layers):
            ql, kl, vl = (shard(x, dim=0, layout="contiguous")[None] for x in (q, k, v))
            with use_backend("torch"):
                out = layer(ql, kl, vl, 0, causal=True, position_ids=mine)
            assert_matches(f"rank {rank} documents {lens} layer {n}", out[0], ref[idx], None, 2)


def test_dropin_position_ids_refreshed_in_place_on_one_rank_give_the_new_documents():
    spawn(_reused_positions_worker, 2, timeout=120, pg_timeout=30)
