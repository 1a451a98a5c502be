"""Direct launches (``ringflash.kernels.launch``): a call whose signature was seen launches the
compiled kernel without Triton's binding; its results must equal Triton's own launch bit for bit
(CUDA only: under the interpreter nothing is compiled, so every call takes Triton's path)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _direct_slots(table) -> int:
    """How many compiled kernels ``table`` (a signature table) launches directly."""
    from ringflash.kernels.launch import _Bound

    def count(x):
        if isinstance(x, _Bound):
            return 1
        if isinstance(x, dict):
            return sum(count(v) for v in x.values())
        if isinstance(x, (tuple, list)):
            return sum(count(v) for v in x)
        return getattr(x, "compiled", None) is not None and count(x.compiled)

    return sum(count(v) for v in table.values())


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a tensor whose data starts 2 bytes past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
    y = flat[1 : 1 + x.numel()].view(x.shape)
    y.copy_(x)
    assert y.data_ptr() % 16 != 0
    return y


# (B, S, Hq, Hk, D): pointer loads; >= 8192 tokens, the TMA descriptor path on Hopper
SHAPES = [(2, 300, 8, 2, 64), (1, 8200, 4, 2, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"S{s[1]}" for s in SHAPES])
def test_forward_and_backward_direct_launch_equals_triton_launch(shape):
    from ringflash.kernels import bwd, fwd

    B, S, Hq, Hk, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (Hq, Hk, Hk, Hq)
    )
    kw = dict(softmax_scale=D**-0.5, causal=True)

    def step(q, k, v, do):
        out, lse = fwd.attn_fwd(q, k, v, **kw)
        return (out, lse, *bwd.attn_bwd(do, q, k, v, out, lse, **kw))

    for inputs in ((q, k, v, do), tuple(_misaligned(x) for x in (q, k, v, do))):
        fwd._FWD_LAUNCHES.clear()
        bwd._BWD_LAUNCHES.clear()
        triton_path = step(*inputs)  # first sight of the signature: Triton's own launch
        direct = step(*inputs)
        assert _direct_slots(fwd._FWD_LAUNCHES) >= 1 and _direct_slots(bwd._BWD_LAUNCHES) >= 2
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), triton_path, direct, strict=True):
            assert torch.equal(a, b), f"{name}: the direct launch differs"
    cu = torch.tensor([0, S // 3, B * S], dtype=torch.int32, device="cuda")
    packed = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=B * S, max_seqlen_k=B * S)
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    fwd._FWD_LAUNCHES.clear()
    first = fwd.attn_fwd(*flat, **kw, **packed)
    for a, b in zip(first, fwd.attn_fwd(*flat, **kw, **packed), strict=True):
        assert torch.equal(a, b), "packed: the direct launch differs"


@pytest.mark.parametrize("n_new", [0, 1])
def test_decode_direct_launch_equals_triton_launch(n_new):
    import ringflash as rf
    from ringflash.kernels import decode

    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, Hq, Hk, D = 3, 2048, 8, 2, 64
    kc = torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, n_new, Hk, D, device="cuda", dtype=torch.bfloat16, generator=g) if n_new else None
    v = torch.randn_like(k) if n_new else None
    lens = torch.tensor([5, 1000, S - 1], dtype=torch.int32, device="cuda")
    results = []
    for direct in (False, True):
        if not direct:
            decode._LAUNCHES.clear()
        kc2, vc2 = kc.clone(), vc.clone()
        out, lse = rf.flash_attn_with_kvcache(
            q, kc2, vc2, k, v, cache_seqlens=lens, causal=True, return_softmax_lse=True
        )
        results.append((out, lse, kc2, vc2))
    assert _direct_slots(decode._LAUNCHES) >= 1
    for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), *results, strict=True):
        assert torch.equal(a, b), f"{name}: the direct launch differs"
    rf.check_device_errors()
