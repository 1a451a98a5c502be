"""Options of the kernel layer: frozen configs passed to the launchers, and the TMA mode.

Everything a benchmark sweeps or a test varies is a field of one of these configs, passed as
``config=`` to a launcher; nothing is a module global to assign. The defaults are the measured
choices (``docs/performance.md``). This module imports only the standard library and torch, so the
options can be read and built where Triton is not installed.

- :class:`AttnConfig`: ``kernels.fwd.attn_fwd`` and ``kernels.bwd.attn_bwd``.
- :class:`DecodeConfig`: ``kernels.decode.decode_fwd``.
- :class:`CounterArenaConfig`: sizes of the decoding kernel's counter arenas
  (``kernels.decode.counters``).
- :func:`use_tma` / :func:`tma_mode`: how the kernels load their streamed tiles on Hopper.
"""

from __future__ import annotations

import contextlib
import dataclasses

__all__ = [
    "TMA_MODES",
    "AttnConfig",
    "CounterArenaConfig",
    "DecodeConfig",
    "tma_mode",
    "use_tma",
]


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Scheduling options of the forward and backward attention kernels.

    Attributes:
        sched_per_sm: programs per SM in one group of heads of the causal tile order
            (``common._tile_order``); 0 gives plain head-major order everywhere.
        concurrent_dq: run the dQ kernel on a second CUDA stream beside the dK/dV kernel (it fills
            the SMs that dK/dV's last wave leaves idle); False runs it after dK/dV on the caller's
            stream. Same bits either way.
        concurrent_dq_max_waves: dK/dV programs of 128 keys per SM up to which dQ runs beside (in
            longer launches the last wave is a small part and the two contend for L2).
        int64_offsets: always build the 64-bit offset code (by default it is built only when an
            element offset of the call passes ``2**31 - 1``); tests force it at small shapes.
    """

    sched_per_sm: int = 4
    concurrent_dq: bool = True
    concurrent_dq_max_waves: int = 8
    int64_offsets: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles and policies of the split-KV decoding kernel (GPU launches; the interpreter runs its
    own small tile unless ``block_n`` is given).

    Attributes:
        block_n: keys per K/V tile; None picks it (:func:`kernels.decode.pick_block_n`).
        num_warps, num_stages: of the split kernel's launch.
        evict: L2 eviction policy of the K/V cache loads (``""``, ``"evict_first"``,
            ``"evict_last"``).
        prefetch_rows: key rows of split 0 asked into L2 before the cache length is read (NVIDIA
            GPUs, contiguous caches; 0: none). Rounded to a power of two of at most the cache's rows.
        fuse_combine: the last split program of each row merges the partials (one launch); False
            launches the combine kernel after the split kernel.
        wide_block_n: the wide tile of :func:`kernels.decode.pick_block_n`.
        wide_min_gbps_per_sm: memory bandwidth per SM (GB/s) from which wide tiles are used.
        wide_min_keys: keys of cache capacity per split from which wide tiles are used.
    """

    block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    evict: str = ""
    prefetch_rows: int = 64
    fuse_combine: bool = True
    wide_block_n: int = 128
    wide_min_gbps_per_sm: float = 30.0
    wide_min_keys: int = 1024


@dataclasses.dataclass(frozen=True)
class CounterArenaConfig:
    """Sizes of the counter arenas that serve decoding calls captured in CUDA graphs.

    Attributes:
        min_counters: int32 counters of the smallest arena (1 MiB by default).
        max_counters: counters over all arenas of one device, past which no new arena is made.
        headroom_calls: captured calls of an eager call's size that the arena keeps room for.
    """

    min_counters: int = 1 << 18
    max_counters: int = 1 << 24
    headroom_calls: int = 64


TMA_MODES = ("auto", "on", "off")
# The innermost use_tma() choice last. A plain list rather than a ContextVar: torch.compile can
# read and guard on a module-level list, not on ContextVar.get.
_tma_forced: list[str] = []


@contextlib.contextmanager
def use_tma(mode: str):
    """Choose how the Triton kernels inside the block load their streamed tiles on Hopper.

    ``"auto"`` (the default): TMA tensor descriptors on GPUs of compute capability 9.0 and newer
    for calls whose longer side has at least 8192 tokens, and for the backward's at head dims
    65-128 from 512 tokens; pointer loads otherwise (measured faster for shorter calls, see
    docs/performance.md). ``"on"``: descriptors at every length (and under
    Triton's interpreter), and in the decoding kernel for a contiguous KV cache (only under
    ``"on"``: 3-16% slower than its pointer loads on an H100). ``"off"``: pointer loads only.

    Example:
        >>> with ringflash.use_tma("off"):
        ...     out = ringflash.flash_attn_func(q, k, v, causal=True)
    """
    if mode not in TMA_MODES:
        raise ValueError(f"unknown TMA mode {mode!r}: expected one of {TMA_MODES}")
    _tma_forced.append(mode)
    try:
        yield
    finally:
        _tma_forced.pop()


def tma_mode() -> str:
    """The ``use_tma`` mode in force now (``"auto"`` outside any block)."""
    return _tma_forced[-1] if _tma_forced else "auto"
