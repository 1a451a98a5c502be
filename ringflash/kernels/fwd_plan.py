"""A forward call's launch fixed once per call signature, for the eager host path: a model's layers
repeat a few signatures, so everything derived from shapes, strides, dtypes, options and config is
looked up once by the caller (``ringflash.ops``' planned calls) and each later call only allocates
its results, binds its tensors and launches (``run_fwd_plan``)."""

from __future__ import annotations

import math

import torch

from .device import on_tensor_device
from .fwd import _FWD_LAUNCHES, _fwd_gpu, _gpu_grid, _launch, _launch_key, _result_shapes
from .launch import SCRATCH_STREAMS, StreamLaunch, eager_stream, stream_scratch
from .launch_args import call_tensors
from .options import AttnConfig
from .tma import tma_applies

__all__ = ["FwdPlan", "plan_fwd", "run_fwd_plan"]


class FwdPlan:
    """The launch of an ``attn_fwd`` call that allocates its results (padded, or packed with the
    given lengths), fixed for every later call of the same signature: ``run_fwd_plan`` then
    allocates, binds the tensors and launches. ``lse``: whether the caller takes the LSE; if not,
    and it is small (a short call, where an allocation's host time shows), the launch writes it
    to the stream's scratch that all plans share (``_LSE_SCRATCH``) and a call allocates only its
    output."""

    __slots__ = ("static", "slot", "shape", "out_shape", "lse_shape", "lse", "scratch_lse", "eager")

    def __init__(self, static, slot, shape, out_shape, lse_shape, lse=True):
        self.static, self.slot, self.shape = static, slot, shape
        self.out_shape, self.lse_shape, self.lse = out_shape, lse_shape, lse
        self.scratch_lse = not lse and math.prod(lse_shape) <= _SCRATCH_LSE_MAX
        self.eager: dict[int, StreamLaunch] = {}  # the eager calls' launch per CUDA stream


# The untaken LSEs of planned calls, one float32 buffer per stream that every plan shares (the
# largest one asked for); LSEs of more elements (long calls) are allocated per call instead, so
# that no buffer bigger than this outlives its call.
_LSE_SCRATCH: dict = {}
_SCRATCH_LSE_MAX = 1 << 20


def plan_fwd(
    q,
    k,
    v,
    *,
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    config=None,
    bound_cu=False,
    flag=None,
    lse=True,
):
    """The plan of an ``attn_fwd(q, k, v, ...)`` call (no ``out``/``lse``, bottom-right masks;
    packed with both ``max_seqlen`` given, its ``cu_seqlens`` only shaped, bound per call) that
    has run before, or None (not kept, or nothing launches). ``lse`` False: its runs return
    ``(out, None)``."""
    config = config or AttnConfig()
    out_shape, lse_shape = _result_shapes(q, v, cu_seqlens_q is not None)
    out = torch.empty(out_shape, dtype=q.dtype, device="meta")  # the strides a fresh result has
    lse_like = torch.empty(lse_shape, dtype=torch.float32, device="meta")
    mask = (softmax_scale, causal, window_size, softcap)
    lens = (max_seqlen_q, max_seqlen_k)  # read by the key of packed calls only
    buffers = (False, False, bound_cu, flag is not None)
    key = _launch_key(q, k, v, out, lse_like, mask, cu_seqlens_q, *lens, None, buffers, config)
    entry = _FWD_LAUNCHES.get(key) if key is not None else None
    if entry is None or q.numel() == 0:
        return None
    static, B, Sq, Sk, slot = entry
    if B == 0 or Sq == 0:
        return None
    return FwdPlan(static, slot, (B, Sq, q.shape[-2], max(Sq, Sk)), out_shape, lse_shape, lse)


@on_tensor_device
def run_fwd_plan(q, plan: FwdPlan, k, v, cu_seqlens_q=None, cu_seqlens_k=None):
    """``attn_fwd``'s ``(out, lse)`` for a call of ``plan``'s signature (packed: with its
    ``cu_seqlens``, bounded in the kernel if the plan's call was); ``lse`` None unless
    ``plan.lse``."""
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)
    B, Sq, Hq, longest = plan.shape
    stream = eager_stream(q.device)
    if stream is not None:  # an eager call: its stream's scratch and launch in one lookup
        run = plan.eager.get(stream) or _stream_launch(plan, q, stream)
        tma = tma_applies(q, k, v, seqlen=longest)
        if plan.scratch_lse:
            run(q, k, v, cu_seqlens_q, cu_seqlens_k, out, tma)
            return out, None
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=q.device)
        run(q, k, v, cu_seqlens_q, cu_seqlens_k, out, tma, lse)
        return out, lse if plan.lse else None
    if plan.scratch_lse:
        lse = stream_scratch(_LSE_SCRATCH, "LSE", plan.lse_shape, q.device)
    else:
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=q.device)
    per_call = call_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, None, B)
    per_call.update(O=out, LSE=lse, TMA=tma_applies(q, k, v, seqlen=longest))
    _launch(q, plan.static, per_call, plan.slot, B, Sq, Hq)
    return out, lse if plan.lse else None


def _stream_launch(plan: FwdPlan, q, stream: int) -> StreamLaunch:
    """``plan``'s :class:`StreamLaunch` for eager calls on ``stream`` (CUDA), made and kept: the
    tensors, ``TMA`` and (unless it is scratch) ``LSE`` bound per call."""
    B, Sq, Hq, _ = plan.shape
    fixed = {"DIAG_PTR": None, "SEQ_ORDER": None}  # what ``call_tensors`` binds for a plan's calls
    names = ("Q", "K", "V", "CU_Q", "CU_K", "O", "TMA")
    if plan.scratch_lse:
        # A view of the stream's whole buffer (the largest any plan takes): the store never
        # replaces it by a larger one that plans keeping the old one would hold on to.
        whole = stream_scratch(_LSE_SCRATCH, "LSE", (_SCRATCH_LSE_MAX,), q.device)
        fixed["LSE"] = whole[: math.prod(plan.lse_shape)].view(plan.lse_shape)
    else:
        names += ("LSE",)
    if len(plan.eager) >= SCRATCH_STREAMS:
        plan.eager.clear()  # calls on ever new streams start over rather than growing
    grid = _gpu_grid(B, Sq, Hq)
    run = plan.eager[stream] = StreamLaunch(_fwd_gpu, grid, plan.static, plan.slot, fixed, names, stream)
    return run
