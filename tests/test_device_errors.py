"""Value checks on the device (``ringflash.device_errors``): no host sync, errors reported later."""

from __future__ import annotations

import pytest
import torch
from dist_utils import spawn
from test_decode import _bad_setup, assert_checks, unchecked_bad_values

import ringflash as rf

WHAT = {
    "lens": "a negative cache_seqlens entry; cache_seqlens \\+ the new tokens larger than the cache holds",
    "cbi": "a cache_batch_idx entry outside the cache's rows",
    "paged": "cache_seqlens \\+ the new tokens larger than the cache holds; a block_table entry outside",
}


@pytest.mark.parametrize("variant", ["lens", "cbi", "paged"])
def test_device_checks_report_bad_values_after_the_call(variant):
    """The faulty call raises nothing and stays inside the cache; ``check_device_errors`` then
    names what it had, once."""
    assert_checks(unchecked_bad_values("cpu", "torch", variant, checks="device"), variant)
    with pytest.raises(ValueError, match=f"an earlier KV-cache call on cpu had {WHAT[variant]}"):
        rf.check_device_errors()
    rf.check_device_errors()  # reported and cleared


def test_device_checks_raise_in_the_next_call():
    q, kc, vc, k, v, lens = _bad_setup()
    with rf.use_value_checks("device"):
        rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
        with pytest.raises(ValueError, match="an earlier KV-cache call .* larger than the cache holds"):
            rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens)
        out = rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens)
    with rf.use_value_checks("host"):
        want = rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens)
        with pytest.raises(ValueError, match="too small"):  # host mode: in the call, naming values
            rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
    assert torch.equal(out, want), "a good call gives the same output in either mode"


def test_flag_words_match_the_check_bits():
    """The check kernels set one flag word per bit of ``BITS``: a bit past their words would be
    dropped on the device."""
    pytest.importorskip("triton")
    from ringflash.device_errors import BITS, KERNEL_WORDS
    from ringflash.kernels.common import FLAG_WORDS

    assert FLAG_WORDS == KERNEL_WORDS == len(BITS)
    assert sorted(BITS.values()) == [1 << i for i in range(KERNEL_WORDS)]


def test_value_check_modes():
    q, kc, vc, k, v, lens = _bad_setup()
    with pytest.raises(ValueError, match="too small"):  # CPU tensors: checked on the host by default
        rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
    with rf.use_value_checks("off"):
        rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
    rf.check_device_errors()  # "off" queued nothing
    with rf.use_value_checks("device"):
        rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
    with pytest.raises(ValueError, match="on cpu had"):
        rf.check_device_errors("cpu")  # one device by name
    with pytest.raises(ValueError, match="unknown value-check mode 'fast'"):
        with rf.use_value_checks("fast"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_checks_values_without_a_sync():
    """CUDA tensors in ``"device"`` mode: a KV-cache call's value checks queue on the device (no
    host sync); a bad length is reported by ``check_device_errors``."""
    q, kc, vc, k, v, lens = (x.cuda() for x in _bad_setup())
    rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens)  # compile first
    torch.cuda.synchronize()
    with rf.use_value_checks("device"):
        rf.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens)  # the check's compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            rf.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
            rf.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens + 100)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="larger than the cache holds"):
        rf.check_device_errors()


