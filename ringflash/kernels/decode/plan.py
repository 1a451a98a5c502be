"""A decoding call's launch fixed once per call signature, for the eager host path: a decoding loop
repeats a few signatures (one per layer shape), so everything derived from shapes, strides, dtypes,
options and config is looked up once by the caller (``ringflash.decode``) and each later call only
allocates its results, binds its tensors and launches (``run_plan``)."""

from __future__ import annotations

import torch

from ..device import on_tensor_device
from ..launch import SCRATCH_STREAMS, StreamLaunch, eager_stream, launch_cached
from ..options import DecodeConfig
from . import _bind, _Launch, _launch_for, scratch
from .combine import combine_partials
from .counters import default_arenas
from .split import _decode_split_kernel

__all__ = ["DecodePlan", "plan_decode", "run_plan"]


class DecodePlan:
    """A ``decode_fwd`` call's launch, fixed for every later call of the same signature (shapes,
    strides, dtypes, devices, options and config): ``run_plan`` then only allocates the results
    and launches. ``lse``: whether the caller takes the LSE; if not, the launch writes it to a
    scratch buffer (``scratch``) and the call allocates only ``out``."""

    __slots__ = ("launch", "out_shape", "out_dtype", "lse_shape", "combine", "lse", "eager")

    def __init__(self, launch: _Launch, out_shape, out_dtype, lse_shape, combine: bool, lse: bool):
        self.launch, self.out_shape, self.out_dtype = launch, out_shape, out_dtype
        self.lse_shape, self.combine, self.lse = lse_shape, combine, lse
        self.eager: dict[int, StreamLaunch] = {}  # the eager calls' launch per CUDA stream


def plan_decode(
    q,
    k_cache,
    v_cache,
    *,
    k_new=None,
    v_new=None,
    block_table=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    out_dtype=None,
    config=None,
    check=False,
    lse=True,
) -> DecodePlan | None:
    """The plan of a ``decode_fwd`` call with these arguments (bottom-right masks, ``n_new`` from
    ``k_new``), or None where the call takes another path (empty output, append alone, inputs
    whose last dim is strided, a launch that depends on addresses). Inputs as ``decode_fwd``;
    ``lse`` False: the runs return ``(out, None)``."""
    config = config or DecodeConfig()
    B, Sq, Hq, D = q.shape
    units = all(t is None or t.stride(-1) == 1 for t in (q, k_cache, v_cache, k_new, v_new))
    if not units or B * Sq * Hq * D == 0 or (k_new is None) != (v_new is None):
        return None
    n_new = 0 if k_new is None else k_new.shape[1]
    out_dtype = out_dtype or q.dtype
    launch, kept = _launch_for(
        q, k_cache, v_cache, k_new if n_new else None, v_new if n_new else None, block_table,
        cache_batch_idx, None, cache_leftpad, out_dtype, n_new, softmax_scale, causal, window_size,
        softcap, num_splits, config, check,
    )  # fmt: skip
    if not kept:
        return None
    return DecodePlan(launch, (B, Sq, Hq, D), out_dtype, (B, Hq, Sq), not config.fuse_combine, lse)


@on_tensor_device
def run_plan(
    q,
    plan: DecodePlan,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    cache_leftpad,
    check_flag,
):
    """``decode_fwd``'s ``(out, lse)`` for a call of ``plan``'s signature (``check_flag`` given
    exactly when the plan was made with ``check``); ``lse`` None unless ``plan.lse``."""
    dev = q.device
    launch = plan.launch
    out = torch.empty(plan.out_shape, dtype=plan.out_dtype, device=dev)
    stream = None if plan.combine else eager_stream(dev)
    if stream is not None:  # an eager call: its stream's scratch and launch in one lookup
        run = plan.eager.get(stream)
        if run is None:
            run = _stream_launch(plan, q, k_cache, v_cache, cache_seqlens, check_flag, stream)
        if launch.sem_rows:  # headroom for calls captured later (``semaphore_buffer``)
            default_arenas().reserve(dev, launch.sem_rows)
        fused = launch.static["FUSE_APPEND"]
        tensors = (
            q, k_cache, v_cache, k_new if fused else None, v_new if fused else None, out, cache_seqlens,
            block_table, cache_batch_idx, cache_leftpad,
        )  # fmt: skip
        if launch.parts is None:  # one split: it writes out / lse itself (``_bind``)
            tensors += (out, out)
        if not launch.sem_rows:
            tensors += (cache_seqlens,)
        if plan.lse:
            lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=dev)
            run(*tensors, lse)
            return out, lse
        run(*tensors)
        return out, None
    if plan.lse:
        lse = torch.empty(plan.lse_shape, dtype=torch.float32, device=dev)
    else:
        lse = scratch(launch, "LSE", plan.lse_shape, dev)
    per_call = _bind(
        launch, q, k_cache, v_cache, cache_seqlens, out, lse, k_new, v_new, block_table, cache_batch_idx,
        None, cache_leftpad, check_flag,
    )  # fmt: skip
    launch_cached(_decode_split_kernel, launch.grid, launch.static, per_call, launch.compiled)
    if plan.combine:
        combine_partials(per_call["OP"], per_call["LSEP"], out, lse)
    return out, lse if plan.lse else None


# The arguments that an eager call of a plan binds anew, in ``run_plan``'s order; the others (the
# stream's partials, its counters and untaken LSE, the error flag) stay the same for every call of
# the plan on a stream. With one split, the partials' places take ``out`` and the counters' the
# lengths, as ``_bind`` binds them.
_CHANGING = ("Q", "K", "V", "KN", "VN", "O", "SEQLENS", "BT", "CBI", "LEFTPAD")


def _stream_launch(plan: DecodePlan, q, k_cache, v_cache, cache_seqlens, check_flag, stream: int):
    """``plan``'s :class:`StreamLaunch` for eager calls on ``stream``, made and kept."""
    launch = plan.launch
    dev = q.device
    lse = None if plan.lse else scratch(launch, "LSE", plan.lse_shape, dev)
    per_call = _bind(
        launch, q, k_cache, v_cache, cache_seqlens, q, lse, None, None, None, None, None, None, check_flag
    )  # fmt: skip
    names = (
        _CHANGING
        + (("OP", "LSEP") if launch.parts is None else ())
        + (() if launch.sem_rows else ("SEM",))
        + (("LSE",) if plan.lse else ())
    )
    fixed = {name: value for name, value in per_call.items() if name not in names}
    if len(plan.eager) >= SCRATCH_STREAMS:
        plan.eager.clear()  # calls on ever new streams start over rather than growing
    run = plan.eager[stream] = StreamLaunch(
        _decode_split_kernel, launch.grid, launch.static, launch.compiled, fixed, names, stream
    )
    return run
