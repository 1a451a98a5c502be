"""The attention kernels' tiles against the inputs: which tile configs the autotuners may try for a
call's element size and head dim, and the calls that no tile fits (float32 above head dim 128 on
a GPU), which the Triton backend runs on the blockwise backend."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import ringflash as rf
from ringflash.reference import attention_ref


def test_forward_tiles_fit_the_inputs_element_size():
    """The forward's autotuner keeps the tiles that fit shared memory at the inputs' element size:
    128-row query tiles below head dim 256 and 64-row from it, and 64-row ones where no 128-row
    tile fits float32 inputs (head dim 128: every 128-row tile ran out of shared memory)."""
    pytest.importorskip("triton")
    from ringflash.kernels.fwd import _attn_fwd_tuned, _fwd_configs, _prune_fwd

    assert len(_attn_fwd_tuned.configs) > 1 or os.environ.get("RINGFLASH_TEST_CONFIGS") == "one"
    for dtype, d, rows in ((torch.bfloat16, 128, 128), (torch.bfloat16, 256, 64), (torch.float32, 16, 128)):
        kept = _prune_fwd(_fwd_configs(), {"Q": torch.empty(1, dtype=dtype), "D_PAD": d, "DV_PAD": d})
        assert kept and {c.kwargs["BLOCK_M"] for c in kept} == {rows}, (dtype, d)
    kept = _prune_fwd(_fwd_configs(), {"Q": torch.empty(1), "D_PAD": 128, "DV_PAD": 128})
    assert kept and all(c.kwargs["BLOCK_M"] == 64 for c in kept)
    assert all(4 * (64 * 128 + 2 * c.kwargs["BLOCK_N"] * 128 * c.num_stages) <= 200 * 1024 for c in kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_kernels_cuda_float32_autotuned(d):
    """float32 inputs under the autotuners' own config lists (not one pinned tile): the tiles kept
    fit the device (above head dim 128 the calls run on the blockwise backend), and forward and
    backward match the float64 oracle."""
    from dist_utils import all_triton_configs, restore_triton_configs

    saved = all_triton_configs()
    try:
        g = torch.Generator(device="cuda").manual_seed(d)
        q, k, v, do = (torch.randn(1, 300, h, d, device="cuda", generator=g) for h in (4, 2, 2, 4))
        qkv = [x.requires_grad_() for x in (q, k, v)]
        out = rf.flash_attn_func(*qkv, causal=True)
        grads = torch.autograd.grad(out, qkv, do)
        ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = attention_ref(*ref_in, causal=True)[0]
        ref_grads = torch.autograd.grad(ref, ref_in, do.double())
        for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
            torch.testing.assert_close(x.double(), r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        restore_triton_configs(saved)


def test_float32_above_head_dim_128_on_a_gpu_runs_blockwise():
    """The rule that sends a call to the blockwise backend: float32, a GPU, a head dim of q or v
    above 128; every other call stays on the kernels."""
    from ringflash.backends.triton_kernels import wide_float32

    def t(dtype, d, device="cuda"):  # what the rule reads of a tensor (no GPU here)
        return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 8, 2, d))

    assert wide_float32(t(torch.float32, 256), t(torch.float32, 256))
    assert wide_float32(t(torch.float32, 128), t(torch.float32, 192))
    assert not wide_float32(t(torch.float32, 128), t(torch.float32, 128))
    assert not wide_float32(t(torch.bfloat16, 256), t(torch.bfloat16, 256))
    assert not wide_float32(t(torch.float32, 256, "cpu"), t(torch.float32, 256, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoding_float32_above_head_dim_128_on_a_gpu():
    """Decoding with a float32 cache at head dim 256 on a GPU: the blockwise backend's result (the
    decoding kernel's K/V stages do not fit shared memory), the new keys appended either way."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 1, 4, 256, device="cuda", generator=g)
    k_new, v_new = (torch.randn(2, 1, 2, 256, device="cuda", generator=g) for _ in range(2))
    caches = torch.randn(2, 2, 64, 2, 256, device="cuda", generator=g)
    lens = torch.tensor([10, 40], dtype=torch.int32, device="cuda")
    got = {}
    for name in ("triton", "torch"):
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        with rf.use_backend(name):
            out = rf.flash_attn_with_kvcache(
                q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True
            )
        got[name] = (out, k_cache, v_cache)
    for a, b in zip(got["triton"], got["torch"], strict=True):
        assert torch.equal(a, b)