def value_bits_cases(n_cases: int = 40, seed: int = 0) -> dict:
    """The check kernel of the backend in use against the torch verdicts (``KVCacheArgs.value_verdicts``)
    on random calls with bad values planted: ``{check: [mismatches, 0]}``."""
    import random

    from ringflash.backends import backend_for
    from ringflash.device_errors import take_bits, verdict_bits
    from ringflash.kv_checks import KVCacheArgs

    rng = random.Random(seed)
    mismatches, seen = [], 0
    for case in range(n_cases):
        B = rng.choice([1, 3, 17, 300])
        n_new = rng.choice([0, 1, 3])
        kind = rng.choice(["plain", "leftpad", "paged", "cbi"])
        page = 4
        cap = 32
        n_rows = {"paged": 20, "cbi": B + 5}.get(kind, B)
        lens = [rng.randint(0, cap - n_new) for _ in range(B)]
        if rng.random() < 0.5:
            lens[rng.randrange(B)] = rng.choice([-1, cap - n_new + 1])
        kw = {}
        if kind == "leftpad":
            pad = [rng.randint(0, max(0, n + n_new)) for n in lens]
            if rng.random() < 0.5:
                pad[rng.randrange(B)] = rng.choice([-2, cap + 1])
            kw["cache_leftpad"] = torch.tensor(pad, dtype=torch.int32)
        if kind == "paged":
            bt = torch.randint(0, n_rows, (B, cap // page), dtype=torch.int32)
            if rng.random() < 0.6:
                bt[rng.randrange(B), rng.randrange(cap // page)] = rng.choice([-1, n_rows])
            kw["block_table"] = bt
        if kind == "cbi":
            rows = rng.sample(range(n_rows), B)
            if rng.random() < 0.3:
                rows[rng.randrange(B)] = rng.choice([-1, n_rows])
            if rng.random() < 0.3 and B > 1:
                rows[0] = rows[-1]
            kw["cache_batch_idx"] = torch.tensor(rows, dtype=torch.int32)
        slots = page if kind == "paged" else cap
        q = torch.randn(B, 1, 1, 8)
        kc, vc = torch.zeros(n_rows, slots, 1, 8), torch.zeros(n_rows, slots, 1, 8)
        k = v = torch.randn(B, n_new, 1, 8) if n_new else None
        with rf.use_value_checks("off"):
            a = KVCacheArgs(
                q, kc, vc, k, v, torch.tensor(lens, dtype=torch.int32), kw.get("cache_batch_idx"),
                kw.get("block_table"), 0, kw.get("cache_leftpad"),
            )  # fmt: skip
        want = int(verdict_bits(a.value_verdicts(kc), q.device))
        take_bits(q.device)
        backend_for(q).check_kv_values(a, kc)
        got = take_bits(q.device)
        seen |= want
        if want != got:
            mismatches.append((case, kind, want, got))
    return {"bits as the torch checks": [len(mismatches), 0], "every bit planted": [float(seen != 63), 0.0]}


def test_torch_backend_value_bits():
    assert_checks(value_bits_cases(), "torch bits")


def _sharded_device_checks(rank, world):
    """Rank 1 passes a length past its shard in device mode: no error in that call; the next
    sharded call raises on every rank (the ranks agree on the error before any collective)."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    good = torch.tensor([5, 3], dtype=torch.int32)
    bad = torch.tensor([5, 9], dtype=torch.int32) if rank == 1 else good
    seen = {}
    with rf.use_value_checks("device"):
        rf.sharded_flash_attn_with_kvcache(q, kc, vc, cache_seqlens=bad)
        try:
            rf.sharded_flash_attn_with_kvcache(q, kc, vc, cache_seqlens=good)
            seen["next call"] = "no error"
        except ValueError as e:
            seen["next call"] = str(e)
    return seen


def test_sharded_decode_device_checks_raise_on_every_rank():
    for rank, seen in enumerate(spawn(_sharded_device_checks, 2, timeout=120)):
        assert "larger than the cache holds" in seen["next call"], (rank, seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["lens", "cbi", "paged"])
def test_cuda_default_checks_in_the_decode_kernel(variant):
    """CUDA tensors are checked on the device by default, inside the decoding kernel: the faulty
    call stays inside the cache and ``check_device_errors`` names what it had."""
    checks = unchecked_bad_values("cuda", "triton", variant, checks=None)
    assert_checks(checks, variant)
    with pytest.raises(ValueError, match=f"an earlier KV-cache call on cuda:0 had {WHAT[variant]}"):
        rf.check_device_errors()
    rf.check_device_errors()


# ------------------------------------------------------------------ packed sequences (cu_seqlens)


def cu_bounds_cases(n_cases: int = 40, seed: int = 1, device: str = "cpu") -> dict:
    """``flash_attn_varlen_func`` in ``"device"`` mode through the backend in use (the Triton
    kernels bound each sequence themselves) reports the bits that ``checks.bounded_cu`` finds, on
    random calls with bad values planted: a start past 0, a decrease, a negative entry, an end past
    or short of the rows, a sequence past ``max_seqlen``. Each signature is called twice: the first
    call takes the full path, the second its plan. Valid values give the host-checked call's
    output bit for bit."""
    import random

    from ringflash.checks import bounded_cu
    from ringflash.device_errors import take_bits, verdict_bits

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    device = torch.empty(0, device=device).device  # with its index: the flag is kept per "cuda:0"
    mismatches, seen, differ = [], 0, 0.0
    # Calls in which no attention program runs (bounded by torch operations instead): a longest
    # sequence of 0 with 5 tokens; tensors of no rows with a cu_seqlens that ends past them.
    fixed = [([5], "max"), ([0], "end")]
    for case in range(n_cases + len(fixed)):
        lens, kind = fixed[case - n_cases] if case >= n_cases else (None, None)
        if lens is None:
            lens = [rng.randint(0, 9) for _ in range(rng.choice([1, 2, 5, 12]))]
            kind = rng.choice(["none", "start", "drop", "negative", "end", "max"])
        n_seq = len(lens)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        total, longest = cu[-1], max(lens, default=0)
        bad = list(cu)
        if kind == "start":
            bad[0] = rng.choice([1, -3])
        elif kind == "drop" and n_seq > 1:
            bad[rng.randrange(1, n_seq)] = total + 5
        elif kind == "negative":
            bad[rng.randrange(n_seq + 1)] = -7
        elif kind == "end":
            bad[-1] = total + rng.choice([-1, 3])
        elif kind == "max":
            longest = 0 if case >= n_cases else max(0, longest - 1)
        cu_q = torch.tensor(bad, dtype=torch.int32, device=device)
        cu_k = cu_q if rng.random() < 0.5 else torch.tensor(cu, dtype=torch.int32, device=device)
        want = 0
        for c, n in ((cu_q, longest), (cu_k, longest + 1)):
            want |= int(verdict_bits(bounded_cu(c, total, n)[1], cu_q.device))
        q, k, v = (torch.randn(total, h, 16, generator=g).to(device) for h in (2, 1, 1))
        args = (q, k, v, cu_q, cu_k, longest, longest + 1)
        take_bits(device)
        outs = []
        for _ in range(2):
            with rf.use_value_checks("device"):
                outs.append(rf.flash_attn_varlen_func(*args, causal=True))
            if device.type == "cuda":
                torch.cuda.synchronize()
            got = take_bits(device)
            seen |= got
            if got != want:
                mismatches.append((case, kind, want, got))
        if want == 0:
            with rf.use_value_checks("host"):
                ref = rf.flash_attn_varlen_func(*args, causal=True)
            differ = max([differ] + [float(not torch.equal(o, ref)) for o in outs])
    return {
        "bits as the torch checks": [len(mismatches), 0],
        "both bits planted": [float(seen != 192), 0.0],
        "valid calls as host-checked": [differ, 0.0],
    }


def bad_cu_call(device: str = "cpu") -> dict:
    """``flash_attn_varlen_func`` with a ``cu_seqlens`` that ends past the rows and decreases, in
    ``"device"`` mode: it raises nothing, reads and writes only the rows it has, computes the rows
    of the sequences before the bad entries as the bounded ``cu_seqlens`` describe them (the rows
    after them are wrong, as the error says), and a later check names it."""
    from ringflash.device_errors import take_bits

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(20, h, 16, generator=g).to(device) for h in (4, 2, 2))
    bad = torch.tensor([0, 6, 4, 30], dtype=torch.int32, device=device)
    bounded = torch.tensor([0, 6, 6, 20], dtype=torch.int32, device=device)
    take_bits(q.device)
    with rf.use_value_checks("host"):
        want = rf.flash_attn_varlen_func(q, k, v, bounded, bounded, 14, 14, causal=True)
    with rf.use_value_checks("device"):
        out = rf.flash_attn_varlen_func(q, k, v, bad, bad, 14, 14, causal=True)
    try:
        rf.check_device_errors()
        reported = 1.0
    except ValueError as e:
        reported = float("does not start at 0, decreases, or does not end" not in str(e))
    first = (out[:4] - want[:4]).abs().max().item()  # rows 4-5 are in the bad sequence [4, 30) too
    return {"computes the rows before the bad entries": [first, 0.0], "reported": [reported, 0.0]}


def test_bounded_cu_seqlens():
    """The bounded copy of a bad ``cu_seqlens`` and its bits, worked by hand (the torch operations
    that bound packed calls on backends other than Triton's)."""
    from ringflash.backends import _bounded_by_ops
    from ringflash.device_errors import take_bits

    cu = torch.tensor([0, 5, 3, 30], dtype=torch.int32)
    q = torch.zeros(20, 1, 1)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=8, max_seqlen_k=8)
    take_bits("cpu")
    got = _bounded_by_ops(q, q, kw, "report")
    assert got["cu_seqlens_q"].tolist() == [0, 5, 5, 20] and got["cu_seqlens_k"] is got["cu_seqlens_q"]
    assert take_bits("cpu") == 64 | 128  # a decrease and an end past the rows; 27 > max_seqlen 8
    assert _bounded_by_ops(q, q, kw, "clamp")["cu_seqlens_q"].tolist() == [0, 5, 5, 20]
    assert take_bits("cpu") == 0  # clamped, not reported
    good = torch.tensor([0, 5, 9, 20], dtype=torch.int32)
    kw = dict(cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=11, max_seqlen_k=11)
    assert _bounded_by_ops(q, q, kw, "report")["cu_seqlens_q"].tolist() == good.tolist()
    assert take_bits("cpu") == 0
    assert_checks(cu_bounds_cases(), "cu bounds")


def test_varlen_device_checks_report_bad_cu_seqlens():
    assert_checks(bad_cu_call(), "bad cu_seqlens")
    cu = torch.tensor([0, 5, 3, 20], dtype=torch.int32)
    q = torch.randn(20, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):  # host mode names values
        rf.flash_attn_varlen_func(q, q, q, cu, cu, 20, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_varlen_checks_without_a_sync():
    """CUDA tensors: ``flash_attn_varlen_func`` bounds and checks ``cu_seqlens`` on the device by
    default, with no host sync; a bad one is reported later, by the kernels' own checks too."""
    q = torch.randn(20, 4, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 6, 20], dtype=torch.int32, device="cuda")
    rf.flash_attn_varlen_func(q, q, q, cu, cu, 14, 14, causal=True)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rf.flash_attn_varlen_func(q, q, q, cu, cu, 14, 14, causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rf.check_device_errors()
    assert_checks(bad_cu_call("cuda"), "bad cu_seqlens")
    assert_checks(cu_bounds_cases(device="cuda"), "cu bounds")
