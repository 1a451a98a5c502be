"""Pieces shared by the forward and backward kernels: mask bounds, block ranges, launch helpers.

Mask convention (``ringflash.masking``): query ``i`` sees key ``j`` iff ``lo <= j - i <= hi`` with
``lo = diag - window_left`` (only when ``HAS_LO``) and ``hi = diag + window_right`` (``0`` when
causal; only when ``HAS_HI``). For one block of rows the visible columns split into three runs of
column blocks: a masked head (left window edge), a mask-free middle, and a masked tail (diagonal
and the sequence end). Blocks outside the runs are never touched, which is what lets ring
attention skip the blocks that its position offsets mask out.
"""

from __future__ import annotations

import functools
import os

# Literal constants in the kernels: 1.4426950408889634 = log2(e) (scores move to base 2 so the
# exponentials are exp2), 0.6931471805599453 = ln(2) (the stored LSE is a natural log).
import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from ..backends import tma_mode


@triton.jit
def _tanh(x):
    # tanh through exp2 (one MUFU op): exact limits +-1 for large |x| (exp2 -> inf or 0), no NaN,
    # and absolute error ~1 ulp, which is what the softcapped score needs. It is also the one
    # formulation the interpreter and every Triton version share (no libdevice).
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``a @ b + acc`` in float32. ``DOT_F32`` upcasts the operands first: only for bfloat16 under
    the interpreter, whose numpy matmul has no bfloat16 (it returns garbage, seen with 3.9)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _tile_order(n_tiles, sched_width, GROUPED: tl.constexpr, REVERSE: tl.constexpr):
    """``(tile, head)`` of this program in a 1-D grid of ``n_tiles`` row tiles x heads.

    Without ``GROUPED``: head-major (every tile of head 0, then of head 1, ...; ``REVERSE`` runs a
    head's tiles last to first). Under a causal mask tiles differ in work (up to 2x the mean), and
    in head-major order the longest tiles of the last heads start near the end of the launch and
    run alone: at 8k tokens and 32 heads about a tenth of the time. ``GROUPED`` takes heads in
    groups of ``ceil(sched_width / n_tiles)`` (``sched_width``: four per SM) and, inside a group,
    goes tile by tile across its heads, longest first, so each group's longest tiles start first
    and its shorter tiles fill in behind them; a group still spans few heads, so the programs
    running at once share K/V (or Q/dO) through L2 as head-major order does.
    """
    pid = tl.program_id(0)
    n_heads = tl.num_programs(0) // n_tiles
    group = 1
    if GROUPED:
        # Only launches of up to 6 * sched_width programs (24 per SM): in larger ones the last
        # heads' tiles are a small part of the work, and head-major order keeps the most programs
        # on one head's K/V (measured: 8k tokens at batch 8, 16k programs, ran 9% slower grouped).
        span = tl.minimum(n_heads, tl.cdiv(sched_width, n_tiles))
        group = tl.where(tl.num_programs(0) <= 6 * sched_width, span, 1)
    per_group = group * n_tiles
    g = pid // per_group
    r = pid - g * per_group
    width = tl.minimum(group, n_heads - g * group)  # heads in this group (the last may be short)
    rank = r // width
    head = g * group + (r - rank * width)
    tile = rank
    if REVERSE:
        tile = n_tiles - 1 - rank
    return tile, head


SCHED_PER_SM = 4  # 0 gives plain head-major order everywhere (benchmarks compare the two)


def sched_width(device: torch.device) -> int:
    """The ``sched_width`` of ``_tile_order``: ``SCHED_PER_SM`` programs per SM of ``device``."""
    return max(1, SCHED_PER_SM * sm_count(device))


