"""Launching a compiled Triton kernel again without Triton's per-call argument binding.

``kernel[grid](**args)`` binds every argument, computes the specialization key (dtypes, 16-byte
alignment of pointers, integers equal to 1 or divisible by 16), runs the ``@triton.heuristics``
and ``@triton.autotune`` wrappers (each copies the arguments), looks the compiled kernel up and
launches it: tens of microseconds of host time for a kernel with ~60 arguments, more than a short
decoding step takes on the GPU. A caller that already keys its launches by every shape, stride,
dtype and option (``decode._LAUNCHES``, ``fwd._FWD_LAUNCHES``) knows all of that except the
values it binds per call (tensors, whose alignment matters, and a few flags): it passes those
apart from the rest, and :func:`launch_cached` launches Triton's first compiled kernel for them
directly through its launcher, with the same arguments in the same order, the configuration the
autotuner chose, and the same launch hooks. Under the interpreter (no compiled kernel) every call
takes Triton's own path.
"""

from __future__ import annotations

import functools
import math

import torch
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction

from .tables import SignatureTable

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: no direct launches
    _knobs = None


@functools.cache
def _params(fn: JITFunction) -> tuple[tuple[str, object], ...]:
    """``(name, default)`` of every parameter of the ``@triton.jit`` function ``fn``, in order."""
    return tuple((p.name, p.default) for p in fn.params)


def _resolve(fn, args: dict) -> tuple[JITFunction, dict] | None:
    """The ``@triton.jit`` function inside ``fn`` and every argument its last launch through
    ``fn`` received: ``args`` plus the heuristics' values and the autotuner's chosen
    configuration. None if a configuration has a pre-launch hook (it must run every time)."""
    meta = dict(args)
    while not isinstance(fn, JITFunction):
        if isinstance(fn, Heuristics):
            for name, rule in fn.values.items():
                meta[name] = rule(meta)
        elif isinstance(fn, Autotuner):
            config = fn.best_config
            if config.pre_hook is not None:
                return None
            meta.update(config.all_kwargs())
        else:
            return None
        fn = fn.fn
    return fn, meta


class _Bound:
    """One compiled kernel with its grid and its ordered arguments, per-call slots left open."""

    __slots__ = ("kernel", "grid", "template", "open")

    def __init__(self, kernel, jit_fn: JITFunction, meta: dict, grid, per_call: dict):
        self.kernel = kernel
        g = grid(meta) if callable(grid) else grid
        self.grid = (*g, 1, 1)[:3]
        params = _params(jit_fn)
        # The per-call places stay empty: holding the first call's tensors here would keep them
        # (a long sequence's q, k, v, out and gradients) alive for as long as the table lives.
        self.template = [None if name in per_call else meta.get(name, default) for name, default in params]
        self.open = tuple((i, name) for i, (name, _) in enumerate(params) if name in per_call)


def _key(per_call: dict, n_values: int = 0) -> tuple:
    """What a compiled kernel depends on among the per-call values: the 16-byte alignment of the
    tensors (None is its own case), the other values themselves, and of the last ``n_values``
    (unspecialized integers) only whether they need 64 bits."""
    vals = list(per_call.values())
    cut = len(vals) - n_values
    key = [v.data_ptr() % 16 == 0 if isinstance(v, torch.Tensor) else v for v in vals[:cut]]
    return (*key, *(not -(2**31) <= v < 2**31 for v in vals[cut:]))


try:  # what torch.cuda.current_stream(i).cuda_stream reads, without building a Stream object
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # a torch without CUDA
    _raw_stream = None


