"""The eager fast paths: an inference call of ``flash_attn_func``, or a ``flash_attn_with_kvcache``
call, whose signature (every tensor's type, shape, strides, dtype and device, every option, the
backend, configs and value-check mode in force) already passed the checks replays its backend's
plan instead of checking and deriving again.

``plans_vs_full`` (decoding), ``prefill_plans_vs_full`` and ``varlen_plans_vs_full`` (run by
the interpreter worker in ``test_decode_interp.py``, and on GPUs) check that planned calls equal
the full path bit for bit, with new lengths and new tensors each call, that a plan holds no tensor
of the call that made it, and that bad values in a planned call are still reported. The tests
here check the keys: which calls are planned, and that any change of signature or of the state
in force takes the full path."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from test_decode import build

from ringflash import check_device_errors, use_value_checks
from ringflash import decode as rdecode
from ringflash import ops as rops
from ringflash.backends import use_backend, use_config
from ringflash.decode import flash_attn_with_kvcache
from ringflash.kernels.options import DecodeConfig, use_tma
from ringflash.ops import flash_attn_func, flash_attn_varlen_func

# Small cases of test_decode's kinds: append or not, GQA, paged, cache_batch_idx, masks, softcap.
PLAN_CASES = [
    dict(lens=[5, 17], Hq=4, Hk=2, D=16, dtype="fp32", Snew=1),
    dict(lens=[9, 0], Hq=4, Hk=1, D=16, dtype="bf16", Snew=2, Sq=2, causal=True, sink=True),
    dict(lens=[12, 3], Hq=2, Hk=2, D=16, dtype="fp16", Snew=0, page=8),
    dict(lens=[6, 11], Hq=4, Hk=2, D=16, dtype="fp32", Snew=1, cbi=True, window=(4, 0), softcap=5.0),
    # Left padding, three splits, and the partials merged by the combine kernel (not fused).
    dict(
        lens=[14, 9],
        Hq=4,
        Hk=2,
        D=16,
        dtype="fp32",
        Snew=1,
        causal=True,
        leftpad=[3, 0],
        splits=3,
        unfused=True,
    ),
]


def plans_vs_full(p: dict, backend: str = "triton") -> dict:
    """``{check: [error, bound]}`` for case ``p``: three calls under ``use_value_checks("device")``
    (the first plans, the next replay, with new lengths and fresh tensors), each against the same
    call under ``"host"`` (always the full path); then a planned call with a bad length, reported by
    ``check_device_errors``."""
    g = torch.Generator().manual_seed(5)
    q, k, v, k_cache, v_cache, kw = build(p, g)
    opts = dict(causal=p.get("causal", False), window_size=tuple(p.get("window", (-1, -1))))
    opts["softcap"] = p.get("softcap", 0.0)
    if p.get("sink"):  # a model's learnable sink: a Parameter
        opts["learnable_sink"] = torch.nn.Parameter(torch.randn(p["Hq"], generator=g).to(q.device))
    if p.get("leftpad"):
        kw["cache_leftpad"] = torch.tensor(p["leftpad"], dtype=torch.int32, device=q.device)
    opts["num_splits"] = p.get("splits", 0)
    config = use_config(DecodeConfig(fuse_combine=False)) if p.get("unfused") else contextlib.nullcontext()
    checks, before = {}, len(rdecode._PLANS)
    with use_backend(backend), config:
        with use_value_checks("device"):  # the call that plans keeps none of its tensors alive
            qi, kc = q.clone(), k_cache.clone()
            out = flash_attn_with_kvcache(qi, kc, v_cache.clone(), k, v, **kw, **opts)
        refs = [weakref.ref(t) for t in (qi, kc, out)]
        del qi, kc, out
        gc.collect()
        checks["a plan holds no tensor of its first call"] = [float(sum(r() is not None for r in refs)), 0.0]
        for i in range(3):
            call_kw = dict(kw, cache_seqlens=(kw["cache_seqlens"] - i).clamp(min=0))
            results = []
            for mode in ("device", "host"):
                kc, vc = k_cache.clone(), v_cache.clone()
                with use_value_checks(mode):
                    out, lse = flash_attn_with_kvcache(
                        q.clone(), kc, vc, k, v, **call_kw, **opts, return_softmax_lse=True
                    )
                results.append((out, lse, kc, vc))
            for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), *results, strict=True):
                checks[f"call {i}: {name} equals the full path"] = [float(not torch.equal(a, b)), 0.0]
            # Plain decoding takes no LSE: its plan's launch writes the LSE to a scratch buffer.
            with use_value_checks("device"):
                kc, vc = k_cache.clone(), v_cache.clone()
                out = flash_attn_with_kvcache(q.clone(), kc, vc, k, v, **call_kw, **opts)
            checks[f"call {i}: out without the LSE equals the full path"] = [
                float(not torch.equal(out, results[1][0])),
                0.0,
            ]
        # One plan per signature: with a sink every call needs the LSE, else the calls that return
        # it and those that do not are two.
        plans = 1 if p.get("sink") else 2
        checks["the plans made"] = [float(len(rdecode._PLANS) - before != plans), 0.0]
        check_device_errors()
        with use_value_checks("device"):
            bad = kw["cache_seqlens"].clone()
            bad[0] = -1
            flash_attn_with_kvcache(
                q, k_cache.clone(), v_cache.clone(), k, v, **dict(kw, cache_seqlens=bad), **opts
            )
        try:
            check_device_errors()
            checks["a planned call's bad length reported"] = [1.0, 0.0]
        except ValueError as e:
            checks["a planned call's bad length reported"] = [
                float("negative cache_seqlens" not in str(e)),
                0.0,
            ]
        checks["no plan added"] = [float(len(rdecode._PLANS) - before != plans), 0.0]
    return checks


def _key(q, kc, vc, lens, window=(-1, -1), causal=False, mode="device", k=None, v=None, lse=False):
    tensors = (q, kc, vc, k, v, lens, None, None, None, None)
    return rdecode._plan_key(tensors, (None, causal, window, 0.0, 0), mode, lse)


def test_the_key_follows_the_signature_and_the_state_in_force():
    q, kc = torch.zeros(2, 1, 4, 16), torch.zeros(2, 8, 2, 16)
    lens = torch.zeros(2, dtype=torch.int32)
    base = _key(q, kc, kc, lens)
    assert base is not None and base == _key(q.clone(), kc.clone(), kc.clone(), lens + 3)
    others = [
        _key(q, kc, kc, lens, causal=True),
        _key(q, kc, kc, lens, causal=1),  # equal to True, but the full path rejects an int
        _key(q, kc, kc, lens, window=(2, 0)),
        _key(q, kc, kc, lens, mode="off"),
        _key(q.double(), kc, kc, lens),
        _key(torch.zeros(2, 1, 8, 16)[:, :, ::2], kc, kc, lens),  # other strides
        _key(torch.zeros(3, 1, 4, 16), kc, kc, lens),
        _key(q, kc, kc, lens, k=torch.zeros(2, 1, 2, 16), v=torch.zeros(2, 1, 2, 16)),
        _key(q, kc, kc, lens, lse=True),  # a call that returns the LSE
    ]
    with use_backend("torch"):
        others.append(_key(q, kc, kc, lens))
    with use_config(DecodeConfig(fuse_combine=False)):
        others.append(_key(q, kc, kc, lens))
    with use_tma("off"):
        others.append(_key(q, kc, kc, lens))
    assert all(o is not None for o in others)
    assert len({base, *others}) == len(others) + 1, "two different calls share a key"


class _Sub(torch.Tensor):
    pass


def test_calls_that_always_take_the_full_path():
    q, kc = torch.zeros(2, 1, 4, 16), torch.zeros(2, 8, 2, 16)
    lens = torch.zeros(2, dtype=torch.int32)
    assert _key(q, kc, kc, lens, mode="host") is None  # host checks read every call's values
    assert _key(q, kc, kc, 3) is None and _key(q, kc, kc, None) is None
    assert _key(q, kc, kc, lens, window=[-1, -1]) is None
    assert _key(torch.Tensor._make_subclass(_Sub, q), kc, kc, lens) is None  # may override anything


def test_the_torch_backend_plans_nothing():
    q, kc = torch.randn(2, 1, 4, 16), torch.randn(2, 8, 2, 16)
    before = dict(rdecode._PLANS)
    with use_backend("torch"), use_value_checks("device"):
        out = flash_attn_with_kvcache(
            q, kc, kc.clone(), cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)
        )
    assert out.shape == q.shape and rdecode._PLANS == before
    check_device_errors()


@pytest.mark.parametrize("p", PLAN_CASES, ids=range(len(PLAN_CASES)))
def test_plans_torch_backend_full_path_runs(p):
    """The same script through the torch backend (no plans: every call the full path), so the
    checks themselves are exercised without Triton; the interpreter runs them with plans."""
    checks = plans_vs_full(p, backend="torch")
    checks.pop("the plans made")
    checks.pop("no plan added")
    for name, (err, bound) in checks.items():
        assert err <= bound, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("p", PLAN_CASES, ids=range(len(PLAN_CASES)))
def test_planned_calls_equal_the_full_path_gpu(p):
    checks = plans_vs_full(dict(p, device="cuda"))
    for name, (err, bound) in checks.items():
        assert err <= bound, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_calls_reuse_only_their_own_streams_scratch_gpu():
    """A split call's float32 partials (and the LSE of a call that takes none) are reused by the
    eager calls of one stream, never shared with another stream's or kept from a graph capture;
    every result equals the full path's."""
    from ringflash.kernels import decode as kd
    from ringflash.kernels.launch import SCRATCH_STREAMS

    g = torch.Generator().manual_seed(3)
    p = dict(lens=[200], Hq=4, Hk=2, D=64, dtype="bf16", Snew=0, cap=256, device="cuda")
    q, _, _, k_cache, v_cache, kw = build(p, g)
    kd._LAUNCHES.clear()
    rdecode._PLANS.clear()  # plans hold their launches: none may predate the table's scan below

    def call(mode):
        with use_value_checks(mode):
            return flash_attn_with_kvcache(q, k_cache, v_cache, **kw, num_splits=4)

    want = call("host")
    side = torch.cuda.Stream()
    outs = [call("device") for _ in range(3)]
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.current_stream())
        outs.append(call("device"))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call("device")
    graph.replay()
    torch.cuda.synchronize()
    check_device_errors()
    for out in (*outs, captured):
        assert torch.equal(out, want)
    keys = [key for launch in kd._LAUNCHES.values() for key in launch.scratch]
    streams = {name: {key[2] for key in keys if key[0] == name} for name in ("OP", "LSEP", "LSE")}
    assert all(len(s) == 2 for s in streams.values()), streams  # the two eager streams, not the capture's
    for _ in range(SCRATCH_STREAMS + 4):  # calls on ever new streams: bounded, still right
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            s.wait_stream(torch.cuda.current_stream())
            out = call("device")
        torch.cuda.current_stream().wait_stream(s)
        assert torch.equal(out, want)
    assert all(len(launch.scratch) <= SCRATCH_STREAMS for launch in kd._LAUNCHES.values())


