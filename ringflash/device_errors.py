"""Value checks without a host sync: a sticky error flag per device.

Reading an index tensor's values on the host (``cache_seqlens``, ``block_table``, ...) makes the
host wait for the GPU on every call, so an eager decoding loop pays its Python time on the GPU's
clock. In ``"device"`` mode (``use_value_checks``) the KV-cache calls check them on the device
instead, in one launch (``kernels/decode/check.py``; torch operations on the blockwise backend):
the verdicts are OR-ed into an int32 flag on the device, copied without blocking into pinned host
memory, and read by the host only once that copy has completed. A failed check is raised as a
``ValueError`` by the first later checked call on that device that finds the copy done, or at once
by :func:`check_device_errors`, which waits for it. The faulty call itself still runs, with every
read and write kept inside the cache (the kernels clamp positions, rows and pages): its results
for the bad rows are wrong and the error says so.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

VALUE_CHECK_MODES = ("host", "device", "off")
_MODE = contextvars.ContextVar("ringflash_value_checks", default="host")

# One bit per check; the messages name what a faulty call had.
BITS = {
    "negative_length": 1,
    "too_long": 2,
    "leftpad": 4,
    "page": 8,
    "row": 16,
    "repeated_row": 32,
}
_MESSAGES = {
    1: "a negative cache_seqlens entry",
    2: "cache_seqlens + the new tokens larger than the cache holds",
    4: "a cache_leftpad entry outside [0, cache_seqlens + new tokens]",
    8: "a block_table entry outside the cache's pages",
    16: "a cache_batch_idx entry outside the cache's rows",
    32: "cache_batch_idx repeating a row while appending (the appends collide)",
}


@contextlib.contextmanager
def use_value_checks(mode: str):
    """How calls check the values of their index tensors, inside this context.

    Args:
        mode: ``"host"`` (the default): read them on the host and raise in the faulty call
            itself, naming the values, before anything is written; for CUDA tensors one device
            sync per call.
            ``"device"``: the KV-cache calls check them on the device, no sync; a failure is raised
            by a later call on that device or by :func:`check_device_errors` (module docstring).
            Other calls (``cu_seqlens``) check on the host as in ``"host"``.
            ``"off"``: no value checks (as ``skip_value_checks()``); bad values give wrong results,
            the KV-cache kernels still keep every read and write inside the cache.

    Example:
        >>> with ringflash.use_value_checks("device"):  # an eager decoding loop, no sync per step
        ...     for step in range(n):
        ...         out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)
        >>> ringflash.check_device_errors()
    """
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"unknown value-check mode {mode!r}: expected one of {VALUE_CHECK_MODES}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_mode() -> str:
    """The mode set by the innermost ``use_value_checks`` (``"host"`` outside any)."""
    return _MODE.get()


class _Flag:
    """A device's error bits: on the device, and their latest copy in (pinned) host memory."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.on_device = torch.zeros((), dtype=torch.int32, device=device)
        self.on_host = torch.zeros((), dtype=torch.int32, pin_memory=cuda)
        self.copied = torch.cuda.Event() if cuda else None  # recorded after each copy to the host
        self.pending = False

    def ready(self) -> bool:
        return self.copied is None or self.copied.query()


_FLAGS: dict[str, _Flag] = {}


def _flag(device: torch.device) -> _Flag:
    key = str(device)
    if key not in _FLAGS:
        _FLAGS[key] = _Flag(device)
    return _FLAGS[key]


def error_flag(device: torch.device) -> torch.Tensor:
    """The device's error flag: int32, one element, on the device; checks OR their bits into it
    (then ``publish``)."""
    return _flag(device).on_device


def or_verdicts(flag: torch.Tensor, verdicts: list[tuple[int, torch.Tensor]]) -> None:
    """OR into ``flag`` the bits of the failed checks: ``(bit, bool tensor of one element)`` per
    check, on the flag's device (torch operations; nothing read on the host)."""
    if not verdicts:
        return
    bits = torch.tensor([b for b, _ in verdicts], dtype=torch.int32, device=flag.device)
    failed = torch.stack([v.reshape(()) for _, v in verdicts]).to(torch.int32)
    flag.bitwise_or_((failed * bits).sum(dtype=torch.int32))


def publish(device: torch.device) -> None:
    """Start copying the device's flag to the host (no waiting): checks queued before this are
    reported once the copy has completed."""
    f = _flag(device)
    f.on_host.copy_(f.on_device, non_blocking=True)
    if f.copied is not None:
        f.copied.record()
    f.pending = True


def _report(f: _Flag, device) -> None:
    """Raise the flag's bits as last copied to the host, if any, cleared on both sides first."""
    bits = int(f.on_host)
    f.pending = False
    if bits:
        f.on_device.zero_()
        f.on_host.zero_()
        raise _error(device, bits)


def _error(device: torch.device | str, bits: int) -> ValueError:
    what = "; ".join(m for b, m in _MESSAGES.items() if bits & b)
    return ValueError(
        f"an earlier KV-cache call on {device} had {what} (checked on the device, so a later call "
        "reports it). Its reads and writes were kept inside the cache, but its results for those rows "
        "are wrong. Call ringflash.check_device_errors() after a call to learn at once, or wrap the "
        "calls in ringflash.use_value_checks('host') to raise in the faulty call itself, naming the values."
    )


def raise_completed(device: torch.device) -> None:
    """Raise the errors found on ``device`` whose copy to the host has completed (no waiting)."""
    f = _FLAGS.get(str(device))
    if f is not None and f.pending and f.ready():
        _report(f, device)


def check_device_errors(device: torch.device | str | None = None) -> None:
    """Wait for the value checks queued on ``device`` (every device used so far if None) and raise
    a ``ValueError`` if any failed since the last report; clears them.

    Only ``"device"``-mode checks (``use_value_checks``) queue anything. Costs one wait for the
    GPU to reach the last checked call.

    Example:
        >>> with ringflash.use_value_checks("device"):
        ...     out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)
        >>> ringflash.check_device_errors()  # raises here if lens was out of range
    """
    if device is None:
        keys = list(_FLAGS)
    else:
        d = torch.device(device)
        if d.type == "cuda" and d.index is None:  # "cuda": the current device, as tensors record it
            d = torch.device("cuda", torch.cuda.current_device())
        keys = [str(d)]
    for key in keys:
        f = _FLAGS.get(key)
        if f is None or not f.pending:
            continue
        if f.copied is not None:
            f.copied.synchronize()
        _report(f, key)


__all__ = [
    "BITS",
    "VALUE_CHECK_MODES",
    "check_device_errors",
    "current_mode",
    "error_flag",
    "or_verdicts",
    "publish",
    "raise_completed",
    "use_value_checks",
]
