"""Options of the ring, set for a block of calls: how K/V travel, and how many blocks the forward
holds at once. Every rank of a ring must choose the same values (the ranks agree on them before
any data moves, ``ringflash.comm.agree``)."""

from __future__ import annotations

import contextlib

from ..backends import pushed

RING_TRANSPORTS = ("nccl", "copy_engine")
DEFAULT_RING_PREFETCH = 2
# Plain lists (innermost choice last), as ``ringflash.backends``: torch.compile can read them.
_transport_forced: list[str] = []
_prefetch_forced: list[int] = []


@contextlib.contextmanager
def use_ring_transport(name: str):
    """Choose how ring attention inside the block moves K/V between the GPUs of one node.

    ``"nccl"`` (the default): send/receive through the process group (NCCL or gloo). Its kernels
    need SMs, so a transfer posted during a ring step's attention kernel waits for that kernel's
    thread blocks to be issued. ``"copy_engine"``: a peer-to-peer DMA copy into the next GPU's
    memory (PyTorch symmetric memory; every rank of the group on one node, CUDA tensors), which
    runs alongside the attention kernel (``ringflash/comm/copy_engine.py``, docs/ring.md). Every
    rank of the group must choose the same transport. The copy engines' receive buffers (three per
    K/V shape, and per float32 dK/dV shape) stay allocated for the life of the process; the
    results are bitwise those of ``"nccl"``.

    Example:
        >>> with ringflash.use_ring_transport("copy_engine"):
        ...     out = ringflash.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=group)
    """
    if name not in RING_TRANSPORTS:
        raise ValueError(f"unknown ring transport {name!r}: expected one of {RING_TRANSPORTS}")
    with pushed(_transport_forced, name):
        yield


def ring_transport() -> str:
    """The ``use_ring_transport`` choice in force now (``"nccl"`` outside any block)."""
    return _transport_forced[-1] if _transport_forced else "nccl"


@contextlib.contextmanager
def use_ring_prefetch(blocks: int):
    """Choose how many K/V blocks the forward of ring attention inside the block holds at once.

    After its own block, each rank holds the K/V of ``blocks`` ring steps and computes them
    together: unmasked pieces over the same query rows become one attention call over their keys
    laid end to end (fewer, longer kernel launches and fewer passes over the float32 output
    state), while the next ``blocks`` blocks travel, each sent ``blocks`` ranks ahead. ``1`` is
    the plain ring (one block per step); the default is 2 (docs/performance.md). Memory: during
    the forward a rank keeps up to ``3 * blocks`` K/V shards (held, arriving, and keys laid end to
    end for a fused call) where the plain ring keeps two. The backward and the results (up to
    float32 rounding order) do not change. Every rank of the group must choose the same value;
    under ``use_ring_transport("copy_engine")``, whose copies go one rank ahead, the forward holds one.

    Example:
        >>> with ringflash.use_ring_prefetch(1):
        ...     out = ringflash.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=group)
    """
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"use_ring_prefetch expects a whole number of K/V blocks >= 1, got {blocks!r}")
    with pushed(_prefetch_forced, blocks):
        yield


def ring_prefetch() -> int:
    """The ``use_ring_prefetch`` choice in force now (``DEFAULT_RING_PREFETCH`` outside any block)."""
    return _prefetch_forced[-1] if _prefetch_forced else DEFAULT_RING_PREFETCH


def forward_prefetch(transport: str) -> int:
    """K/V blocks the ring's forward holds at once: ``use_ring_prefetch``'s choice, or 1 under the
    copy-engine transport (its receive slots are passed on one rank ahead, and only by copy
    engine, so a held block cannot also travel further ahead)."""
    return 1 if transport == "copy_engine" else ring_prefetch()
