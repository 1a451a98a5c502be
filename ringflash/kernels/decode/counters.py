"""Counters of the decode kernel's fused merge: one int32 per (batch row, KV head, m-block).

Each split program adds 1 to its row's counter when its partial is written; the program that
brings it to ``n_splits`` merges the row and puts the counter back to 0. So a buffer must be zero
when a call starts, and two calls that may run at once must never share one.

- Eager calls get one buffer per CUDA stream: calls on a stream run in order, calls on different
  streams may overlap.
- A call captured in a CUDA graph gets counters of its own that no other call or graph ever gets,
  because the graph may be replayed at any later time, on any stream. They are a slice of an
  *arena*: zeroed memory allocated by an eager call (outside every graph's memory pool) and handed
  out in slices that are never handed out again. An eager call makes sure the arena has room for
  ``CounterArenaConfig.headroom_calls`` captured calls of its size (the warm-up calls before a
  capture do this).
- A capture that finds no arena room (no eager call came first, or the device's arenas reached
  ``CounterArenaConfig.max_counters``) zeroes a buffer of its own in the graph's memory instead.
  That puts a memset node before the kernel in the graph, which the arena avoids
  (``docs/performance.md``).
"""

from __future__ import annotations

import threading

import torch

from ..device import cuda_index
from ..launch import current_raw_stream
from ..launch_args import next_pow2
from ..options import CounterArenaConfig

__all__ = ["CounterArena", "CounterArenas", "default_arenas", "semaphore_buffer"]

_SEM_MIN_ROWS = 4096
_SEM_STREAMS = 64  # eager streams' counter buffers kept at most


class CounterArena:
    """Zeroed int32 counters, handed out in slices; a slice is never handed out twice."""

    def __init__(self, device: torch.device, size: int):
        self.buf = torch.zeros(size, dtype=torch.int32, device=device)
        self.used = 0

    @property
    def free(self) -> int:
        return self.buf.numel() - self.used

    def take(self, rows: int) -> torch.Tensor | None:
        """The next ``rows`` counters, or None when fewer are left."""
        if rows > self.free:
            return None
        piece = self.buf[self.used : self.used + rows]
        self.used += rows
        return piece


def _key(device: torch.device) -> tuple[str, int | None]:
    return device.type, (cuda_index(device) if device.type == "cuda" else device.index)


class CounterArenas:
    """Every device's arenas (newest last), sized by a :class:`CounterArenaConfig`.

    ``decode_fwd`` uses the one of :func:`default_arenas`; tests make their own.
    """

    def __init__(self, config: CounterArenaConfig | None = None):
        self.config = config or CounterArenaConfig()
        self._arenas: dict[tuple[str, int | None], list[CounterArena]] = {}
        self._lock = threading.Lock()

    def of(self, device: torch.device) -> list[CounterArena]:
        """The arenas of ``device``, oldest first (empty before the first reservation)."""
        return list(self._arenas.get(_key(device), ()))

    def clear(self) -> None:
        """Forget every arena, as if no eager call had come yet (graphs keep the slices they hold)."""
        with self._lock:
            self._arenas = {}

    def reserve(self, device: torch.device, rows: int) -> None:
        """Make sure ``device``'s newest arena can serve ``headroom_calls`` captured calls of
        ``rows`` counters: allocate a new arena (earlier ones stay alive: graphs may hold their
        slices) unless the device's arenas already reach ``max_counters``. Eager calls only."""
        cfg = self.config
        need = cfg.headroom_calls * rows
        arenas = self._arenas.get(_key(device))
        if arenas and arenas[-1].free >= need:
            return
        with self._lock:
            arenas = self._arenas.setdefault(_key(device), [])
            if arenas and arenas[-1].free >= need:
                return
            held = sum(a.buf.numel() for a in arenas)
            size = max(cfg.min_counters, next_pow2(need), 2 * arenas[-1].buf.numel() if arenas else 0)
            if held + size > cfg.max_counters:
                return
            arena = CounterArena(device, size)
            if device.type == "cuda":
                # A graph captured later may be replayed on another stream: the zeros must be in
                # memory before any replay can start. Once per arena.
                torch.cuda.current_stream(device).synchronize()
            arenas.append(arena)

    def take(self, device: torch.device, rows: int) -> torch.Tensor | None:
        """``rows`` zeroed counters of ``device``'s newest arena that no other call gets, or None
        if it has no room."""
        arenas = self._arenas.get(_key(device))
        if not arenas:
            return None
        with self._lock:
            return arenas[-1].take(rows)


_default = CounterArenas()
_semaphores: dict[tuple[str, int | None, int], torch.Tensor] = {}  # (device, stream): eager calls


def default_arenas() -> CounterArenas:
    """The arenas that :func:`semaphore_buffer` (so every ``decode_fwd`` call) draws from."""
    return _default


def semaphore_buffer(device: torch.device, rows: int) -> torch.Tensor:
    """A zeroed int32 counter buffer of at least ``rows`` entries for a call on ``device`` made now:
    this stream's buffer for an eager call; for a call being captured in a CUDA graph, a slice of
    the arena or, with no room there, a buffer zeroed by the graph itself."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            piece = _default.take(device, rows)
            return piece if piece is not None else torch.zeros(rows, dtype=torch.int32, device=device)
        _default.reserve(device, rows)
    stream = current_raw_stream(cuda_index(device)) if device.type == "cuda" else 0
    key = (*_key(device), stream)
    buf = _semaphores.get(key)
    if buf is None or buf.numel() < rows:
        if buf is None and len(_semaphores) >= _SEM_STREAMS:
            _semaphores.clear()  # calls on ever new streams start over rather than growing
        # A replaced buffer goes back to the allocator only after the work queued on this stream.
        buf = torch.zeros(max(_SEM_MIN_ROWS, next_pow2(rows)), dtype=torch.int32, device=device)
        _semaphores[key] = buf
    return buf
