"""TMA loads: whether a launch reads its streamed tiles through device-side tensor descriptors.

Kernels built with ``TMA`` read their streamed tiles through tensor descriptors (Hopper's bulk
asynchronous copies) instead of pointer tiles; the descriptors' bounds zero-fill the tails that
masks cover otherwise. ``use_tma`` (``options.py``) picks the mode: "auto" (the default) uses them
on CUDA devices of compute capability 9.0 and newer when the longer side of the call has at least
``_TMA_MIN_SEQLEN`` tokens, or, for the backward's kernels at head dims 65-128 (whose longer loop
bodies earn the descriptors back sooner), ``_TMA_MIN_SEQLEN_BWD``; "on" at every length and also
under the interpreter (tests); "off" never. Each program builds its descriptors once, a fixed cost that
short loops do not earn back (``docs/performance.md``). Device-side descriptors need a scratch
allocator, set here when none is.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from .device import cuda_index
from .options import tma_mode

_TMA_MIN_SEQLEN = 8192
_TMA_MIN_SEQLEN_BWD = 512


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_device(device: torch.device, mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off" or device.type != "cuda" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return _capability(cuda_index(device)) >= (9, 0)


def _tma_aligned(t: torch.Tensor) -> bool:
    # A descriptor's base address and every stride but the last must be multiples of 16 bytes.
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def min_seqlen(head_dim: int, backward: bool) -> int:
    """The longer side from which ``"auto"`` uses descriptors: ``_TMA_MIN_SEQLEN_BWD`` for the
    backward's kernels at head dims 65-128, ``_TMA_MIN_SEQLEN`` otherwise (at head dim 64 they
    slowed the backward down at 512-4k tokens)."""
    return _TMA_MIN_SEQLEN_BWD if backward and 64 < head_dim <= 128 else _TMA_MIN_SEQLEN


def tma_applies(*tensors: torch.Tensor, seqlen: int, backward: bool = False) -> bool:
    """Whether a launch on these (fp16/bf16) tensors, whose longer side has ``seqlen`` tokens,
    uses TMA descriptors under the current ``ringflash.use_tma`` mode (``backward``: a launch of
    the backward's kernels); sets Triton's scratch allocator, which device-side descriptors need,
    when none is set."""
    mode = tma_mode()
    t0 = tensors[0]
    if t0.dtype not in (torch.float16, torch.bfloat16) or not _tma_device(t0.device, mode):
        return False
    if mode != "on" and seqlen < min_seqlen(t0.shape[-1], backward):
        return False
    if not all(_tma_aligned(t) for t in tensors):
        return False
    if t0.device.type == "cuda":
        _ensure_allocator()
    return True


def _scratch(size: int, alignment: int, stream):
    # Descriptors are written to this per-launch scratch (128 bytes a program); torch's caching
    # allocator serves it on the current device and stream, also inside CUDA-graph capture.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    # Triton keeps its allocator in a context variable: a thread that never set one (autograd's
    # backward thread, a user's worker) starts with the null allocator. A caller's own allocator
    # is left in place.
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
