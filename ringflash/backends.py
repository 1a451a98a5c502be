"""Backend choice for the local attention ops.

A backend is a module with ``attn_fwd``, ``attn_bwd`` and ``attn_bwd_delta`` (the interface
documented in ``ringflash.blockwise``): ``"triton"`` (``ringflash.kernels``) or ``"torch"``
(``ringflash.blockwise``). By default CUDA tensors use Triton when it is importable and everything
else uses the blockwise PyTorch backend; ``use_backend`` overrides the choice within a block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from types import ModuleType, SimpleNamespace

import torch

from .kernels.options import TMA_MODES, tma_mode, use_tma  # noqa: F401 (re-exported)

BACKENDS = ("triton", "torch")
# A plain list (innermost choice last) rather than a ContextVar: torch.compile can read and guard
# on a module-level list, not on ContextVar.get.
_forced: list[str] = []


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def _pushed(stack: list, value):
    """``value`` on top of ``stack`` inside the block (the choices of the ``use_*`` context managers
    nest: the innermost block wins)."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ringflash attention calls inside the block on backend ``"triton"`` or ``"torch"``.

    ``"triton"`` on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1`` set before
    Triton is imported).

    Example:
        >>> with ringflash.use_backend("torch"):
        ...     out = ringflash.flash_attn_func(q, k, v, causal=True)
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise ValueError("backend 'triton' asked for, but the triton package is not installed")
    with _pushed(_forced, name):
        yield


RING_TRANSPORTS = ("nccl", "copy_engine")
_transport_forced: list[str] = []


@contextlib.contextmanager
def use_ring_transport(name: str):
    """Choose how ring attention inside the block moves K/V between the GPUs of one node.

    ``"nccl"`` (the default): send/receive through the process group (NCCL or gloo). Its kernels
    need SMs, so a transfer posted during a ring step's attention kernel waits for that kernel's
    thread blocks to be issued. ``"copy_engine"``: a peer-to-peer DMA copy into the next GPU's
    memory (PyTorch symmetric memory; every rank of the group on one node, CUDA tensors), which
    runs alongside the attention kernel (see ``ringflash/comm/copy_engine.py`` and
    benchmarks/RESULTS.md). Every rank of the group must choose the same transport. The copy
    engines' receive buffers (three per K/V shape, and per float32 dK/dV shape) stay allocated for
    the life of the process; the results are bitwise those of ``"nccl"``.

    Example:
        >>> with ringflash.use_ring_transport("copy_engine"):
        ...     out = ringflash.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=group)
    """
    if name not in RING_TRANSPORTS:
        raise ValueError(f"unknown ring transport {name!r}: expected one of {RING_TRANSPORTS}")
    with _pushed(_transport_forced, name):
        yield


def ring_transport() -> str:
    """The ``use_ring_transport`` choice in force now (``"nccl"`` outside any block)."""
    return _transport_forced[-1] if _transport_forced else "nccl"


DEFAULT_RING_PREFETCH = 2
_prefetch_forced: list[int] = []


@contextlib.contextmanager
def use_ring_prefetch(blocks: int):
    """Choose how many K/V blocks the forward of ring attention inside the block holds at once.

    After its own block, each rank holds the K/V of ``blocks`` ring steps and computes them
    together: unmasked pieces over the same query rows become one attention call over their keys
    laid end to end (fewer, longer kernel launches and fewer passes over the float32 output
    state), while the next ``blocks`` blocks travel, each sent ``blocks`` ranks ahead. ``1`` is
    the plain ring (one block per step); the default, 2, made the forward of a simulated
    Llama-3-8B zigzag ring 4-13% faster on an H100 (benchmarks/RESULTS.md). Memory: during the
    forward a rank keeps up to ``3 * blocks`` K/V shards (held, arriving, and keys laid end to
    end for a fused call) where the plain ring keeps two. The backward and the results (up to float32
    rounding order) do not change. Every rank of the group must choose the same value; under
    ``use_ring_transport("copy_engine")``, whose copies go one rank ahead, the forward holds one.

    Example:
        >>> with ringflash.use_ring_prefetch(1):
        ...     out = ringflash.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=group)
    """
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"use_ring_prefetch expects a whole number of K/V blocks >= 1, got {blocks!r}")
    with _pushed(_prefetch_forced, blocks):
        yield


def ring_prefetch() -> int:
    """The ``use_ring_prefetch`` choice in force now (``DEFAULT_RING_PREFETCH`` outside any block)."""
    return _prefetch_forced[-1] if _prefetch_forced else DEFAULT_RING_PREFETCH


def backend_name(device: torch.device) -> str:
    """The backend that a call on ``device`` uses now."""
    if _forced:
        return _forced[-1]
    return "triton" if device.type == "cuda" and triton_available() else "torch"


@functools.cache
def _triton_backend() -> SimpleNamespace:
    """The Triton launchers under the backend interface's names (``ringflash.kernels`` itself
    imports no kernel, so that its options load without Triton)."""
    from .kernels import bwd, fwd

    return SimpleNamespace(attn_fwd=fwd.attn_fwd, attn_bwd=bwd.attn_bwd, attn_bwd_delta=bwd.attn_bwd_delta)


def get_backend(name: str) -> ModuleType | SimpleNamespace:
    """The backend module for ``name``."""
    if name == "triton":
        return _triton_backend()
    if name == "torch":
        from . import blockwise

        return blockwise
    raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")


def backend_for(x: torch.Tensor) -> ModuleType | SimpleNamespace:
    """The backend module that a call on tensor ``x`` uses now."""
    return get_backend(backend_name(x.device))
