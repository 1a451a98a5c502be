"""Every bad input through every entry point that takes it: a clear error, the same on every path.

Locally (no process group) each public function raises ``ValueError`` or ``TypeError`` with a
message that says what was expected. Over 2 gloo ranks, rank 1 alone gets the bad input and BOTH
ranks raise ``ValueError`` carrying rank 1's message, before any data moves (never a hang, an
abort or a half-filled result), and a good call afterwards still works.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from dist_utils import spawn

import ringflash as rf
from ringflash.integrations.deepspeed import DistributedAttention
from ringflash.integrations.transformers import make_attention

S, HQ, HK, D = 8, 4, 2, 16


def _inputs(n_tokens=S):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, n_tokens, h, D, generator=g) for h in (HQ, HK, HK)]


# name -> (how it breaks (q, k, v, opts), expected local error type, message regex)
def _opt(**kw):
    return lambda q, k, v, o: (q, k, v, {**o, **kw})


def _tensors(fn):
    return lambda q, k, v, o: (*fn(q, k, v), o)


BAD = {
    "dropout": (_opt(dropout_p=0.1), ValueError, "dropout"),
    "alibi": (_opt(alibi_slopes=torch.ones(HQ)), ValueError, "alibi_slopes is not supported"),
    "window-negative": (_opt(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
    "window-float": (_opt(window_size=(1.5, 0)), ValueError, r"window_size\[0\] must be an int"),
    "window-not-a-pair": (_opt(window_size=4), ValueError, "window_size must be a pair"),
    "softcap-negative": (_opt(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    "softcap-nan": (_opt(softcap=math.nan), ValueError, "softcap must be a finite float >= 0"),
    "softcap-inf": (_opt(softcap=math.inf), ValueError, "softcap must be a finite float >= 0"),
    "scale-zero": (_opt(softmax_scale=0.0), ValueError, "softmax_scale must be a positive finite float"),
    "scale-negative": (_opt(softmax_scale=-0.5), ValueError, "softmax_scale must be a positive finite float"),
    "scale-nan": (_opt(softmax_scale=math.nan), ValueError, "softmax_scale must be a positive finite float"),
    "scale-inf": (_opt(softmax_scale=math.inf), ValueError, "softmax_scale must be a positive finite float"),
    "scale-bool": (_opt(softmax_scale=True), ValueError, "softmax_scale must be a positive finite float"),
    "causal-string": (_opt(causal="yes"), ValueError, "causal must be True or False"),
    "dtype-float64": (_tensors(lambda q, k, v: (q.double(), k.double(), v.double())), TypeError, "float64"),
    "dtype-mixed": (_tensors(lambda q, k, v: (q, k.half(), v.half())), TypeError, "share one dtype"),
    "head-dim-300": (
        _tensors(
            lambda q, k, v: (
                (torch.randn(1, q.shape[1], HQ, 300),) + (torch.randn(1, k.shape[1], HK, 300),) * 2
            )
        ),
        ValueError,
        "head dim must be in 1..256",
    ),
    "heads-3-of-2": (_tensors(lambda q, k, v: (q[:, :, :3], k, v)), ValueError, "multiple of nheads"),
    "no-heads": (
        _tensors(lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0])),
        ValueError,
        "at least one head",
    ),
    "kv-shapes-differ": (
        _tensors(lambda q, k, v: (q, k, v[..., :8])),
        ValueError,
        "k and v must have the same shape",
    ),
    "not-a-tensor": (_tensors(lambda q, k, v: (q.tolist(), k, v)), TypeError, "must be a torch.Tensor"),
}
# Options a KV-cache call takes (flash-attn's flash_attn_with_kvcache has no dropout or ALiBi here).
KVCACHE_OPTS = ("softmax_scale", "causal", "window_size", "softcap")


def _packed(x):
    return x.flatten(0, 1) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _cu(n):
    return torch.tensor([0, n], dtype=torch.int32)


def _kvcache(fn):
    def call(q, k, v, **o):
        o = {n: o[n] for n in o if n in KVCACHE_OPTS}
        if isinstance(q, torch.Tensor) and q.dim() == 4:
            q = q[:, -1:]
        lens = torch.tensor([k.shape[1] - 1], dtype=torch.int32) if isinstance(k, torch.Tensor) else None
        return fn(q, k, v, cache_seqlens=lens, **o)

    return call


def _kvpacked(fn):
    def call(q, k, v, **o):
        kv = torch.stack([k, v], 2) if k.shape == v.shape and k.dtype == v.dtype else torch.stack([k, k], 2)
        return fn(q, kv, **o)

    return call


def _varlen(fn, world=1):
    def call(q, k, v, **o):
        q, k, v = (_packed(x) for x in (q, k, v))
        n = q.shape[0] * world if isinstance(q, torch.Tensor) and q.dim() else 0
        return fn(q, k, v, _cu(n), n, **o) if world > 1 else fn(q, k, v, _cu(n), _cu(n), n, n, **o)

    return call


def _local_entries():
    return {
        "flash_attn_func": rf.flash_attn_func,
        "flash_attn_kvpacked_func": _kvpacked(rf.flash_attn_kvpacked_func),
        "flash_attn_varlen_func": _varlen(rf.flash_attn_varlen_func),
        "flash_attn_with_kvcache": _kvcache(rf.flash_attn_with_kvcache),
    }


def _dist_entries(world, group=None):
    uly, ring = rf.build_usp_groups(1, world) if group is None else (None, None)
    ds = DistributedAttention(None, group)
    hf = make_attention(group, "zigzag")

    def transformers_fn(q, k, v, **o):
        if "causal" in o:
            o["is_causal"] = o.pop("causal")
        o = {"scaling" if n == "softmax_scale" else n: x for n, x in o.items()}
        qt, kt, vt = (x.transpose(1, 2) if isinstance(x, torch.Tensor) else x for x in (q, k, v))
        module = torch.nn.Module()
        return hf(module, qt, kt, vt, None, dropout=o.pop("dropout_p", 0.0), **o)[0]

    return {
        "ring_flash_attn_func": rf.ring_flash_attn_func,
        "zigzag_ring_flash_attn_func": rf.zigzag_ring_flash_attn_func,
        "stripe_flash_attn_func": rf.stripe_flash_attn_func,
        "zigzag_ring_flash_attn_kvpacked_func": _kvpacked(rf.zigzag_ring_flash_attn_kvpacked_func),
        "ring_flash_attn_varlen_func": _varlen(rf.ring_flash_attn_varlen_func, world),
        "ulysses_attn_func": rf.ulysses_attn_func,
        "usp_attn_func": lambda q, k, v, **o: rf.usp_attn_func(
            q, k, v, ulysses_group=uly, ring_group=ring, **o
        ),
        "sharded_flash_attn_with_kvcache": _kvcache(rf.sharded_flash_attn_with_kvcache),
        "deepspeed DistributedAttention": lambda q, k, v, **o: ds(q, k, v, 0, **o),
        "transformers attention": transformers_fn,
    }


def _applies(entry: str, bad: str) -> bool:
    if "kvcache" in entry and bad in ("dropout", "alibi", "kv-shapes-differ"):
        return False  # no such option; the cache is k_cache/v_cache, checked in test_decode
    if "kvpacked" in entry and bad == "kv-shapes-differ":
        return False  # one packed tensor cannot hold two shapes
    if entry == "transformers attention" and bad in (
        "alibi",
        "window-float",
        "window-negative",
        "window-not-a-pair",
        "causal-string",
    ):
        return False  # transformers passes sliding_window and the module's is_causal
    return True


LOCAL_CASES = [(e, b) for e in _local_entries() for b in BAD if _applies(e, b)]


@pytest.mark.parametrize("entry, bad", LOCAL_CASES, ids=[f"{e}-{b}" for e, b in LOCAL_CASES])
def test_local_bad_input(entry, bad):
    breaks, err, match = BAD[bad]
    q, k, v, opts = breaks(*_inputs(), {"causal": True})
    with pytest.raises(err, match=match):
        _local_entries()[entry](q, k, v, **opts)


@pytest.mark.parametrize("entry", list(_local_entries()))
def test_numpy_bools_are_flags(entry):
    """``causal=np.bool_(True)`` (a flag read from a NumPy config) is ``causal=True``."""
    np = pytest.importorskip("numpy")
    q, k, v = _inputs()
    want = _local_entries()[entry](q, k, v, causal=True)
    torch.testing.assert_close(_local_entries()[entry](q, k, v, causal=np.bool_(True)), want, rtol=0, atol=0)


def _run_table(rank, world):
    """Rank 1 alone gets each bad input; returns {case: (exception type, message)} for this rank."""
    entries = _dist_entries(world)
    got = {}
    for entry, fn in entries.items():
        for bad, (breaks, _, _) in BAD.items():
            if not _applies(entry, bad):
                continue
            q, k, v = _inputs(S // world)
            opts = {"causal": True}
            if rank == 1:
                q, k, v, opts = breaks(q, k, v, opts)
            try:
                fn(q, k, v, **opts)
                got[(entry, bad)] = (None, "no error")
            except Exception as e:  # noqa: BLE001 - the type is what the test checks
                got[(entry, bad)] = (type(e).__name__, str(e))
        q, k, v = _inputs(S // world)
        out = fn(q, k, v, causal=True)  # still in step after all of that
        got[(entry, "good")] = (None, tuple(out.shape))
    return got


@pytest.mark.skipif(os.environ.get("RINGFLASH_TEST_BACKEND") == "triton", reason="gloo CPU ranks")
def test_distributed_bad_input_raises_on_every_rank():
    results = spawn(_run_table, 2, timeout=300)
    failures = []
    for rank, got in enumerate(results):
        for (entry, bad), (etype, msg) in got.items():
            if bad == "good":
                if etype is not None:
                    failures.append(f"rank {rank} {entry}: a good call after the bad ones failed: {msg}")
                continue
            _, _, match = BAD[bad]
            if etype != "ValueError" or not re.search(match, msg):
                failures.append(f"rank {rank} {entry} {bad}: {etype}: {msg[:300]}")
    assert not failures, "\n".join(failures)


def _sharded_decode_query_lengths(rank, world):
    """Ranks passing different query lengths once aborted one rank and left the other with an
    output built from a half-filled buffer; now every rank raises before the collective."""
    q = torch.randn(1, 1 + rank, HQ, D)
    cache = torch.randn(1, 8, HK, D)
    try:
        rf.sharded_flash_attn_with_kvcache(q, cache, cache, cache_seqlens=4)
    except ValueError as e:
        return str(e)
    return "no error"


def test_sharded_decode_ranks_with_different_query_lengths_raise():
    for msg in spawn(_sharded_decode_query_lengths, 2, timeout=60):
        assert "disagree on q shape (rank 0: [1, 1, 4, 16], rank 1: [1, 2, 4, 16])" in msg, msg