def current_raw_stream(index: int) -> int:
    """The handle of CUDA device ``index``'s current stream (as Triton's launches pass it)."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def stream_scratch(store: dict, name: str, shape: tuple, dev: torch.device) -> torch.Tensor:
    """A float32 buffer ``shape`` kept in ``store`` (one launch's dict, or one that calls of many
    shapes share) for the eager calls of the current CUDA stream, ``name`` telling a call's
    buffers apart: for what a call writes and only the same launch reads (a split decoding step's
    partials) or nothing reads (an LSE the caller does not take). A shared store keeps one buffer
    per stream, the largest asked for, and hands out views of it.

    Launches on one stream run in order, so the previous call's launch is done with the buffer
    before this one writes, and a short call allocates only its results (each allocation is host
    time, which a call of a few microseconds on the GPU pays in full). A call being captured in a
    CUDA graph gets a buffer of its own in the graph's memory (a replay may run at any time, on
    any stream), and so does a CPU call (calls from several threads may run at once)."""
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.empty(shape, dtype=torch.float32, device=dev)
    key = (name, dev.index, current_raw_stream(dev.index))
    buf = store.get(key)
    if buf is not None and buf.shape == shape:
        return buf
    n = math.prod(shape)
    if buf is not None and buf.numel() >= n:
        return buf.view(-1)[:n].view(shape)
    if buf is None and len(store) >= SCRATCH_STREAMS:
        # Calls on ever new streams start over rather than growing. A dropped buffer goes back to
        # the allocator for its own stream, after the work queued there, as any temporary.
        store.clear()
    buf = store[key] = torch.empty(shape, dtype=torch.float32, device=dev)
    return buf


SCRATCH_STREAMS = 24  # buffers that one ``stream_scratch`` store keeps, over its names and streams


def _stream():
    """The current CUDA device's current raw stream (what Triton's own launch passes)."""
    return current_raw_stream(torch.cuda.current_device())


def launch_cached(
    fn, grid, static: dict, per_call: dict, slot: dict | None, values: dict | None = None
) -> None:
    """``fn[grid](**static, **per_call, **values)``, through the compiled kernel kept in ``slot``
    when there is one.

    Args:
        fn: a ``@triton.jit`` function, or one wrapped by ``@triton.heuristics`` and
            ``@triton.autotune``.
        grid: a tuple, or a function of the launch's arguments (the autotuner's choice included).
        static: the arguments fixed for ``slot``: the same every call that passes ``slot``.
        per_call: the arguments bound anew on every call (tensors and a few flags), in the same
            order every call.
        values: integers bound anew on every call that the kernel does not specialize on
            (``do_not_specialize``): keyed only by whether they fit in 32 bits, in the same order
            every call.
        slot: the caller's dict for one specialization of every ``static`` argument (its
            signature table entry); kept here: the compiled kernels by ``per_call`` key. None: a
            call with no signature, launched by Triton every time.
    """
    if values:
        per_call = {**per_call, **values}
    if slot is None:
        fn[grid](**static, **per_call)
        return
    key = _key(per_call, len(values) if values else 0)
    bound = slot.get(key)
    if bound is None or _knobs is None:
        kernel = fn[grid](**static, **per_call)
        if getattr(kernel, "function", None) is not None and hasattr(kernel, "launch_metadata"):
            resolved = _resolve(fn, {**static, **per_call})
            if resolved is not None:  # a real compiled kernel (None under the interpreter)
                slot[key] = _Bound(kernel, resolved[0], resolved[1], grid, per_call)
        return
    ordered = list(bound.template)
    for i, name in bound.open:
        ordered[i] = per_call[name]
    _run(bound, ordered, _stream())


class StreamLaunch:
    """Eager launches of one ``launch_cached`` slot on one CUDA stream, where part of the per-call
    arguments is the same on every call (``fixed``: the stream's scratch buffers, an error flag)
    and the rest (``names``) changes: the fixed part is bound once, and a call passes only the
    changing values, in ``names``' order.

    The compiled kernel, grid and ordered arguments are kept per alignment of the changing values
    (what the kernel specializes on), so a repeated call finds the stream, its scratch and its
    launch in one lookup. Held by a plan per stream: never used inside a graph capture (a capture
    gets buffers of its own). Without direct launches (interpreter, older Triton) every call goes
    through ``launch_cached``.
    """

    __slots__ = ("fn", "grid", "static", "slot", "fixed", "names", "stream", "by_key")

    def __init__(self, fn, grid, static: dict, slot: dict, fixed: dict, names: tuple, stream: int):
        self.fn, self.grid, self.static, self.slot = fn, grid, static, slot
        self.fixed, self.names, self.stream = fixed, names, stream
        self.by_key: dict = {}

    def __call__(self, *changing) -> None:
        key = tuple([v.data_ptr() % 16 == 0 if isinstance(v, torch.Tensor) else v for v in changing])
        hit = self.by_key.get(key)
        if hit is None:
            per_call = dict(zip(self.names, changing, strict=True))
            per_call.update(self.fixed)
            launch_cached(self.fn, self.grid, self.static, per_call, self.slot)
            bound = self.slot.get(_key(per_call))
            if bound is not None and _knobs is not None:
                ordered = list(bound.template)
                where = {name: i for i, name in bound.open}
                for name, value in self.fixed.items():
                    ordered[where[name]] = value
                self.by_key[key] = (bound, ordered, tuple(where[n] for n in self.names))
            return
        bound, template, places = hit
        ordered = template.copy()
        for i, v in zip(places, changing, strict=True):
            ordered[i] = v
        _run(bound, ordered, self.stream)


def _run(bound: _Bound, ordered: list, stream: int) -> None:
    kernel, (g0, g1, g2) = bound.kernel, bound.grid
    rt = _knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    # The launch hooks and their metadata as Triton passes them (profilers read them).
    meta = None if enter is None and leave is None else kernel.launch_metadata(bound.grid, stream, *ordered)
    kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *ordered)


def eager_stream(dev: torch.device) -> int | None:
    """The raw handle of the current stream of CUDA device ``dev`` for an eager call, or None for a
    call being captured in a CUDA graph (or on another device): the key of a plan's
    :class:`StreamLaunch`."""
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return current_raw_stream(dev.index)


__all__ = [
    "SCRATCH_STREAMS",
    "SignatureTable",
    "StreamLaunch",
    "current_raw_stream",
    "eager_stream",
    "launch_cached",
    "stream_scratch",
]
