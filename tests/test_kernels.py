"""Triton kernels (``ringflash.kernels``) against the float64 oracle (``ringflash.reference``).

``run_case`` computes every check of one case (padded or varlen, accumulate mode, the split-KV
forward, TMA descriptors or not); ``test_kernels_interp.py`` runs small cases under Triton's
interpreter on CPU, this file larger ones on a GPU, beside the checks of 64-bit offsets, dQ on a
second stream and tensors on another GPU. ``interp_script_job`` runs a script under
the interpreter in a child process (for ``test_kernels_interp.py``, ``test_kernel_launches.py``).

Tolerances: float32 inputs meet fixed bounds; float16/bfloat16 follow flash-attn's rule: the
kernel's max error against the float64 oracle is at most 2x (forward) / 3x (backward) the error of
the same reference computed in that low precision (``upcast=False``), plus the rounding slack of
the dtype at the result's scale.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import background
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- one case, anywhere
def _seqs(p):
    """Per-sequence ``(q_start, q_len, k_start, k_len, diag)`` for a varlen case."""
    lq, lk = p["lens_q"], p["lens_k"]
    diags = p.get("diag")
    out, qs, ks = [], 0, 0
    for b, (a, c) in enumerate(zip(lq, lk, strict=True)):
        d = diags[b] if diags is not None else c - a
        out.append((qs, a, ks, c, d))
        qs, ks = qs + a, ks + c
    return out


def _oracle(p, q, k, v, scale, upcast):
    """Reference ``(out, lse)`` (differentiable) in the layout of the case."""
    from ringflash.reference import attention_ref

    kw = dict(
        softmax_scale=scale,
        causal=p.get("causal", False),
        window_size=tuple(p.get("window", (-1, -1))),
        softcap=p.get("softcap", 0.0),
        upcast=upcast,
    )
    if "lens_q" not in p:
        return attention_ref(q, k, v, diag_offset=p.get("diag"), **kw)
    outs, lses = [], []
    for qs, a, ks, c, d in _seqs(p):
        o, lse = attention_ref(
            q[None, qs : qs + a], k[None, ks : ks + c], v[None, ks : ks + c], diag_offset=d, **kw
        )
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)


def _key_parts(p):
    """Key index sets of the two halves for accumulate cases, and each half's diag offsets."""
    if "lens_q" not in p:
        Sk, Sq = p["Sk"], p["Sq"]
        base = p["diag"] if p.get("diag") is not None else Sk - Sq
        h = p.get("split", Sk // 2)
        return [(torch.arange(0, h), base, None), (torch.arange(h, Sk), base - h, None)]
    parts = []
    for half in (0, 1):
        idx, diags, lens = [], [], []
        for _, _, ks, c, d in _seqs(p):
            h = c // 2
            a, b = (0, h) if half == 0 else (h, c)
            idx.append(torch.arange(ks + a, ks + b))
            diags.append(d - a)
            lens.append(b - a)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        parts.append((torch.cat(idx), diags, cu))
    return parts


def _split_kv_fwd(q, k, v, kw):
    """The forward through the split-KV decode kernel: every key row a full cache (what the
    dispatch does for a few query rows against a long context, ``split_kv_pays``)."""
    from ringflash.kernels.decode import decode_fwd

    B, Sk = q.shape[0], k.shape[1]
    lens = torch.full((B,), Sk, dtype=torch.int32, device=q.device)
    diag = kw.pop("diag_offset")
    if diag is not None:
        diag = torch.full((B,), int(diag), dtype=torch.int32, device=q.device)
    return decode_fwd(q, k, v, lens, diag_offset=diag, **kw)


def _kernel(p, q, k, v, dout, scale):
    """Run ringflash.kernels for the case; returns out, lse, dq, dk, dv (float32 in accumulate mode)."""
    from ringflash.kernels import bwd, fwd

    kw = dict(
        softmax_scale=scale,
        causal=p.get("causal", False),
        window_size=tuple(p.get("window", (-1, -1))),
        softcap=p.get("softcap", 0.0),
    )
    dev = q.device
    varlen = "lens_q" in p
    if varlen:
        cu_q = torch.tensor([0, *torch.tensor(p["lens_q"]).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, *torch.tensor(p["lens_k"]).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        kw.update(cu_seqlens_q=cu_q, max_seqlen_q=max(p["lens_q"]))
    if not p.get("accumulate"):
        if varlen:
            kw.update(cu_seqlens_k=cu_k, max_seqlen_k=max(p["lens_k"]), diag_offset=p.get("diag"))
        else:
            kw.update(diag_offset=p.get("diag"))
        if p.get("split_kv"):
            out, lse = _split_kv_fwd(q, k, v, dict(kw))
        else:
            out, lse = fwd.attn_fwd(q, k, v, **kw)
        dq, dk, dv = bwd.attn_bwd(dout, q, k, v, out, lse, **kw)
        return out, lse, dq, dk, dv
    # Accumulate mode: two disjoint key halves, the first written over float32 (out, lse) buffers
    # that hold NaN (merge=False), the second merged into them; then gradients added into float32
    # buffers that start non-zero.
    parts = _key_parts(p)
    out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=torch.float32, device=dev)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = torch.full(lse_shape, float("nan"), device=dev)
    kdim = 0 if varlen else 1
    for i, (idx, diag, cu) in enumerate(parts):
        idx = idx.to(dev)
        kk, vv = k.index_select(kdim, idx), v.index_select(kdim, idx)
        extra = (
            dict(cu_seqlens_k=cu.to(dev), max_seqlen_k=max(int((cu[1:] - cu[:-1]).max()), 1))
            if varlen
            else {}
        )
        fwd.attn_fwd(q, kk, vv, **kw, **extra, diag_offset=diag, out=out, lse=lse, merge=i > 0)
    delta = bwd.attn_bwd_delta(dout, out, packed=varlen)
    g = torch.Generator().manual_seed(7)
    init = [torch.randn(x.shape, generator=g).to(dev) for x in (q, k, v)]
    dq, dk, dv = (t.clone() for t in init)
    for idx, diag, cu in parts:
        idx = idx.to(dev)
        kk, vv = k.index_select(kdim, idx), v.index_select(kdim, idx)
        extra = (
            dict(cu_seqlens_k=cu.to(dev), max_seqlen_k=max(int((cu[1:] - cu[:-1]).max()), 1))
            if varlen
            else {}
        )
        if varlen:  # packed halves interleave: gradient buffers of the half, scattered back after
            dk_p = dk.index_select(0, idx)
            dv_p = dv.index_select(0, idx)
            bwd.attn_bwd(
                dout,
                q,
                kk,
                vv,
                out,
                lse,
                **kw,
                **extra,
                diag_offset=diag,
                delta=delta,
                dq=dq,
                dk=dk_p,
                dv=dv_p,
            )
            dk.index_copy_(0, idx, dk_p)
            dv.index_copy_(0, idx, dv_p)
        else:  # contiguous halves: the kernel adds straight into strided views of the buffers
            a, b = int(idx[0]) if len(idx) else 0, int(idx[-1]) + 1 if len(idx) else 0
            bwd.attn_bwd(
                dout,
                q,
                kk,
                vv,
                out,
                lse,
                **kw,
                **extra,
                diag_offset=diag,
                delta=delta,
                dq=dq,
                dk=dk[:, a:b],
                dv=dv[:, a:b],
            )
    return out, lse, dq - init[0], dk - init[1], dv - init[2]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_case(p):
    """Compute every check of case ``p``: ``{name: [error, bound]}`` (passes when error <= bound)."""
    dev = p.get("device", "cpu")
    dt = DTYPES[p["dtype"]]
    Hq, Hk, D = p["Hq"], p["Hk"], p["D"]
    Dv = p.get("Dv", D)
    g = torch.Generator().manual_seed(zlib.crc32(json.dumps(p, sort_keys=True).encode()))

    def rnd(*shape):
        return torch.randn(shape, generator=g).to(device=dev, dtype=dt)

    if "lens_q" in p:
        Tq, Tk = sum(p["lens_q"]), sum(p["lens_k"])
        q, k, v, dout = rnd(Tq, Hq, D), rnd(Tk, Hk, D), rnd(Tk, Hk, Dv), rnd(Tq, Hq, Dv)
    elif p.get("qkv_packed"):  # strided views into one [B, S, 3, H, D] buffer
        B, S = p["B"], p["Sq"]
        qkv = rnd(B, S, 3, Hq, D)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        dout = rnd(B, S, Hq, D).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        B, Sq, Sk = p["B"], p["Sq"], p["Sk"]
        q, k, v, dout = rnd(B, Sq, Hq, D), rnd(B, Sk, Hk, D), rnd(B, Sk, Hk, Dv), rnd(B, Sq, Hq, Dv)
    scale = D**-0.5
    from ringflash.kernels.options import use_tma

    with use_tma(p.get("tma", "auto")):  # "on": the descriptor code Hopper runs, at any length
        out, lse, dq, dk, dv = _kernel(p, q, k, v, dout, scale)

    refs = {}
    for name, upcast, cast in (("ref", True, torch.float64), ("low", False, dt)):
        if name == "low" and dt == torch.float32:
            continue
        xs = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
        o, lse_r = _oracle(p, *xs, scale, upcast)
        o.backward(dout.to(cast))
        refs[name] = (o.detach(), lse_r.detach(), *(x.grad for x in xs))
    names = ("out", "lse", "dq", "dk", "dv")
    got = (out, lse, dq, dk, dv)
    checks = {}
    masked = torch.isinf(refs["ref"][1])
    for i, name in enumerate(names):
        r, x = refs["ref"][i], got[i]
        if name == "lse":
            r, x = r[~masked], x[~masked]
        err = _max_err(x, r)
        scale_r = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        if "low" in refs:
            low = refs["low"][i][~masked] if name == "lse" else refs["low"][i]
            rd = r.to(dt)
            slack = 2 * (rd + 0.3 - 0.3 - rd).abs().max().item() if r.numel() else 0.0
            bound = (2 if i < 2 else 3) * _max_err(low, r) + slack + 1e-6
        else:
            bound = (2e-5 if i < 2 else 1e-4) * scale_r
        checks[name] = [err, bound]
        checks[name + " finite"] = [float((~torch.isfinite(x)).sum().item()), 0.0]
    # Rows that see no key: lse exactly -inf, output exactly 0 (gradients are checked above).
    checks["lse -inf pattern"] = [float((torch.isinf(lse) != masked).sum().item()), 0.0]
    rows_out = out.transpose(0, 1) if "lens_q" in p else out.transpose(1, 2)  # lse layout first
    checks["masked rows out"] = [rows_out[masked].abs().max().item() if masked.any() else 0.0, 0.0]
    checks["out dtype"] = [float(out.dtype != (torch.float32 if p.get("accumulate") else dt)), 0.0]
    checks["masked rows present"] = [float(bool(p.get("expect_masked")) and not masked.any()), 0.0]
    if dt != torch.float32 and not p.get("split_kv"):  # 16-bit tiles go through TMA descriptors
        from ringflash.kernels.tma import _TMA_MIN_SEQLEN, _TMA_MIN_SEQLEN_BWD, tma_applies

        mode = p.get("tma", "auto")
        hopper = dev == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
        longest = max(max(p["lens_q"] + p["lens_k"]) if "lens_q" in p else max(p["Sq"], p["Sk"]), 1)
        with use_tma(mode):
            bwd_least = _TMA_MIN_SEQLEN_BWD if 64 < q.shape[-1] <= 128 else _TMA_MIN_SEQLEN
            for name, backward, least in (("", False, _TMA_MIN_SEQLEN), (" bwd", True, bwd_least)):
                expect = mode == "on" or (hopper and mode == "auto" and longest >= least)
                got = tma_applies(q, k, v, seqlen=longest, backward=backward)
                checks["TMA route" + name] = [float(got != expect), 0.0]
    if "split_kv" in p:  # whether a dispatch sends the forward to the split-KV decode kernel
        from ringflash.kernels.decode import split_kv_pays
        from ringflash.kernels.device import sm_count

        routed = split_kv_pays(p["B"], p["Sq"], Hq, Hk, p["Sk"], sm_count(q.device))
        checks["split-KV route"] = [float(routed != p["split_kv"]), 0.0]
    return checks


def _interp_env(**extra):
    """Environment of a child process that runs the kernels under the interpreter from this
    checkout."""
    env = dict(os.environ, TRITON_INTERPRET="1", **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def interp_script_job(name: str, script: str) -> str:
    """Background job ``name`` (``tests/background.py``): ``script`` in a child process under the
    interpreter, from this checkout. Returns ``name``, for the test's ``background`` marker."""
    return background.job(name, [sys.executable, "-c", script], cwd=REPO, env=_interp_env(), timeout=300)


def _assert_interp_script_says_same(name: str):
    """Background job ``name`` (``interp_script_job``) must exit 0 printing "same"."""
    pytest.importorskip("triton")
    r, _ = background.result(name)
    assert r.returncode == 0 and "same" in r.stdout, r.stderr[-3000:]


def _assert_checks(checks, case_id):
    bad = [f"{n}: error {e:.3g} > bound {b:.3g}" for n, (e, b) in checks.items() if not e <= b]
    assert not bad, f"{case_id}: " + "; ".join(bad)


# ----------------------------------------------------------------------------- cases
def _pad(B, Sq, Sk, Hq, Hk, D, dtype, **kw):
    return dict(B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hk=Hk, D=D, dtype=dtype, **kw)


def _case_id(c):
    if "lens_q" in c:
        s = f"varlen{c['lens_q']}x{c['lens_k']}".replace(" ", "")
    else:
        s = f"B{c['B']}-S{c['Sq']}" if c["Sq"] == c["Sk"] else f"B{c['B']}-Sq{c['Sq']}-Sk{c['Sk']}"
    s += f"-H{c['Hq']}:{c['Hk']}-D{c['D']}-{c['dtype']}"
    for flag in ("causal", "accumulate", "qkv_packed", "split_kv", "tma"):
        if c.get(flag):
            s += "-" + flag
    if c.get("window"):
        s += "-win{}:{}".format(*c["window"])
    if c.get("softcap"):
        s += f"-cap{c['softcap']:g}"
    if c.get("diag") is not None:
        s += f"-diag{c['diag']}".replace(" ", "")
    return s


GPU_CASES = [
    # >= 8192 tokens: the TMA descriptor path on Hopper (shorter calls load through pointers)
    _pad(1, 8200, 8200, 4, 2, 128, "bf16", causal=True),
    dict(lens_q=[8193, 77], lens_k=[8193, 77], Hq=4, Hk=4, D=80, dtype="fp16", causal=True),
    _pad(2, 1000, 1000, 8, 2, 128, "bf16", causal=True),
    _pad(2, 1000, 1000, 16, 16, 64, "fp16"),
    _pad(1, 2049, 1023, 8, 8, 64, "bf16", causal=True, expect_masked=True),
    _pad(1, 777, 2049, 8, 1, 128, "bf16", causal=True),
    _pad(1, 1027, 1027, 4, 4, 80, "fp16", causal=True),
    _pad(1, 513, 513, 4, 2, 256, "bf16", causal=True),
    _pad(1, 1000, 1000, 4, 4, 64, "fp32", causal=True),
    _pad(1, 1000, 1000, 4, 2, 128, "bf16", window=(256, 64), softcap=30.0),
    _pad(1, 1000, 1000, 8, 2, 128, "bf16", causal=True, accumulate=True),
    dict(lens_q=[1, 500, 1023, 7], lens_k=[1, 500, 1023, 7], Hq=8, Hk=2, D=128, dtype="bf16", causal=True),
    _pad(1, 1, 32768, 32, 8, 128, "bf16", causal=True, split_kv=True),
    _pad(4, 4, 8192, 32, 8, 128, "bf16", causal=True, window=(4096, 0), split_kv=True),
    # Head dims 192 (MLA-style) and 80 through the split kernel and its L2 prefetch.
    _pad(1, 1, 8192, 16, 2, 192, "bf16", causal=True, split_kv=True),
    _pad(2, 2, 4096, 8, 8, 80, "fp16", causal=True, split_kv=True),
    _pad(1, 1000, 1000, 4, 2, 192, "bf16", causal=True),
    dict(
        lens_q=[300, 1, 800],
        lens_k=[500, 9, 700],
        Hq=4,
        Hk=4,
        D=64,
        dtype="bf16",
        causal=True,
        accumulate=True,
    ),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_kernels_cuda(case):
    _assert_checks(run_case(dict(case, device="cuda")), _case_id(case))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_cuda_offsets_past_int32():
    """Token offsets past 2^31 elements (long sequences x many heads): every kernel must address
    them in 64 bits. Views of one head out of 256 give a token stride of 32768 elements, so 70k
    tokens reach 2.3e9 elements without the compute of 256 heads; the results must equal the
    same call on compact copies (small strides) - forward, accumulate mode and backward."""
    from ringflash.kernels import bwd, fwd

    S, D, W = 70_000, 128, 256
    assert S * W * D > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    wide = torch.randn(1, S, W, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, dout = (wide[:, :, i : i + 1] for i in range(4))
    wide32 = torch.zeros(1, S, W, D, device="cuda", dtype=torch.float32)
    kw = dict(softmax_scale=D**-0.5, causal=True)

    def run(q, k, v, dout, out, dq, dk, dv):
        lse = torch.full((1, 1, S), float("-inf"), device="cuda")
        fwd.attn_fwd(q, k, v, out=out, lse=lse, **kw)  # accumulate mode: float32 state
        bwd.attn_bwd(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, **kw)
        return out, lse, dq, dk, dv

    wide_res = run(q, k, v, dout, *(wide32[:, :, i : i + 1] for i in range(4)))
    compact = (x.contiguous() for x in (q, k, v, dout))
    compact_res = run(*compact, *(torch.zeros(1, S, 1, D, device="cuda") for _ in range(4)))
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), wide_res, compact_res, strict=True):
        assert torch.isfinite(got).all(), f"{name}: non-finite values with wide strides"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("accumulate", [False, True], ids=["plain", "accumulate"])
def test_kernels_cuda_dq_beside_dkdv(accumulate):
    """dQ on a second stream beside dK/dV (``AttnConfig.concurrent_dq``, the default) gives
    bitwise the gradients of the two kernels one after the other, also when the caller runs on
    its own stream and reads the gradients right after the call (the join orders that read after
    dQ), when the call is replayed from a CUDA graph, and when its first call is captured."""
    from ringflash.kernels import bwd, fwd
    from ringflash.kernels.device import forget_side_streams, side_stream_devices
    from ringflash.kernels.options import AttnConfig

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(2, 1000, h, 64, device="cuda", dtype=torch.bfloat16, generator=g) for h in (8, 2, 2, 8)
    )
    kw = dict(softmax_scale=0.125, causal=True)
    out, lse = fwd.attn_fwd(q, k, v, **kw)

    def grads(config=None):
        if not accumulate:
            return [x.float() for x in bwd.attn_bwd(do, q, k, v, out, lse, config=config, **kw)]
        acc = [torch.ones(x.shape, device="cuda") for x in (q, k, v)]
        bwd.attn_bwd(do, q, k, v, out, lse, dq=acc[0], dk=acc[1], dv=acc[2], config=config, **kw)
        return acc

    def captured(stream):
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            static = grads()
        graph.replay()
        torch.cuda.synchronize()
        return static

    ref = grads(AttnConfig(concurrent_dq=False))
    got = {"second stream": grads()}
    assert side_stream_devices("dq") == [torch.cuda.current_device()]
    caller = torch.cuda.Stream()
    caller.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(caller):
        got["caller's stream"] = [x.clone() for x in grads()]
    torch.cuda.current_stream().wait_stream(caller)
    got["graph replay"] = captured(caller)
    # A first call inside a capture makes no stream: it runs on the capturing stream alone.
    forget_side_streams()
    got["first capture"] = captured(caller)
    assert not side_stream_devices("dq")
    for how, grads_how in got.items():
        for name, r, x in zip("qkv", ref, grads_how, strict=True):
            assert torch.equal(x, r), f"d{name} with dQ beside, {how}: max diff {(x - r).abs().max()}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_kernels_cuda_tensors_on_another_gpu():
    """Tensors on GPU 1 while GPU 0 is current (a model split over GPUs in one process): the
    kernels launch on GPU 1 and give the same results as with GPU 1 current."""
    from ringflash.decode import flash_attn_with_kvcache
    from ringflash.kernels import bwd, fwd

    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (
        torch.randn(2, 300, h, 64, device=dev, dtype=torch.bfloat16, generator=g) for h in (4, 2, 2, 4)
    )
    kw = dict(softmax_scale=0.125, causal=True)

    def run():
        out, lse = fwd.attn_fwd(q, k, v, **kw)
        grads = bwd.attn_bwd(do, q, k, v, out, lse, **kw)
        kc, vc = (
            torch.zeros(2, 400, 2, 64, device=dev, dtype=q.dtype),
            torch.zeros(2, 400, 2, 64, device=dev, dtype=q.dtype),
        )
        kc[:, :300], vc[:, :300] = k, v
        lens = torch.full((2,), 300, dtype=torch.int32, device=dev)
        dec = flash_attn_with_kvcache(q[:, -1:], kc, vc, k[:, :1], v[:, :1], cache_seqlens=lens, causal=True)
        return (out, lse, *grads, dec)

    other = run()
    assert torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        same = run()
    for a, b in zip(other, same, strict=True):
        assert a.device == dev and torch.equal(a, b)