PREFILL_CASES = [
    dict(B=2, Sq=7, Sk=7, Hq=4, Hk=2, D=16, dtype=torch.float32, causal=True),
    dict(
        B=1, Sq=5, Sk=33, Hq=4, Hk=1, D=16, dtype=torch.bfloat16, window_size=(4, 0), softcap=3.0, sink=True
    ),
    dict(B=1, Sq=16, Sk=16, Hq=2, Hk=2, D=32, dtype=torch.float16),
]


def prefill_plans_vs_full(p: dict, backend: str = "triton", device: str = "cpu") -> dict:
    """``{check: [error, bound]}``: inference calls of ``flash_attn_func`` (the first plans, the
    next three replay, each on new tensors) against the same call recorded by autograd (always the
    full path), bit for bit."""
    g = torch.Generator().manual_seed(9)
    shape = dict(p)
    B, Sq, Sk, Hq, Hk, D, dt = (shape.pop(n) for n in ("B", "Sq", "Sk", "Hq", "Hk", "D", "dtype"))
    if shape.pop("sink", False):  # a model's learnable sink: a Parameter
        shape["learnable_sink"] = torch.nn.Parameter(torch.randn(Hq, generator=g).to(device))

    def rnd(*s):
        return torch.randn(s, generator=g).to(device=device, dtype=dt)

    checks, before = {}, len(rops._PLANS)
    with use_backend(backend):
        q, k, v = rnd(B, Sq, Hq, D), rnd(B, Sk, Hk, D), rnd(B, Sk, Hk, D)
        with torch.no_grad():
            out = flash_attn_func(q, k, v, **shape)
        refs = [weakref.ref(t) for t in (q, k, out)]
        del q, k, out
        gc.collect()
        checks["a plan holds no tensor of its first call"] = [float(sum(r() is not None for r in refs)), 0.0]
        for i in range(3):
            q, k, v = rnd(B, Sq, Hq, D), rnd(B, Sk, Hk, D), rnd(B, Sk, Hk, D)
            with torch.no_grad():
                out, lse, _ = flash_attn_func(q, k, v, **shape, return_attn_probs=True)
            full, full_lse, _ = flash_attn_func(q.requires_grad_(), k, v, **shape, return_attn_probs=True)
            checks[f"call {i}: out equals the full path"] = [float(not torch.equal(out, full.detach())), 0.0]
            checks[f"call {i}: lse equals the full path"] = [
                float(not torch.equal(lse, full_lse.detach())),
                0.0,
            ]
            # A call that takes no LSE replays its own plan, which writes the LSE to scratch.
            with torch.no_grad():
                plain = flash_attn_func(q, k, v, **shape)
            checks[f"call {i}: out without the LSE equals the full path"] = [
                float(not torch.equal(plain, full.detach())),
                0.0,
            ]
        # With a sink every call needs the LSE: one plan; else the calls that return it and those
        # that do not have one each.
        plans = 1 if "learnable_sink" in shape else 2
        checks["the plans made"] = [float(len(rops._PLANS) - before != plans), 0.0]
    return checks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefill_calls_without_the_lse_on_many_streams_and_in_a_graph_gpu():
    """A planned prefill call that takes no LSE writes it to its stream's buffer, which plans of
    other shapes share: calls of two shapes in turn, on many streams (more than buffers are kept
    for), and in a graph capture all give the full path's output."""
    from dist_utils import SMALL_HEAD_TILES, one_triton_config, restore_triton_configs

    from ringflash.kernels.launch import SCRATCH_STREAMS

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 40, h, 32, generator=g).to("cuda", torch.float16) for h in (4, 2, 2))
    saved = one_triton_config(tiles=SMALL_HEAD_TILES)
    try:
        want, _, _ = flash_attn_func(q.requires_grad_(), k, v, causal=True, return_attn_probs=True)
        q = q.detach()
        short = [x[:, :24].contiguous() for x in (q, k, v)]
        want_short, _, _ = flash_attn_func(
            short[0].requires_grad_(), *short[1:], causal=True, return_attn_probs=True
        )
        short[0] = short[0].detach()
        with torch.no_grad():
            outs = []
            for _ in range(3):  # plans, then replays; the two shapes share the stream's buffer
                outs.append(flash_attn_func(q, k, v, causal=True))
                assert torch.equal(flash_attn_func(*short, causal=True), want_short.detach())
            streams = [torch.cuda.Stream() for _ in range(SCRATCH_STREAMS + 4)]
            for s in streams:
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    outs.append(flash_attn_func(q, k, v, causal=True))
                torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = flash_attn_func(q, k, v, causal=True)
            graph.replay()
        torch.cuda.synchronize()
    finally:
        restore_triton_configs(saved)
    for out in (*outs, captured):
        assert torch.equal(out, want.detach())


