"""Local (one-device) attention: autograd, torch.library custom ops and the public functions.

The forward saves ``(q, k, v, out, lse)`` and the backward recomputes the probabilities from the
LSE (flash attention's recomputation). Both directions are ``torch.library`` custom ops so that
``torch.compile(fullgraph=True)`` traces models that call them; eager calls take an equivalent
``autograd.Function`` that skips the custom-op dispatch (host time that short calls notice). The
backend (Triton kernels or the blockwise PyTorch path) is chosen per call by ``ringflash.backends``
and passed into the op.

A gradient that flows into the returned LSE is honoured: since d lse / d s = p, it folds into the
backward's ``delta = rowsum(dout * out)`` as ``delta - dlse``.
"""

from __future__ import annotations

import torch

from .backends import SignatureTable, backend_for, get_backend, plan_signature
from .checks import (
    check_cu_seqlens,
    check_max_seqlen,
    check_options,
    check_qkv,
    check_sink,
    resolve_scale,
    value_check_mode,
)
from .device_errors import raise_completed
from .merge import combine_attn_partials, merge_attn_states, merge_sink
from .paged import unpage

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "merge_attn_states", "combine_attn_partials"]

Tensor = torch.Tensor


def _opts(scale, causal, wl, wr, softcap, cu_q=None, cu_k=None, max_q=0, max_k=0, cu_bounds=None):
    """The backend's keyword arguments; with ``cu_q`` also the packed-sequence ones (and
    ``cu_bounds`` for ``cu_seqlens`` the backend must not trust)."""
    kw = dict(softmax_scale=scale, causal=causal, window_size=(wl, wr), softcap=softcap)
    if cu_q is not None:
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        if cu_bounds is not None:
            kw["cu_bounds"] = cu_bounds
    return kw


# ---------------------------------------------------------------- padded [B, S, H, D] ops


@torch.library.custom_op("ringflash::attn_fwd", mutates_args=())
def _attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    wl: int,
    wr: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    out, lse = get_backend(backend).attn_fwd(q, k, v, **_opts(scale, causal, wl, wr, softcap))
    return out, lse


