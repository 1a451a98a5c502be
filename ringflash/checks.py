"""Input validation shared by the public functions: clear errors at the API boundary.

Every check raises ``ValueError`` (shapes, values) or ``TypeError`` (types, dtypes) with a message
that says what was expected. Checks that need tensor values on the host (cu_seqlens, cache lengths)
are skipped while a CUDA graph is being captured or torch.compile is tracing, and inside
``skip_value_checks()``.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


_SKIP_VALUE_CHECKS = contextvars.ContextVar("ringflash_skip_value_checks", default=False)


@contextlib.contextmanager
def skip_value_checks():
    """Inside this context, ringflash trusts the values of index tensors and does not read them.

    By default the public functions read ``cache_seqlens``, ``block_table``, ``cache_batch_idx``
    and ``cu_seqlens`` on the host to raise a clear ``ValueError`` for bad values; for CUDA tensors
    that costs one device sync per call, which stops the host from running ahead of the GPU (an
    eager decoding loop then pays every layer's Python time on the GPU's clock). Inside this
    context (as while a CUDA graph captures or torch.compile traces) those checks are skipped:
    shapes, dtypes and devices are still checked. Values out of range then give undefined results,
    as in flash-attn, except that the KV-cache kernels still keep every read and write inside the
    cache (positions, rows and pages are clamped to it).

    Example:
        >>> with ringflash.skip_value_checks():
        ...     out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
    """
    token = _SKIP_VALUE_CHECKS.set(True)
    try:
        yield
    finally:
        _SKIP_VALUE_CHECKS.reset(token)


def host_checks_allowed(t: torch.Tensor) -> bool:
    """False inside ``skip_value_checks()``, while torch.compile traces or a CUDA graph captures:
    no reading tensor values then."""
    # is_compiling first: torch.compile cannot trace ContextVar.get (a graph break, an error under
    # fullgraph), and while it traces the answer is False anyway.
    if torch.compiler.is_compiling() or _SKIP_VALUE_CHECKS.get():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_options(
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes=None,
) -> tuple[int, int]:
    """Validate the scalar options; returns ``window_size`` as a tuple of two ints."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p}: attention dropout is not supported by ringflash (pass 0.0)")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by ringflash (pass None)")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
    if not (isinstance(softcap, (int, float)) and softcap >= 0):
        raise ValueError(f"softcap must be a float >= 0 (0 disables it), got {softcap!r}")
    try:
        left, right = window_size
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded), got {window_size!r}")
    return left, right


def check_qkv(q, k, v, packed: bool = False) -> None:
    """Check q/k/v types, ranks, dtypes, devices and head layout.

    Padded inputs are ``[B, S, H, D]``; packed (varlen) inputs are ``[T, H, D]``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    rank = 3 if packed else 4
    layout = "[total_tokens, nheads, headdim]" if packed else "[batch, seqlen, nheads, headdim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k/v must have the same head dim, got {d} and {k.shape[-1]}")
    if not 0 < d <= MAX_HEADDIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEADDIM}, got {d}")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"nheads of q ({hq}) must be a multiple of nheads of k/v ({hk}) (MHA, GQA or MQA)")


def check_cu_seqlens(cu: torch.Tensor, total: int, name: str, device: torch.device) -> None:
    """Check a ``cu_seqlens`` tensor: int32, 1-D, on ``device``, starting at 0, non-decreasing,
    ending at ``total`` (the token count of the packed tensor it describes)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    if not host_checks_allowed(cu):
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals[:-1], vals[1:], strict=True)):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name} ends at {vals[-1]} but the packed tensor has {total} tokens")


def check_max_seqlen(cu: torch.Tensor, max_seqlen: int, name: str) -> None:
    """``max_seqlen`` must bound every sequence length described by ``cu``."""
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{name} must be a non-negative int, got {max_seqlen!r}")
    if host_checks_allowed(cu):
        actual = int((cu[1:] - cu[:-1]).max().item())
        if actual > max_seqlen:
            raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence ({actual})")