def test_prefill_key_takes_recorded_calls_and_other_options_to_the_full_path():
    q, k = torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)
    opts = (0.0, None, False, (-1, -1), 0.0)
    base = rops._plan_key(q, k, k, opts)
    assert base is not None and base == rops._plan_key(q.clone(), k.clone(), k.clone(), opts)
    assert rops._plan_key(q.clone().requires_grad_(), k, k, opts) is None  # autograd records it
    with torch.no_grad():
        assert rops._plan_key(q.clone().requires_grad_(), k, k, opts) == base
    assert rops._plan_key(q, k, k, (0.0, None, True, (-1, -1), 0.0)) != base
    assert rops._plan_key(q, k, k, (0.0, None, 1, (-1, -1), 0.0)) not in (base, None)
    assert rops._plan_key(q, k, k, (0.0, None, False, [-1, -1], 0.0)) is None
    assert rops._plan_key(q, k, k, opts, None, (), False) not in (base, None)  # no LSE taken
    with use_backend("torch"):
        assert rops._plan_key(q, k, k, opts) != base


def test_the_torch_backend_plans_no_prefill():
    before = dict(rops._PLANS)
    checks = prefill_plans_vs_full(PREFILL_CASES[0], backend="torch")
    assert checks.pop("the plans made") == [1.0, 0.0] and rops._PLANS == before
    for name, (err, bound) in checks.items():
        assert err <= bound, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("p", PREFILL_CASES, ids=range(len(PREFILL_CASES)))
