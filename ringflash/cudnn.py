"""Attention through cuDNN (PyTorch's ``aten._scaled_dot_product_cudnn_attention`` and its backward),
for the calls it serves exactly; the interface of ``ringflash.blockwise`` for those calls.

cuDNN returns the output and its log-sum-exp, so its results merge by LSE like any other partial:
the ring, Ulysses and the local functions can run their local steps on it. It serves padded
16-bit calls without a window or a softcap whose mask is none or the causal diagonal of a square
block (the only alignment on which every cuDNN version agrees), head dims that are multiples of 8
up to 128 (a window ``(-1, 0)`` under a causal mask is no window); :func:`serves` says which.
``ringflash.backends`` sends every other call to the next backend, never to a different mask.
Grouped KV heads go to cuDNN as they are from PyTorch 2.11 (checked on an H100: outputs and LSE
equal to the repeated heads', dK/dV summed over each group inside cuDNN); before 2.11 they are
repeated, and their gradients summed back over each group.

The backward takes the final ``(out, lse)`` of the forward, as every backend does, and cuDNN
computes ``delta = rowsum(dout * out)`` itself. A ``delta`` with more folded in (an LSE gradient)
cannot be given to cuDNN, so :func:`serves_backward` admits only the deltas marked plain
(:func:`mark_plain`).
"""

from __future__ import annotations

import functools
import weakref

import torch

from .merge import merge_into_

MAX_HEADDIM = 128

# The deltas known to be exactly rowsum(dout * out) (``mark_plain``), which cuDNN recomputes; a
# delta that is not one of them carries more and must take another backend.
# (By identity: tensors compare elementwise, so a WeakSet cannot hold them.)
_PLAIN_DELTAS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@functools.cache
def available() -> bool:
    """True when PyTorch has a CUDA device, cuDNN and its cuDNN attention op."""
    return (
        torch.cuda.is_available()
        and torch.backends.cudnn.is_available()
        and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
    )


def _square_causal(q, k, causal: bool, diag_offset) -> bool | None:
    """cuDNN's ``is_causal`` for the call's mask: False (no mask), True (the diagonal of a square
    block), or None (a mask cuDNN does not express)."""
    sq, sk = q.shape[1], k.shape[1]
    if not causal:
        return False
    diag = sk - sq if diag_offset is None else diag_offset
    if not isinstance(diag, int):
        return None  # one diagonal per sequence
    if diag >= sk - 1:
        return False  # every key visible to every row
    return True if sq == sk and diag == 0 else None


def _no_window(window_size, causal: bool) -> bool:
    """No sliding window: ``(-1, -1)``, or under a causal mask ``(-1, 0)`` (the right bound is the
    diagonal either way)."""
    left, right = window_size
    return left == -1 and (right == -1 or (causal and right == 0))


def serves(q, k, v, **problem) -> bool:
    """Whether cuDNN computes this attention call exactly: CUDA tensors and a call that
    :func:`fits` (see the module docstring)."""
    return q.is_cuda and fits(q, k, v, **problem)


def fits(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0,
         cu_seqlens_q=None, diag_offset=None, **_) -> bool:  # fmt: skip
    """Whether the call's dtype, shapes and mask are ones cuDNN computes exactly (any device)."""
    d = q.shape[-1]
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and cu_seqlens_q is None
        and q.dim() == 4
        and not softcap
        and _no_window(window_size, causal)
        and v.shape[-1] == d
        and d % 8 == 0
        and d <= MAX_HEADDIM
        and min(q.shape[1], k.shape[1], q.shape[0]) > 0
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and _square_causal(q, k, causal, diag_offset) is not None
    )


def serves_backward(dout, q, k, v, *, delta=None, **problem) -> bool:
    """Whether cuDNN computes this backward call exactly: a call :func:`serves`, with no delta or
    one marked plain (:func:`mark_plain`), and ``dout`` contiguous in the head dim."""
    return plain_delta(delta) and dout.stride(-1) == 1 and serves(q, k, v, **problem)


def plain_delta(delta) -> bool:
    """None, or a delta marked plain (:func:`mark_plain`), or a view of one (a ring piece's rows)."""
    if delta is None:
        return True
    return any(x is not None and _PLAIN_DELTAS.get(id(x)) is x for x in (delta, delta._base))


