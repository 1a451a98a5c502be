"""Value checks without a host sync: a sticky error flag per device.

Reading an index tensor's values on the host (``cache_seqlens``, ``block_table``, ``cu_seqlens``,
...) makes the host wait for the GPU on every call, so an eager loop pays its Python time on the
GPU's clock. In ``"device"`` mode (``use_value_checks``; the default for CUDA tensors) the
KV-cache calls and ``flash_attn_varlen_func`` check them on the device instead, in the launches
they make anyway (``kernels/decode/check.py``, the attention kernels' prologue in
``kernels/common.py``; torch operations on the blockwise backend), which OR one bit per failed
check into the device's flag. The flag lives in pinned host memory
that the kernel writes directly, so the host reads it without a copy or a sync: a failed check is
raised as a ``ValueError`` by the first later checked call on that device after the check has run,
or by :func:`check_device_errors`, which waits for it. The faulty call itself still runs, with
every read and write kept inside its tensors (the kernels clamp positions, rows and pages; packed
sequences' bounds are clamped to the tensors' rows): its results for the bad rows are wrong and
the error says so.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes

import torch

VALUE_CHECK_MODES = ("host", "device", "off")
_MODE = contextvars.ContextVar("ringflash_value_checks", default=None)

# One bit per check; the messages name what a faulty call had.
BITS = {
    "negative_length": 1,
    "too_long": 2,
    "leftpad": 4,
    "page": 8,
    "row": 16,
    "repeated_row": 32,
    "cu_seqlens": 64,
    "max_seqlen": 128,
}
_MESSAGES = {
    1: "a negative cache_seqlens entry",
    2: "cache_seqlens + the new tokens larger than the cache holds",
    4: "a cache_leftpad entry outside [0, cache_seqlens + new tokens]",
    8: "a block_table entry outside the cache's pages",
    16: "a cache_batch_idx entry outside the cache's rows",
    32: "cache_batch_idx repeating a row while appending (the appends collide)",
    64: "a cu_seqlens that does not start at 0, decreases, or does not end at the packed tensor's rows",
    128: "a packed sequence longer than its max_seqlen",
}


@contextlib.contextmanager
def use_value_checks(mode: str):
    """How calls check the values of their index tensors, inside this context.

    Args:
        mode: ``"host"`` (the default for CPU tensors): read them on the host and raise in the
            faulty call itself, naming the values, before anything is written; for CUDA tensors
            one device sync per call.
            ``"device"`` (the default for CUDA tensors): the KV-cache calls and
            ``flash_attn_varlen_func`` check them on the device, no sync; a failure is raised by a
            later call on that device or by :func:`check_device_errors` (module docstring). The
            distributed functions, which plan from ``cu_seqlens``, read it on the host.
            ``"off"``: no value checks (as ``skip_value_checks()``); bad values give wrong results,
            every read and write still stays inside the tensors (KV caches, packed rows).

    Example:
        >>> with ringflash.use_value_checks("host"):  # raise in the faulty call itself (one sync)
        ...     out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)
    """
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"unknown value-check mode {mode!r}: expected one of {VALUE_CHECK_MODES}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def current_mode() -> str | None:
    """The mode set by the innermost ``use_value_checks``; None outside any (the default of each
    device: ``mode_for``)."""
    return _MODE.get()


def mode_for(t: torch.Tensor) -> str:
    """The value-check mode for index tensors on ``t``'s device: the innermost
    ``use_value_checks``'s, else ``"device"`` for CUDA tensors and ``"host"`` for others."""
    mode = _MODE.get()
    if mode is None:
        return "device" if t.is_cuda else "host"
    return mode


KERNEL_WORDS = len(BITS)  # the check kernels' words: one per bit (``kernels.common.or_into_flag``)