def test_planned_prefill_equals_the_full_path_gpu(p):
    from dist_utils import SMALL_HEAD_TILES, one_triton_config, restore_triton_configs

    saved = one_triton_config(tiles=SMALL_HEAD_TILES)  # head dims 16 and 32: see SMALL_HEAD_TILES
    try:
        checks = prefill_plans_vs_full(p, device="cuda")
    finally:
        restore_triton_configs(saved)
    for name, (err, bound) in checks.items():
        assert err <= bound, name


VARLEN_CASES = [
    dict(lens=[5, 0, 9, 2], Hq=4, Hk=2, D=16, dtype=torch.float32, causal=True),
    dict(lens=[7, 13], Hq=4, Hk=1, D=16, dtype=torch.bfloat16, window_size=(3, 0), softcap=2.0, sink=True),
]


def varlen_plans_vs_full(p: dict, backend: str = "triton", device: str = "cpu") -> dict:
    """``{check: [error, bound]}``: inference calls of ``flash_attn_varlen_func`` under
    ``use_value_checks("device")`` (the first plans, the next three replay, each on new tensors and
    new lengths of the same count) against the same call under ``"host"`` (always the full path),
    bit for bit; then a planned call whose ``cu_seqlens`` does not end at the tensor's rows,
    reported by ``check_device_errors``."""
    g = torch.Generator().manual_seed(3)
    opts = dict(p)
    lens, Hq, Hk, D, dt = (opts.pop(n) for n in ("lens", "Hq", "Hk", "D", "dtype"))
    if opts.pop("sink", False):
        opts["learnable_sink"] = torch.nn.Parameter(torch.randn(Hq, generator=g).to(device))
    T, longest = sum(lens), max(lens)

    def inputs(shift):
        cut = torch.tensor(lens).roll(shift)  # other lengths, the same total and longest
        cu = torch.cat([torch.zeros(1), cut.cumsum(0)]).to(device=device, dtype=torch.int32)
        q, k, v = (torch.randn(T, h, D, generator=g).to(device=device, dtype=dt) for h in (Hq, Hk, Hk))
        return q, k, v, cu

    checks, before = {}, len(rops._VARLEN_PLANS)
    check_device_errors()
    with use_backend(backend):
        q, k, v, cu = inputs(0)
        with torch.no_grad(), use_value_checks("device"):
            out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, **opts)
        refs = [weakref.ref(t) for t in (q, k, cu, out)]
        del q, k, cu, out
        gc.collect()
        checks["a plan holds no tensor of its first call"] = [float(sum(r() is not None for r in refs)), 0.0]
        for i in range(1, 4):
            q, k, v, cu = inputs(i)
            results = []
            for mode in ("device", "host"):
                with torch.no_grad(), use_value_checks(mode):
                    results.append(
                        flash_attn_varlen_func(
                            q, k, v, cu, cu, longest, longest, **opts, return_attn_probs=True
                        )
                    )
            for name, a, b in zip(("out", "lse"), results[0][:2], results[1][:2], strict=True):
                checks[f"call {i}: {name} equals the full path"] = [float(not torch.equal(a, b)), 0.0]
            with torch.no_grad(), use_value_checks("device"):  # its own plan: no LSE taken
                plain = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, **opts)
            checks[f"call {i}: out without the LSE equals the full path"] = [
                float(not torch.equal(plain, results[1][0])),
                0.0,
            ]
        plans = 1 if "learnable_sink" in opts else 2  # as in prefill_plans_vs_full
        checks["the plans made"] = [float(len(rops._VARLEN_PLANS) - before != plans), 0.0]
        q, k, v, cu = inputs(0)
        cu[-1] -= 1  # ends short of the rows
        with torch.no_grad(), use_value_checks("device"):
            flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, **opts)
        try:
            check_device_errors()
            checks["a planned call's bad cu_seqlens reported"] = [1.0, 0.0]
        except ValueError as e:
            checks["a planned call's bad cu_seqlens reported"] = [float("cu_seqlens" not in str(e)), 0.0]
        checks["no plan added"] = [float(len(rops._VARLEN_PLANS) - before != plans), 0.0]
    return checks