# The PyTorch version from which the cuDNN op takes fewer KV heads than query heads.
_NATIVE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11)


def _heads_first(x: torch.Tensor, group: int = 1) -> torch.Tensor:
    """``[B, S, H, D]`` as the ``[B, H * group, S, D]`` view cuDNN takes (KV heads repeated
    ``group`` times for grouped-query attention)."""
    if group > 1:
        x = x.repeat_interleave(group, dim=2)
    return x.transpose(1, 2)


def _call(q, k, v, causal, diag_offset):
    group = 1 if _NATIVE_GQA else q.shape[2] // k.shape[2]
    qt, kt, vt = _heads_first(q), _heads_first(k, group), _heads_first(v, group)
    is_causal = _square_causal(q, k, causal, diag_offset)
    return qt, kt, vt, group, is_causal


def attn_fwd(
    q,
    k,
    v,
    *,
    softmax_scale,
    causal=False,
    diag_offset=None,
    out=None,
    lse=None,
    merge=True,
    **_,
):
    """Forward attention ``(out [B, Sq, Hq, D], lse [B, Hq, Sq] float32)`` of a call that
    :func:`serves`; ``out``/``lse`` given: merged into them (float32) or, with ``merge=False``,
    written over them (``ringflash.blockwise.attn_fwd``'s contract)."""
    qt, kt, vt, _, is_causal = _call(q, k, v, causal, diag_offset)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qt, kt, vt, None, True, 0.0, is_causal, False, scale=float(softmax_scale)
    )
    o = res[0].transpose(1, 2)
    lse_c = res[1].reshape(q.shape[0], q.shape[2], q.shape[1]).float()
    if out is None:
        return o.contiguous(), lse_c
    if merge:
        merge_into_(out, lse, o, lse_c)
    else:
        out.copy_(o)
        lse.copy_(lse_c)
    return out, lse


def mark_plain(delta: torch.Tensor) -> torch.Tensor:
    """``delta``, recorded as exactly ``rowsum(dout * out)`` (another backend's
    ``attn_bwd_delta``), which cuDNN may recompute (:func:`serves_backward`)."""
    _PLAIN_DELTAS[id(delta)] = delta
    return delta


def _put(dst, src, add: bool):
    """``src`` into the given gradient buffer ``dst``: added (float32) or written."""
    if dst is None:
        return src
    if add:
        dst.add_(src)
    else:
        dst.copy_(src)
    return dst


def attn_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    softmax_scale,
    causal=False,
    diag_offset=None,
    dq=None,
    dk=None,
    dv=None,
    accumulate=(True, True),
    **_,
):
    """Backward from the final ``(out, lse)`` of a call that :func:`serves_backward`;
    ``ringflash.blockwise.attn_bwd``'s contract for given buffers and ``accumulate``."""
    qt, kt, vt, group, is_causal = _call(q, k, v, causal, diag_offset)
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    none = torch.zeros((), dtype=torch.int64, device=q.device)  # the dropout seed and offset: unused
    dqt, dkt, dvt = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout.transpose(1, 2),
        qt,
        kt,
        vt,
        out.to(q.dtype).transpose(1, 2),
        lse.reshape(b, hq, sq, 1),
        none,
        none,
        None,
        None,
        None,
        sq,
        sk,
        0.0,
        is_causal,
        scale=float(softmax_scale),
    )
    g_q = dqt.transpose(1, 2)
    g_k, g_v = dkt.transpose(1, 2), dvt.transpose(1, 2)
    if group > 1:  # the repeated heads' gradients summed back onto their KV head
        g_k = g_k.reshape(b, sk, hk, group, d).sum(3, dtype=torch.float32)
        g_v = g_v.reshape(b, sk, hk, group, d).sum(3, dtype=torch.float32)
    add_q, add_kv = accumulate if dq is not None else (False, False)
    if dq is None:
        return g_q.contiguous(), g_k.to(k.dtype).contiguous(), g_v.to(v.dtype).contiguous()
    return _put(dq, g_q, add_q), _put(dk, g_k, add_kv), _put(dv, g_v, add_kv)


__all__ = [
    "MAX_HEADDIM",
    "attn_bwd",
    "attn_fwd",
    "available",
    "fits",
    "mark_plain",
    "plain_delta",
    "serves",
    "serves_backward",
]
