"""The CUDA device a launch runs on: its index, multiprocessors and memory bandwidth (cached), the
current device set to a launcher's tensors, and the second streams that work runs on beside the
current stream."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton


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


def ptx_device(device: torch.device) -> bool:
    """Whether kernels on ``device`` are compiled to PTX, so inline PTX may be used: NVIDIA CUDA
    devices, not ROCm's, and not under Triton's interpreter."""
    return device.type == "cuda" and torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1"


# Per (CUDA device index, purpose), a stream made on first use. A purpose has its own stream so that
# work already on one second stream (a rank's calls on its own documents) can still put its dQ on
# another beside its dK/dV.
_SIDE_STREAMS: dict[tuple[int, str], torch.cuda.Stream] = {}


def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream | None:
    """The CUDA device's second stream for ``purpose``, made on first use; None if that would be
    inside a graph capture, where creating a stream is best avoided: the caller then runs its work
    on the current stream alone."""
    key = (cuda_index(device), purpose)
    side = _SIDE_STREAMS.get(key)
    if side is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        side = _SIDE_STREAMS[key] = torch.cuda.Stream(device=key[0])
    return side


@contextlib.contextmanager
def beside(device: torch.device, purpose: str, wanted: bool = True):
    """Yields the context to run work in beside the current stream's: the device's second stream
    for ``purpose`` (``side_stream``), which starts after the work queued so far and which the
    current stream waits for when the block ends, or a no-op (``wanted`` False, a device that is
    not CUDA, or a graph capture before the stream exists). Work queued inside the block outside
    that context stays on the current stream and runs alongside. The waits are on the GPU, not
    the host, so they are capturable in a graph and later work is ordered after both streams."""
    side = side_stream(device, purpose) if wanted and device.type == "cuda" else None
    if side is None:
        yield contextlib.nullcontext()
        return
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    try:
        yield torch.cuda.stream(side)
    finally:
        main.wait_stream(side)


def side_stream_devices(purpose: str) -> list[int]:
    """Indices of the CUDA devices on which a second stream for ``purpose`` has been made."""
    return sorted(index for index, p in _SIDE_STREAMS if p == purpose)


def forget_side_streams() -> None:
    """Drop the second streams, so the next call on a device makes its stream anew (or, inside a
    graph capture, runs on one stream). For tests of the first call of a process."""
    _SIDE_STREAMS.clear()