@pytest.mark.parametrize("p", VARLEN_CASES, ids=range(len(VARLEN_CASES)))
def test_planned_varlen_calls_equal_the_full_path(p):
    for name, (err, bound) in varlen_plans_vs_full(p, backend="torch").items():
        assert err <= bound, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("p", VARLEN_CASES, ids=range(len(VARLEN_CASES)))
def test_planned_varlen_calls_equal_the_full_path_gpu(p):
    for name, (err, bound) in varlen_plans_vs_full(p, device="cuda").items():
        assert err <= bound, name


def test_varlen_key_follows_the_signature_and_takes_some_calls_to_the_full_path():
    q, k = torch.zeros(9, 4, 16), torch.zeros(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    opts = (0.0, None, True, (-1, -1), 0.0)

    def key(q=q, cu_q=cu, cu_k=cu, max_q=5, max_k=5, options=opts, mode="device"):
        return rops._varlen_plan_key(q, k, k, cu_q, cu_k, max_q, max_k, options, None, mode)

    base = key()
    assert base is not None
    assert base == rops._varlen_plan_key(q.clone(), k.clone(), k.clone(), cu, cu, 5, 5, opts, None, "device")
    three = torch.tensor([0, 2, 5, 9], dtype=torch.int32)
    others = [
        key(cu_k=cu.clone()),  # a separate cu_seqlens_k is bounded on its own
        key(max_q=6),
        key(max_k=4),
        key(cu_q=three, cu_k=three),
        key(options=(0.0, None, False, (-1, -1), 0.0)),
        key(mode=None),
        key(q=torch.zeros(9, 4, 16, dtype=torch.float64)),
        rops._varlen_plan_key(q, k, k, cu, cu, 5, 5, opts, None, "device", False),  # no LSE taken
    ]
    with use_backend("triton"):
        others.append(key())
    assert all(o is not None for o in others), others
    assert len({base, *others}) == len(others) + 1, "two different calls share a key"
    assert key(mode="host") is None  # host checks read every call's values
    assert key(max_q=torch.tensor(5)) is None and key(max_k=5.0) is None
    assert key(q=q.clone().requires_grad_()) is None  # autograd records it
    assert key(options=(0.0, None, True, [-1, -1], 0.0)) is None


def _offset_copy(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a tensor of the same strides whose data starts 2 bytes past a 16-byte
    boundary (a kernel compiled for aligned pointers must not get it)."""
    flat = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
    y = flat[1 : 1 + x.numel()].view(x.shape)
    y.copy_(x)
    assert y.data_ptr() % 16 != 0 and y.stride() == x.stride()
    return y


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_planned_eager_calls_follow_each_calls_alignment_gpu():
    """A plan's eager calls on one stream launch the kernel compiled for each call's own pointer
    alignment: aligned and misaligned queries of one signature, in turn, each equal the call
    recorded by autograd (prefill) or the host-checked full path (decoding)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 40, h, 64, generator=g).to("cuda", torch.bfloat16) for h in (4, 2, 2))
    want, _, _ = flash_attn_func(q.clone().requires_grad_(), k, v, causal=True, return_attn_probs=True)
    p = dict(lens=[200], Hq=4, Hk=2, D=64, dtype="bf16", Snew=0, cap=256, device="cuda")
    dq, _, _, k_cache, v_cache, kw = build(p, g)
    with use_value_checks("host"):
        want_dec = flash_attn_with_kvcache(dq, k_cache, v_cache, **kw, num_splits=4)
    with torch.no_grad():
        for x in (q, _offset_copy(q), q, _offset_copy(q)):
            assert torch.equal(flash_attn_func(x, k, v, causal=True), want.detach())
        for x in (dq, _offset_copy(dq), dq, _offset_copy(dq)):
            assert torch.equal(flash_attn_with_kvcache(x, k_cache, v_cache, **kw, num_splits=4), want_dec)
    check_device_errors()
