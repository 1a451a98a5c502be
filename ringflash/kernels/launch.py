"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](**args)`` binds every argument, computes the specialization key (dtypes, 16-byte
alignment of pointers, integers equal to 1 or divisible by 16), looks the compiled kernel up and
launches it: tens of microseconds of host time for a kernel with ~60 arguments, more than a short
decoding step takes on the GPU. A caller that already keys its launches by every shape, stride,
dtype and option (``decode._LAUNCHES``) knows all of that except the pointers' alignment: it keeps
the compiled kernel per alignment pattern in ``slot`` and launches it directly through its
launcher, with the same arguments in the same order and the same launch hooks. Under the
interpreter (no compiled kernel) every call takes Triton's own path.
"""

from __future__ import annotations

import functools

import torch
from triton.runtime import driver

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: no direct launches
    _knobs = None


class SignatureTable(dict):
    """Launch arguments by call signature (every shape, stride, dtype and option a launch derives
    from). A model's layers repeat a few signatures, so the derivation runs once per signature;
    bounded: a workload of many shapes starts over rather than growing."""

    def __init__(self, limit: int = 512):
        super().__init__()
        self.limit = limit

    def keep(self, key, value):
        """Store ``value`` under ``key`` (emptying a full table first); returns ``value``."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


@functools.cache
def _params(fn) -> tuple[tuple[str, object], ...]:
    """``(name, default)`` of every parameter of the ``@triton.jit`` function ``fn``, in order."""
    return tuple((p.name, p.default) for p in fn.params)


def launch_cached(fn, grid: tuple[int, ...], args: dict, slot: dict) -> None:
    """``fn[grid](**args)``, through the compiled kernel kept in ``slot`` when there is one.

    ``slot`` must belong to one specialization of every non-tensor argument (the caller's cache
    entry); its keys here are the alignment patterns of the tensor arguments.
    """
    align = tuple(v.data_ptr() % 16 == 0 for v in args.values() if isinstance(v, torch.Tensor))
    compiled = slot.get(align)
    if compiled is None or _knobs is None:
        kernel = fn[grid](**args)
        if getattr(kernel, "function", None) is not None and hasattr(kernel, "launch_metadata"):
            slot[align] = kernel  # a real compiled kernel (None under the interpreter)
        return
    ordered = [args.get(name, default) for name, default in _params(fn)]
    g0, g1, g2 = (*grid, 1, 1)[:3]
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    # The launch hooks and their metadata as Triton passes them (profilers read them).
    meta = compiled.launch_metadata(grid, stream, *ordered)
    rt = _knobs.runtime
    compiled.run(
        g0, g1, g2, stream, compiled.function, compiled.packed_metadata, meta,
        rt.launch_enter_hook, rt.launch_exit_hook, *ordered,
    )  # fmt: skip


__all__ = ["SignatureTable", "launch_cached"]
