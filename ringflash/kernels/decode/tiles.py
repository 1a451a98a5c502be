"""The split-KV decoding kernel's shapes, picked on the host from the call's shapes and the GPU:
rows per program, splits per row, keys per tile, the L2 prefetch of a K/V row, and whether a
cacheless call runs faster through the decoding kernel."""

from __future__ import annotations

from ..device import sm_count
from ..launch_args import cdiv, next_pow2
from ..options import DecodeConfig

# Tiles: 16 rows is the smallest tensor-core dot; GPU tiles were measured on Hopper
# (docs/performance.md). The interpreter gets one small shape that crosses block edges.
_GPU_BLOCK_N = 64
_CPU_BLOCK_N = 16
MAX_BLOCK_M = 64  # rows (query tokens x heads of a group) of one program at most
_COMBINE_TILE = 8192  # fused combine: rows x splits x D_PAD floats loaded at once
# Split heuristic: one wave, about one program per SM, at least MIN_KEYS_PER_SPLIT keys of cache
# capacity per split, at most MAX_SPLITS splits (docs/performance.md).
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 256
# A few query rows against a long context (attention without a KV cache, e.g. a generate loop)
# leave most SMs idle with one program per (batch row, query head): the split kernel spreads the
# keys over the SMs and reads K/V once per KV head (see split_kv_pays).
_SPLIT_KV_MIN_KEYS = 1024


def block_m(group: int, seqlen_q: int) -> int:
    """Rows per program: the whole head group times the query tokens, 16..64, a power of two."""
    return min(MAX_BLOCK_M, max(16, next_pow2(group * seqlen_q)))


def split_kv_pays(
    batch: int, seqlen_q: int, nheads_q: int, nheads_k: int, seqlen_k: int, sm_count: int
) -> bool:
    """Whether attention of ``seqlen_q`` query rows over ``seqlen_k`` keys (no cache) is faster
    through ``decode_fwd`` (every key row a full cache) than through ``kernels.fwd.attn_fwd``:
    long contexts where all query rows of a head group fit one program and one program per
    (batch row, query head) would leave SMs idle. Shapes only; the caller checks the rest (16-bit
    or float32 inputs with contiguous last dims, ``Dv == D``, no packed sequences)."""
    group = nheads_q // nheads_k
    return seqlen_k >= _SPLIT_KV_MIN_KEYS and seqlen_q * group <= MAX_BLOCK_M and batch * nheads_q < sm_count


def pick_num_splits(batch: int, n_kv_heads: int, group: int, seqlen_q: int, capacity: int, device) -> int:
    """Splits per (batch row, KV head) from the shapes and the SM count only (no cache lengths).

    ``capacity`` is the most keys a row can hold (cache length, or pages per row * page size).
    """
    m_blocks = cdiv(group * seqlen_q, block_m(group, seqlen_q))
    programs = batch * n_kv_heads * m_blocks
    want = sm_count(device) // max(programs, 1)
    cap = max(1, cdiv(max(capacity, 1), MIN_KEYS_PER_SPLIT))
    return int(max(1, min(want, cap, MAX_SPLITS)))


def pick_block_n(
    programs: int,
    keys_per_split: int,
    row_bytes: int,
    sm_count: int,
    gbps_per_sm: float,
    config: DecodeConfig | None = None,
) -> int:
    """Keys per K/V tile on a GPU: ``config.wide_block_n`` (twice the bytes in flight per program)
    where one wave of ``programs`` fits the ``sm_count`` SMs, memory is fast per SM (``gbps_per_sm``
    at least ``config.wide_min_gbps_per_sm``; measured faster there, mixed on slower memory) and
    each split has at least ``config.wide_min_keys`` keys of capacity; else 64."""
    config = config or DecodeConfig()
    wide = (
        programs <= sm_count
        and keys_per_split >= config.wide_min_keys
        and row_bytes <= 256  # a 128-key K tile <= 32 KiB: three stages of K and V fit
        and gbps_per_sm >= config.wide_min_gbps_per_sm
    )
    return config.wide_block_n if wide else _GPU_BLOCK_N


def prefetch_lines(head_dim: int, elem_size: int) -> tuple[int, int]:
    """``(lines, step)`` of the split kernel's L2 prefetch of a K/V row: the row's 128-byte lines
    rounded up to a power of two (an arange's length; the kernel clamps the extra lines onto the
    last), and the elements per line."""
    return next_pow2(cdiv(head_dim * elem_size, 128)), 128 // elem_size