@_attn_fwd.register_fake
def _(q, k, v, scale, causal, wl, wr, softcap, backend):
    B, S, H, _ = q.shape
    return q.new_empty(B, S, H, v.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("ringflash::attn_bwd", mutates_args=())
def _attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    delta: Tensor,
    scale: float,
    causal: bool,
    wl: int,
    wr: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    be = get_backend(backend)
    dq, dk, dv = be.attn_bwd(dout, q, k, v, out, lse, delta=delta, **_opts(scale, causal, wl, wr, softcap))
    return dq, dk, dv


@_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, delta, scale, causal, wl, wr, softcap, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup(ctx, inputs, output):
    q, k, v, scale, causal, wl, wr, softcap, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.opts = (scale, causal, wl, wr, softcap, backend)


@torch.library.custom_op("ringflash::attn_bwd_delta", mutates_args=())
def _attn_bwd_delta(dout: Tensor, out: Tensor, packed: bool, backend: str) -> Tensor:
    # The backend's kernel (one pass over dout and out on GPU; float32 copies of both in plain
    # torch ops cost several times more), as an op so that torch.compile traces the backward.
    return get_backend(backend).attn_bwd_delta(dout, out, packed=packed)


@_attn_bwd_delta.register_fake
def _(dout, out, packed, backend):
    if packed:
        T, H, _ = out.shape
        return out.new_empty(H, T, dtype=torch.float32)
    B, S, H, _ = out.shape
    return out.new_empty(B, H, S, dtype=torch.float32)


def _delta(dout, out, dlse, packed, backend):
    delta = _attn_bwd_delta(dout, out, packed, backend)
    return delta if dlse is None else (delta - dlse).contiguous()


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dout = dout.contiguous()
    delta = _delta(dout, out, dlse, False, ctx.opts[-1])
    dq, dk, dv = _attn_bwd(dout, q, k, v, out, lse, delta, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None, None


_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


# ---------------------------------------------------------------- packed [T, H, D] ops


@torch.library.custom_op("ringflash::attn_varlen_fwd", mutates_args=())
def _attn_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
    wl: int,
    wr: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    kw = _opts(scale, causal, wl, wr, softcap, cu_q, cu_k, max_q, max_k)
    out, lse = get_backend(backend).attn_fwd(q, k, v, **kw)
    return out, lse


@_attn_varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr, softcap, backend):
    T, H, _ = q.shape
    return q.new_empty(T, H, v.shape[-1]), q.new_empty(H, T, dtype=torch.float32)


@torch.library.custom_op("ringflash::attn_varlen_bwd", mutates_args=())
def _attn_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    delta: Tensor,
    cu_q: Tensor,
    cu_k: Tensor,
    max_q: int,
    max_k: int,
    scale: float,
    causal: bool,
    wl: int,
    wr: int,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    kw = _opts(scale, causal, wl, wr, softcap, cu_q, cu_k, max_q, max_k)
    dq, dk, dv = get_backend(backend).attn_bwd(dout, q, k, v, out, lse, delta=delta, **kw)
    return dq, dk, dv


@_attn_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, delta, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr, softcap, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, *opts = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.lens = (max_q, max_k)
    ctx.opts = tuple(opts)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dout = dout.contiguous()
    delta = _delta(dout, out, dlse, True, ctx.opts[-1])
    dq, dk, dv = _attn_varlen_bwd(dout, q, k, v, out, lse, delta, cu_q, cu_k, *ctx.lens, *ctx.opts)
    return (dq, dk, dv) + (None,) * 10


_attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ---------------------------------------------------------------- eager calls


class _EagerAttn(torch.autograd.Function):
    """What the custom ops above compute, for eager calls (padded, or packed with ``cu_q``):
    the custom-op dispatch costs tens of microseconds of host time per call (argument defaults,
    redispatch, a torch.compile guard), which a short attention call notices. torch.compile
    traces the custom ops instead."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, wl, wr, softcap, backend, cu_q, cu_k, max_q, max_k, bounds=None):
        kw = _opts(scale, causal, wl, wr, softcap, cu_q, cu_k, max_q, max_k, bounds)
        out, lse = get_backend(backend).attn_fwd(q, k, v, **kw)
        if ctx is None:  # called directly for inference (``_eager_attn``)
            return out, lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kw, ctx.backend = kw, backend  # a backend's backward only clamps what cu_bounds names
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        be = get_backend(ctx.backend)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = None  # rowsum(dout * out): each backend computes it if it needs it (cuDNN does not)
        if dlse is not None:  # d lse / d s = p: a gradient into the LSE folds into delta
            delta = (be.attn_bwd_delta(dout, out, packed="cu_seqlens_q" in ctx.kw) - dlse).contiguous()
        dq, dk, dv = be.attn_bwd(dout, q, k, v, out, lse, delta=delta, **ctx.kw)
        return (dq, dk, dv) + (None,) * 11


def _eager_attn(q, k, v, *args):
    """``_EagerAttn`` through autograd when a gradient can flow into q, k or v; otherwise its
    forward alone (inference: the same kernels, without the autograd wrapping)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttn.apply(q, k, v, *args)
    return _EagerAttn.forward(None, q, k, v, *args)


# ---------------------------------------------------------------- planned inference calls

# Inference calls of ``flash_attn_func`` that passed every check and were planned by their backend,
# by everything the checks and the launch derive from (each tensor's type, shape, strides, dtype
# and device, each option's type and value, the backend and configs in force). A later call of one
# (a prefill of a repeated length, a model's layers) allocates its results and launches, nothing
# else.
_PLANS = SignatureTable(256)


def _plan_key(q, k, v, options, sink=None, tensors=(), *extra) -> tuple | None:
    """The key of an inference call in ``_PLANS``, or None for one that takes the full path.
    ``tensors`` and ``extra``: more of the call's tensors and values the key holds."""
    if torch.compiler.is_compiling() or not (type(q) is type(k) is type(v) is torch.Tensor):
        return None
    grads = q.requires_grad or k.requires_grad or v.requires_grad
    if (grads or getattr(sink, "requires_grad", False)) and torch.is_grad_enabled():
        return None  # a call autograd records: the full path (its kernels are longer anyway)
    return plan_signature((q, k, v, sink, *tensors), options, options[3], *extra)


# ---------------------------------------------------------------- public functions


# Inference calls of ``flash_attn_varlen_func`` by the same signature (``_varlen_plan_key``): a later
# call of one (a model's layers over one packed batch, a serving loop's repeated batch shapes) only
# runs the forward, which bounds ``cu_seqlens`` on the device; the argument checks it skips depend
# on nothing the key leaves out. Host value checks read every call's ``cu_seqlens``: no plan.
_VARLEN_PLANS = SignatureTable(256)


def _varlen_plan_key(q, k, v, cu_q, cu_k, max_q, max_k, options, sink, mode, lse=True) -> tuple | None:
    """The key of an inference ``flash_attn_varlen_func`` call in ``_VARLEN_PLANS``, or None for one
    that takes the full path (host value checks, autograd, a non-int ``max_seqlen``). ``lse``:
    whether the caller takes the LSE (a plan of a call that does not writes it to scratch)."""
    if mode == "host" or type(max_q) is not int or type(max_k) is not int:
        return None
    return _plan_key(q, k, v, options, sink, (cu_q, cu_k), max_q, max_k, cu_q is cu_k, mode, lse)


def _varlen_runner(opts, lens, bounds):
    """A planned packed inference call: ``runner(q, k, v, cu_q, cu_k) -> (out, lse)``."""

    def run(q, k, v, cu_q, cu_k):
        return _EagerAttn.forward(None, q, k, v, *opts, cu_q, cu_k, *lens, bounds)

    return run


def _finish(out, lse, return_attn_probs, sink=None):
    if sink is not None:
        out, lse = merge_sink(out, lse, sink)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    learnable_sink=None,
):
    """Exact attention ``softmax(q k^T * scale) v`` on one device, flash-attn style.

    Args:
        q: ``[B, Sq, Hq, D]``. k, v: ``[B, Sk, Hk, D]`` with ``Hq % Hk == 0`` (GQA/MQA).
            float16, bfloat16 or float32; ``D <= 256``.
        dropout_p: must be 0.0 (dropout is not supported).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: causal mask aligned to the bottom-right when ``Sq != Sk``.
        window_size: ``(left, right)`` sliding window, -1 for unbounded.
        softcap: when > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: must be None (not supported).
        deterministic: accepted for compatibility; the backward is always deterministic.
        return_attn_probs: also return the LSE, as ``(out, lse, None)``.
        learnable_sink: ``[Hq]`` float tensor or None: one logit per query head that joins every
            row's softmax denominator and carries no value (gpt-oss's sinks); differentiable.

    Returns:
        ``out [B, Sq, Hq, D]`` in q's dtype; with ``return_attn_probs`` also ``lse [B, Hq, Sq]``,
        float32 natural log (including the sink), ``-inf`` (and output 0) for rows that see no key
        (and no sink).

    Example:
        >>> q = torch.randn(2, 1024, 8, 64, dtype=torch.bfloat16, device="cuda")
        >>> k = v = torch.randn(2, 1024, 2, 64, dtype=torch.bfloat16, device="cuda")
        >>> out = flash_attn_func(q, k, v, causal=True)
    """
    key = None
    wants_lse = bool(return_attn_probs) or learnable_sink is not None  # a sink merges by the LSE
    if alibi_slopes is None:
        options = (dropout_p, softmax_scale, causal, window_size, softcap)
        key = _plan_key(q, k, v, options, learnable_sink, (), wants_lse)
        runner = _PLANS.find(key)
        if runner is not None:
            out, lse = runner(q, k, v)
            return _finish(out, lse, return_attn_probs, learnable_sink)
    causal, (wl, wr), softcap, scale = check_options(
        dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal
    )
    check_qkv(q, k, v)
    check_sink(learnable_sink, q)
    scale = resolve_scale(scale, q.shape[-1])
    be = backend_for(q)
    args = (q, k, v, scale, causal, wl, wr, softcap, be.name)
    if torch.compiler.is_compiling():
        out, lse = _attn_fwd(*args)
    else:
        out, lse = _eager_attn(*args, None, None, 0, 0)
        opts = _opts(scale, causal, wl, wr, softcap)
        runner = be.attn_plan(q, k, v, lse=wants_lse, **opts) if key is not None else None
        if runner is not None:
            _PLANS.keep(key, runner)
    return _finish(out, lse, return_attn_probs, learnable_sink)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    learnable_sink=None,
):
    """Attention over packed variable-length sequences.

    Args:
        q: ``[total_q, Hq, D]``. k, v: ``[total_k, Hk, D]``, or with ``block_table`` paged caches
            ``[num_blocks, page_size, Hk, D]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]``, cumulative lengths starting at 0; sequence
            ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``. Lengths may be 0.
        max_seqlen_q, max_seqlen_k: upper bounds on the sequence lengths.
        block_table: int32 ``[batch, max_blocks]`` or None: sequence ``b``'s keys are the first
            ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` slots of its pages ``block_table[b]`` (as in
            flash-attn; the pages are gathered into one run per sequence before the call).
        Other arguments: as in :func:`flash_attn_func`; masks align per sequence.

    Returns:
        ``out [total_q, Hq, D]``; with ``return_attn_probs`` also ``lse [Hq, total_q]`` (float32).

    Example:
        >>> cu = torch.tensor([0, 100, 350], dtype=torch.int32)
        >>> out = flash_attn_varlen_func(q, k, v, cu, cu, 250, 250, causal=True)
    """
    key = None
    wants_lse = bool(return_attn_probs) or learnable_sink is not None  # a sink merges by the LSE
    if alibi_slopes is None and block_table is None:
        mode = value_check_mode(q) if type(q) is torch.Tensor else "host"
        options = (dropout_p, softmax_scale, causal, window_size, softcap)
        key = _varlen_plan_key(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options, learnable_sink, mode,
            wants_lse,
        )  # fmt: skip
        runner = _VARLEN_PLANS.find(key)
        if runner is not None:
            if mode is not None:
                raise_completed(q.device)  # a failure an earlier call queued on the device
            out, lse = runner(q, k, v, cu_seqlens_q, cu_seqlens_k)
            return _finish(out, lse, return_attn_probs, learnable_sink)
    causal, (wl, wr), softcap, scale = check_options(
        dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal
    )
    if block_table is not None:
        k, v = unpage(k, v, block_table, cu_seqlens_k, q)
    check_qkv(q, k, v, packed=True)
    check_sink(learnable_sink, q)
    mode = value_check_mode(q)  # "host": read cu_seqlens here; else bounded on the device
    if mode is not None:
        raise_completed(q.device)  # a failure an earlier call queued on the device
    read = mode == "host"
    cu_q = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", q.device, read=read)
    cu_k = check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k", k.device, read=read)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    lens = (
        check_max_seqlen(cu_seqlens_q, max_seqlen_q, "max_seqlen_q", cu_q),
        check_max_seqlen(cu_seqlens_k, max_seqlen_k, "max_seqlen_k", cu_k),
    )
    scale = resolve_scale(scale, q.shape[-1])
    be = backend_for(q)
    opts = (scale, causal, wl, wr, softcap, be.name)
    if torch.compiler.is_compiling():
        out, lse = _attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, *lens, *opts)
    else:
        # Unread, cu_seqlens is bounded to the rows by the backend, which reports what failed.
        bounds = None if read else ("report" if mode == "device" else "clamp")
        out, lse = _eager_attn(q, k, v, *opts, cu_seqlens_q, cu_seqlens_k, *lens, bounds)
        if key is not None:
            kw = _opts(scale, causal, wl, wr, softcap, cu_seqlens_q, cu_seqlens_k, *lens, bounds)
            runner = be.varlen_plan(q, k, v, lse=wants_lse, **kw)
            _VARLEN_PLANS.keep(key, runner or _varlen_runner(opts, lens, bounds))
    return _finish(out, lse, return_attn_probs, learnable_sink)
