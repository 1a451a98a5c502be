"""flash_attn_with_kvcache on bad input: every bad argument (lengths, block tables, cache rows,
shapes, dtypes) raises a clear error before anything is written to the cache, on both backends;
``skip_value_checks()`` skips only the value checks; and bad lengths, rows or pages left unchecked
stay inside the cache (``test_decode.unchecked_bad_values``: nothing written outside it, finite
results), on CPU and on a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_decode import _bad_setup, assert_checks, unchecked_bad_values

from ringflash import use_value_checks
from ringflash.backends import use_backend
from ringflash.decode import flash_attn_with_kvcache


@pytest.mark.parametrize("variant", ["lens", "cbi", "paged"])
def test_unchecked_bad_values_stay_inside_the_cache(variant):
    assert_checks(unchecked_bad_values("cpu", "torch", variant), variant)


def test_skip_value_checks_skips_only_value_checks():
    """Inside the context a length past the cache raises nothing; outside it raises; shape and
    dtype errors raise in both."""
    from ringflash import skip_value_checks

    q, kc, vc, k, v, lens = _bad_setup()
    with pytest.raises(ValueError, match="too small"):
        flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
    with skip_value_checks():
        flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)
        with pytest.raises(TypeError):
            flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens.long())
        with pytest.raises(ValueError, match="cannot append"):
            flash_attn_with_kvcache(
                q, kc, vc, torch.cat([k] * 9, 1), torch.cat([v] * 9, 1), cache_seqlens=lens
            )
    with pytest.raises(ValueError, match="too small"):
        flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens + 1)


BAD = {
    "cache too small": (ValueError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens + 1)),
    "append needs 2 slots": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            k=torch.cat([k, k], 1), v=torch.cat([v, v], 1), cache_seqlens=lens
        ),
    ),
    "negative length": (ValueError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens - 4)),
    "seqlens int64": (TypeError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens.long())),
    "seqlens shape": (ValueError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens[:1])),
    "seqlens 2-D": (ValueError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens[None])),
    "seqlens device": (ValueError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens.to("meta"))),
    "seqlens list": (TypeError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=[3, 7])),
    "block_table past the cache": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            cache_seqlens=lens, block_table=torch.tensor([[0, 1, 2, 3], [4, 5, 6, 2]], dtype=torch.int32)
        ),
    ),
    "block_table int64": (
        TypeError,
        lambda q, kc, vc, k, v, lens: dict(
            cache_seqlens=lens, block_table=torch.zeros(2, 4, dtype=torch.long)
        ),
    ),
    "cache_batch_idx out of range": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            cache_seqlens=lens, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)
        ),
    ),
    "cache_batch_idx repeated": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            cache_seqlens=lens, cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)
        ),
    ),
    "q heads not divisible": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(q=torch.randn(2, 1, 3, 16), cache_seqlens=lens),
    ),
    "k without v": (ValueError, lambda q, kc, vc, k, v, lens: dict(v=None, cache_seqlens=lens)),
    "k wrong heads": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            k=torch.randn(2, 1, 1, 16), v=torch.randn(2, 1, 1, 16), cache_seqlens=lens
        ),
    ),
    "v of another length than k": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(v=torch.cat([v, v], 1), cache_seqlens=lens - 1),
    ),
    "rotary table shorter than the cache": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            rotary_cos=torch.ones(4, 4), rotary_sin=torch.zeros(4, 4), cache_seqlens=lens
        ),
    ),
    # Row 0 appends into page 1, which row 1 reads (and appends to).
    "block_table rows appending to a shared page": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            cache_seqlens=lens, block_table=torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]], dtype=torch.int32)
        ),
    ),
    "block_table with pages of no slots": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            k_cache=torch.randn(6, 0, 2, 16),
            v_cache=torch.randn(6, 0, 2, 16),
            k=None,
            v=None,
            cache_seqlens=lens * 0,
            block_table=torch.zeros(2, 4, dtype=torch.int32),
        ),
    ),  # fmt: skip
    "one tensor as both caches while appending": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(v_cache=kc, cache_seqlens=lens),
    ),
    "rotary without an append": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(
            k=None, v=None, rotary_cos=torch.ones(8, 4), rotary_sin=torch.zeros(8, 4), cache_seqlens=lens
        ),
    ),
    "k wrong dtype": (
        TypeError,
        lambda q, kc, vc, k, v, lens: dict(k=k.double(), v=v.double(), cache_seqlens=lens),
    ),
    "append without seqlens": (ValueError, lambda q, kc, vc, k, v, lens: dict(cache_seqlens=None)),
    "num_splits negative": (
        ValueError,
        lambda q, kc, vc, k, v, lens: dict(cache_seqlens=lens, num_splits=-1),
    ),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_leaves_cache_untouched(name, backend):
    """Every bad input raises a clear error before anything is written (validation is shared by
    both backends and runs before any kernel, so no interpreter is needed here)."""
    q, kc, vc, k, v, lens = _bad_setup()
    err, make = BAD[name]
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v)
    args.update(make(q, kc, vc, k, v, lens))
    if name.startswith("block_table") and "k_cache" not in make(q, kc, vc, k, v, lens):
        # a paged pool of 6 pages of 2 slots
        args["k_cache"], args["v_cache"] = torch.randn(6, 2, 2, 16), torch.randn(6, 2, 2, 16)
    kc0, vc0 = args["k_cache"].clone(), args["v_cache"].clone()
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    with use_backend(backend), pytest.raises(err):
        flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], kc0) and torch.equal(args["v_cache"], vc0), (
        f"{name}: cache was modified"
    )


def test_rows_may_share_the_pages_they_only_read():
    """A common prefix in shared pages, each row appending into a page of its own: accepted, and
    the same result as with each row holding its own copy of the prefix."""
    q, _, _, k, v, _ = _bad_setup()
    pool, vpool = torch.randn(8, 2, 2, 16), torch.randn(8, 2, 2, 16)
    lens = torch.tensor([4, 7], dtype=torch.int32)  # row 0 appends into page 2, row 1 into page 5
    shared = torch.tensor([[0, 1, 2, 0], [0, 1, 4, 5]], dtype=torch.int32)
    copied = torch.tensor([[0, 1, 2, 0], [6, 7, 4, 5]], dtype=torch.int32)
    pool2, vpool2 = pool.clone(), vpool.clone()
    pool2[6:], vpool2[6:] = pool[:2], vpool[:2]
    with use_value_checks("host"):
        got = flash_attn_with_kvcache(q, pool, vpool, k, v, cache_seqlens=lens, block_table=shared)
        want = flash_attn_with_kvcache(q, pool2, vpool2, k, v, cache_seqlens=lens, block_table=copied)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["lens", "cbi", "paged"])
def test_decode_cuda_unchecked_bad_values_stay_inside_the_cache(variant):
    assert_checks(unchecked_bad_values("cuda", "triton", variant), variant)