class _Flag:
    """A device's error bits in host memory, ``KERNEL_WORDS + 1`` int32 words: word ``i <
    KERNEL_WORDS`` is set to 1 by a check kernel that found bit ``2**i``; the last holds what
    torch operations OR-ed on the device (``or_verdicts``).

    A word per bit, because kernels store into host memory without atomics: programs that fail
    different checks at once each store their own words, and none is lost. For a CUDA device the
    words are pinned host memory, which a kernel writes through its device mapping (unified
    addressing): the host reads them with no copy and no stream work, and sees a call's bits once
    its check has run."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        n = KERNEL_WORDS + 1
        self.words = torch.zeros(n, dtype=torch.int32, pin_memory=self.cuda)
        address = self.words.data_ptr()
        self.view = (ctypes.c_int32 * n).from_address(address)
        self.raw = (ctypes.c_char * (4 * n)).from_address(address)  # every word in one read
        self.none = bytes(4 * n)
        self.on_device = None  # CUDA: the bits torch operations OR into (``or_verdicts``), made on use

    def bits(self) -> int:
        if self.raw.raw == self.none:  # the common case: one copy of the words, no torch call
            return 0
        v = self.view
        found = v[KERNEL_WORDS]
        for i in range(KERNEL_WORDS):
            if v[i]:
                found |= 1 << i
        return found

    def clear(self) -> None:
        if self.on_device is not None:
            self.on_device.zero_()
        ctypes.memset(self.words.data_ptr(), 0, self.words.numel() * 4)


_FLAGS: dict[str, _Flag] = {}


def _key(device: torch.device | str) -> str:
    """The flag's key of ``device``: ``"cuda"`` names the current CUDA device, as tensors record it."""
    key = str(device)
    return f"cuda:{torch.cuda.current_device()}" if key == "cuda" else key


def _flag(device: torch.device) -> _Flag:
    key = _key(device)
    f = _FLAGS.get(key)
    if f is None:
        f = _FLAGS[key] = _Flag(device)
    return f


def error_flag(device: torch.device) -> torch.Tensor:
    """The words that ``device``'s check kernels set, one per bit (int32, ``KERNEL_WORDS``
    elements), in host memory (pinned, so a kernel on ``device`` can write them) for a CUDA
    device; in place on CPU."""
    return _flag(device).words[:KERNEL_WORDS]


def verdict_bits(verdicts: list[tuple[int, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The OR of the bits of the failed checks, an int32 tensor of one element on ``device``:
    ``(bit, bool tensor of one element)`` per check (torch operations; nothing read on the host)."""
    if not verdicts:
        return torch.zeros((), dtype=torch.int32, device=device)
    bits = torch.tensor([b for b, _ in verdicts], dtype=torch.int32, device=device)
    failed = torch.stack([v.reshape(()) for _, v in verdicts]).to(torch.int32)
    return (failed * bits).sum(dtype=torch.int32)


def or_verdicts(device: torch.device, verdicts: list[tuple[int, torch.Tensor]]) -> None:
    """OR into ``device``'s flag the bits of the failed checks (``verdict_bits``); for a CUDA
    device through an asynchronous copy to the host, nothing read there."""
    if not verdicts:
        return
    f = _flag(device)
    found = verdict_bits(verdicts, device)
    if not f.cuda:
        f.words[KERNEL_WORDS].bitwise_or_(found)
        return
    if f.on_device is None:
        f.on_device = torch.zeros((), dtype=torch.int32, device=device)
    f.on_device.bitwise_or_(found)
    f.words[KERNEL_WORDS].copy_(f.on_device, non_blocking=True)


def take_bits(device: torch.device | str) -> int:
    """The bits of ``device``'s flag as the host sees them now (checks that have run), cleared;
    no waiting (``check_device_errors`` waits, then raises them)."""
    f = _FLAGS.get(_key(device))
    if f is None:
        return 0
    bits = f.bits()
    if bits:
        f.clear()
    return bits


def _error(device: torch.device | str, bits: int) -> ValueError:
    what = "; ".join(m for b, m in _MESSAGES.items() if bits & b)
    kind = "KV-cache call" if bits < BITS["cu_seqlens"] else "call"
    return ValueError(
        f"an earlier {kind} on {device} had {what} (checked on the device, so a later call "
        "reports it). Its reads and writes were kept inside its tensors, but its results for those "
        "rows are wrong. Call ringflash.check_device_errors() after a call to learn at once, or wrap "
        "the calls in ringflash.use_value_checks('host') to raise in the faulty call itself, naming "
        "the values."
    )


def raise_completed(device: torch.device | str) -> None:
    """Raise the errors found so far on ``device`` by checks that have run (no waiting), cleared
    first."""
    bits = take_bits(device)
    if bits:
        raise _error(device, bits)


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
    keys = list(_FLAGS) if device is None else [_key(device)]
    for key in keys:
        f = _FLAGS.get(key)
        if f is None:
            continue
        if f.cuda:
            torch.cuda.synchronize(key)
        raise_completed(key)


__all__ = [
    "BITS",
    "VALUE_CHECK_MODES",
    "check_device_errors",
    "current_mode",
    "mode_for",
    "error_flag",
    "or_verdicts",
    "take_bits",
    "verdict_bits",
    "raise_completed",
    "use_value_checks",
]
