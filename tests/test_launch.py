"""Direct launches (``ringflash.kernels.launch``): a call whose signature was seen launches the
compiled kernel without Triton's binding; its results must equal Triton's own launch bit for bit
(CUDA: under the interpreter nothing is compiled, so every call takes Triton's path), and the
arguments it resolves from Triton's wrappers (any device)."""

from __future__ import annotations

import weakref

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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


@cuda
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


@cuda
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


def _wrapped_kernel():
    """A heuristics-over-autotune-over-jit kernel as the attention kernels are built (never run)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    def body(X, n, SCALE: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr):
        pass

    jit = triton.jit(body)
    configs = [triton.Config({"BLOCK": 32}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=8)]
    tuned = triton.autotune(configs, key=["n"])(jit)
    return jit, triton.heuristics({"PAD": lambda a: a["n"] * 2})(tuned), tuned


def test_direct_launch_arguments_are_those_triton_passes():
    """A direct launch passes what Triton's own launch did: the call's arguments, the heuristics'
    values computed from them, and the autotuner's chosen configuration, in the kernel's order, with
    the per-call tensors' places left open and empty (CPU: the resolution only, nothing launched)."""
    from ringflash.kernels.launch import _Bound, _resolve

    jit, wrapped, tuned = _wrapped_kernel()
    tuned.best_config = tuned.configs[1]  # as the autotuner leaves it after a launch
    x = torch.zeros(4)
    fn, meta = _resolve(wrapped, dict(n=100, SCALE=3, X=x))
    assert fn is jit
    assert meta["PAD"] == 200 and meta["BLOCK"] == 64 and meta["num_warps"] == 8 and meta["SCALE"] == 3
    bound = _Bound("compiled", fn, meta, lambda m: (m["n"] // m["BLOCK"],), dict(X=x))
    assert bound.grid == (1, 1, 1)
    assert bound.template == [None, 100, 3, 64, 200] and bound.open == ((0, "X"),)
    # The kept launch holds no tensor of the call that made it (a long sequence's would stay alive).
    y = torch.zeros(4)
    alive = weakref.ref(y)
    kept = _Bound("compiled", fn, {**meta, "X": y}, (1,), dict(X=y))
    del y
    assert alive() is None and kept.template[0] is None
    tuned.best_config = triton_config_with_hook(tuned.configs[0])
    assert _resolve(wrapped, dict(n=100, SCALE=3, X=x)) is None, "a pre-launch hook must run every time"


def triton_config_with_hook(config):
    import triton

    return triton.Config(config.kwargs, num_warps=config.num_warps, pre_hook=lambda args: None)