@triton.jit
def _block_ranges(
    r0,
    n_cols,
    lo,
    hi,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Column-block runs for rows ``[r0, r0 + BLOCK_R)`` where row r sees column c iff
    ``lo <= c - r <= hi`` and ``c < n_cols``.

    Returns ``(start, full_start, full_end, end)``: blocks from ``start`` to ``full_start`` and
    from ``full_end`` to ``end`` need the mask, blocks in ``[full_start, full_end)`` are entirely
    visible. ``start``, ``full_start`` and ``full_end`` are multiples of ``BLOCK_C``.
    """
    start = 0
    full_start = 0
    end = n_cols
    full_end = n_cols // BLOCK_C * BLOCK_C
    if HAS_LO:
        # Clamp before dividing: integer division of negatives is not floor division.
        start = tl.maximum(r0 + lo, 0) // BLOCK_C * BLOCK_C
        full_start = tl.cdiv(tl.maximum(r0 + BLOCK_R - 1 + lo, 0), BLOCK_C) * BLOCK_C
    if HAS_HI:
        end = tl.minimum(r0 + BLOCK_R + hi, n_cols)
        full_end = tl.maximum(tl.minimum(r0 + hi + 1, n_cols), 0) // BLOCK_C * BLOCK_C
    end = tl.maximum(end, start)
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    full_end = tl.minimum(tl.maximum(full_end, full_start), end)
    return start, full_start, full_end, end


@triton.jit
def _visible(offs_r, offs_c, n_rows, n_cols, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Boolean ``[R, C]`` tile: in bounds and inside the diagonal band."""
    mask = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    if HAS_HI:
        mask = mask & (offs_c[None, :] - offs_r[:, None] <= hi)
    if HAS_LO:
        mask = mask & (offs_c[None, :] - offs_r[:, None] >= lo)
    return mask


def mask_flags(causal: bool, window_size) -> tuple[bool, bool, int, int]:
    """``(HAS_LO, HAS_HI, window_left, window_right)`` for the kernels (right is 0 when causal)."""
    left, right = int(window_size[0]), int(window_size[1])
    has_hi = bool(causal) or right >= 0
    return left >= 0, has_hi, max(left, 0), 0 if causal else max(right, 0)


def cdiv(a: int, b: int) -> int:
    """Host-side ceiling division (``triton.cdiv`` is a constexpr function, slower on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side smallest power of two >= ``n``, as ``triton.next_power_of_2`` (0 for 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def pad_dim(d: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest dot) with masked loads."""
    return max(16, next_pow2(d))


def seq_bucket(s: int) -> int:
    """Autotune key for a sequence length: a power of two, so varlen batches reuse tuned configs."""
    return min(next_pow2(max(int(s), 1)), 16384)


def shape_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Autotune key of a call's shape: both lengths' buckets in one integer, so a ring step of 8k
    queries x 4k keys and one of 4k x 8k are tuned apart (their best tiles differ)."""
    return seq_bucket(seqlen_q) * 2**15 + seq_bucket(seqlen_k)


def dot_precision(dtype) -> str:
    """float32 inputs use 3xTF32 (about float32 accuracy at tensor-core speed); 16-bit ignore it."""
    import torch

    return "tf32x3" if dtype == torch.float32 else "tf32"


def dot_f32(t) -> bool:
    """The interpreter path for bfloat16 needs float32 dot operands (see ``_dot``)."""
    import torch

    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def varlen_diag(diag_offset, n_seq: int, device):
    """Per-sequence diagonal offsets for packed inputs as an int32 tensor, or None (bottom-right)."""
    import torch

    if diag_offset is None:
        return None
    d = torch.as_tensor(diag_offset, dtype=torch.int32, device=device).reshape(-1)
    if d.numel() == 1 and n_seq != 1:
        d = d.expand(n_seq).contiguous()
    assert d.numel() == n_seq, "diag_offset needs one value per packed sequence"
    return d


@triton.jit
def _rows_desc(base, n_rows, stride, COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """TMA descriptor of ``n_rows`` rows of ``COLS`` elements at ``base`` (row stride ``stride``,
    last dim contiguous), read in ``[BLOCK_R, BLOCK_C]`` tiles: rows past ``n_rows`` and columns
    past ``COLS`` read as 0, so tails need no masks. An empty sequence gets a one-row shape (a
    descriptor must be nonempty); no tile of it is read then."""
    return tl.make_tensor_descriptor(
        base, shape=[tl.maximum(n_rows, 1), COLS], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_C]
    )


@triton.jit
def _tile_src(
    seq,
    n_rows,
    stride_r,
    stride_c,
    offs_r,
    offs_c,
    COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TMA: tl.constexpr,
):
    """Where a kernel streams ``[BLOCK_R, BLOCK_C]`` tiles of the ``n_rows`` rows at ``seq`` from:
    with ``TMA`` their descriptor (``_rows_desc``), else the pointer tile of the first block (rows
    ``offs_r``, columns ``offs_c``), which the caller offsets and masks."""
    if TMA:
        return _rows_desc(seq, n_rows, stride_r, COLS, BLOCK_R, BLOCK_C)
    else:
        return seq + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def _scores(a, b, sm_scale, softcap, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """Scores in log2 units and the tanh of the softcap (``t``; 0 when there is none)."""
    s = _dot(a, tl.trans(b), None, DOT_PREC, DOT_F32)
    if SOFTCAP:
        t = _tanh(s * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = 0.0
        s = s * (sm_scale * 1.4426950408889634)
    return s, t


def wide_offsets(*tensors) -> bool:
    """True when an element offset inside some tensor can pass 2^31 - 1 (int32 index arithmetic
    would wrap): the kernels then step through tokens in 64 bits."""
    for t in tensors:  # plain loops: this runs on every launch, and generators cost host time
        last = 0
        for n, st in zip(t.shape, t.stride(), strict=True):
            last += (n - 1) * st
        if last >= 2**31 - 1:
            return True
    return False


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device; the current device for a bare ``"cuda"``."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device (cached); 8 for other devices (the interpreter)."""
    if device.type != "cuda":
        return 8
    return _sm_count(cuda_index(device))


@functools.cache
def _bandwidth_per_sm(index: int) -> float:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        peak = 2 * props["mem_clock_rate"] * 1e3 * props["mem_bus_width"] / 8  # double data rate
    except Exception:  # a driver without these properties: the default tiles
        return 0.0
    return peak / 1e9 / _sm_count(index)


def bandwidth_per_sm(device: torch.device) -> float:
    """Peak memory bandwidth of a CUDA device per multiprocessor, GB/s (cached; from the memory
    clock and bus width): about 25 on an H100 SXM, 37 on an H200. 0 for other devices."""
    if device.type != "cuda":
        return 0.0
    return _bandwidth_per_sm(cuda_index(device))


def on_tensor_device(fn):
    """Run a launcher with the current CUDA device set to its first argument's device.

    Triton launches on the current device's stream, so tensors on another GPU of the process (a
    model split over GPUs, e.g. transformers' ``device_map="auto"``) would otherwise be handed to a
    kernel running on the wrong device. Costs nothing when the device is already current.
    """

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return wrapper


# Tensor-memory-accelerator (TMA) loads: kernels built with ``TMA`` read their streamed tiles
# through device-side tensor descriptors (Hopper's bulk asynchronous copies) instead of pointer
# tiles. ``ringflash.use_tma`` picks the mode: "auto" (the default) uses them on CUDA devices of
# compute capability 9.0 and newer when the longer side of the call has at least
# ``_TMA_MIN_SEQLEN`` tokens; "on" at every length and also under the interpreter (tests); "off"
# never. Each program builds its descriptors once, a fixed cost that short loops do not earn back:
# on an H100 at head dim 128, TMA made the forward 6-10% slower at 1k tokens and 2-10% faster at
# 16k, the backward 8% faster at 16k and even at 1k-4k (benchmarks/RESULTS.md).
_TMA_MIN_SEQLEN = 8192


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_device(device: torch.device, mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off" or device.type != "cuda" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    return _capability(cuda_index(device)) >= (9, 0)


def ptx_device(device: torch.device) -> bool:
    """Whether kernels on ``device`` are compiled to PTX, so inline PTX may be used: NVIDIA CUDA
    devices, not ROCm's, and not under Triton's interpreter."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (a kernel launched while the one before it finishes, waiting
    in ``griddepcontrol.wait`` before its first read): CUDA devices of compute capability 9.0 and
    newer, with a Triton that has ``tl.extra.cuda.gdc_wait``."""
    if device.type != "cuda":
        return False
    return _pdl(cuda_index(device))


@functools.cache
def _pdl(index: int) -> bool:
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return _capability(index) >= (9, 0)


def _tma_aligned(t: torch.Tensor) -> bool:
    # A descriptor's base address and every stride but the last must be multiples of 16 bytes.
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def tma_applies(*tensors: torch.Tensor, seqlen: int) -> bool:
    """Whether a launch on these (fp16/bf16) tensors, whose longer side has ``seqlen`` tokens,
    uses TMA descriptors under the current ``ringflash.use_tma`` mode; sets Triton's scratch
    allocator, which device-side descriptors need, when none is set."""
    mode = tma_mode()
    t0 = tensors[0]
    if t0.dtype not in (torch.float16, torch.bfloat16) or not _tma_device(t0.device, mode):
        return False
    if mode != "on" and seqlen < _TMA_MIN_SEQLEN:
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
