"""Argument checks shared by every public entry point: clear errors at the API boundary.

Local, packed, KV-cache, ring, Ulysses, hybrid and sharded-decoding functions (and the
integrations, which call them) validate through this one module, so the paths cannot drift apart.
A check raises ``ValueError`` (shapes, values) or ``TypeError`` (types, dtypes) with a message that
says what was expected. The distributed functions run the same checks, catch the error, and make
every rank of the group raise it (``ringflash.comm.agree``).

Checks that need tensor values on the host (``cu_seqlens``, cache lengths) are skipped while a CUDA
graph is being captured or torch.compile traces, and inside ``skip_value_checks()``. Under
``use_value_checks("device")`` (the default for CUDA tensors) the KV-cache calls check on the device
(``ringflash.device_errors``). The KV-cache calls' checks are in ``ringflash.kv_checks``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator

import torch

from .device_errors import BITS, current_mode, mode_for, use_value_checks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


@contextlib.contextmanager
def skip_value_checks():
    """Inside this context, ringflash trusts the values of index tensors and does not read them.

    By default the public functions check ``cache_seqlens``, ``block_table``, ``cache_batch_idx``
    and ``cu_seqlens`` to raise a clear ``ValueError`` for bad values: the KV-cache calls on CUDA
    tensors on the device (a later call raises, no sync; ``use_value_checks``), everything else on
    the host, which for CUDA tensors costs one device sync per call.
    Inside this context (as while a CUDA graph captures or torch.compile traces) those checks are
    skipped: shapes, dtypes and devices are still checked. Values out of range then give undefined
    results, as in flash-attn, except that the KV-cache kernels still keep every read and write
    inside the cache (positions, rows and pages are clamped to it). The same as
    ``use_value_checks("off")``.

    Example:
        >>> with ringflash.skip_value_checks():
        ...     out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
    """
    with use_value_checks("off"):
        yield


def host_checks_allowed(t: torch.Tensor) -> bool:
    """False inside ``skip_value_checks()``, while torch.compile traces or a CUDA graph captures:
    no reading tensor values then."""
    # is_compiling first: torch.compile cannot trace ContextVar.get (a graph break, an error under
    # fullgraph), and while it traces the answer is False anyway.
    if torch.compiler.is_compiling() or current_mode() == "off":
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def value_check_mode(t: torch.Tensor) -> str | None:
    """Where the KV-cache calls check index values of tensors on ``t``'s device: ``"host"``,
    ``"device"`` (``ringflash.device_errors``), or None (not at all)."""
    return mode_for(t) if host_checks_allowed(t) else None


# ---------------------------------------------------------------------------------- scalars


def _real(x, name: str, what: str) -> float:
    """``x`` as a finite float; bools, tensors, strings and NaN/inf are rejected."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be {what}, got {x!r}")
    return float(x)


def check_int(x, name: str, minimum: int | None = None) -> int:
    """``x`` as an int (Python or NumPy integers; not bools, floats or tensors)."""
    if isinstance(x, bool):
        raise ValueError(f"{name} must be an int, got {x!r}")
    try:
        n = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {x!r}") from None
    if minimum is not None and n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def check_flag(x, name: str) -> bool:
    """A bool option; NumPy bools and ints 0 and 1 are accepted (``causal=1``), anything else is
    an error."""
    if isinstance(x, bool):
        return x
    if type(x).__module__ == "numpy" and type(x).__name__ in ("bool_", "bool"):
        return bool(x)
    if isinstance(x, numbers.Integral) and x in (0, 1):
        return bool(x)
    raise ValueError(f"{name} must be True or False, got {x!r}")


def check_options(
    dropout_p=0.0,
    softmax_scale=None,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    causal=False,
) -> tuple[bool, tuple[int, int], float, float | None]:
    """Validate the scalar options of an attention call.

    Returns:
        ``(causal, (window_left, window_right), softcap, softmax_scale or None)``, normalised.
    """
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or dropout_p != 0:
        raise ValueError(
            f"dropout_p={dropout_p!r}: attention dropout is not supported by ringflash (pass 0.0)"
        )
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by ringflash (pass None)")
    scale = None
    if softmax_scale is not None:
        scale = _real(softmax_scale, "softmax_scale", "a positive finite float or None")
        if scale <= 0:
            raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    cap = _real(softcap, "softcap", "a finite float >= 0 (0 disables it)")
    if cap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left = check_int(window_size[0], "window_size[0]")
    right = check_int(window_size[1], "window_size[1]")
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded), got {window_size!r}")
    return check_flag(causal, "causal"), (left, right), cap, scale


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: the given one, or ``head_dim ** -0.5``."""
    return scale if scale is not None else head_dim**-0.5


# ---------------------------------------------------------------------------------- tensors


def check_tensor(t, name: str, ndim: int, layout: str) -> None:
    """A floating tensor of ``ndim`` dims in a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32")


def check_heads(hq: int, hk: int, d: int, dv: int, what: str = "k/v") -> None:
    """Head counts (GQA/MQA: ``hq % hk == 0``) and head dims (1..256)."""
    if hq < 1 or hk < 1:
        raise ValueError(f"q and {what} need at least one head, got {hq} and {hk}")
    if hq % hk:
        raise ValueError(
            f"nheads of q ({hq}) must be a multiple of nheads of {what} ({hk}) (MHA, GQA or MQA)"
        )
    if not 0 < d <= MAX_HEADDIM or not 0 < dv <= MAX_HEADDIM:
        got = d if not 0 < d <= MAX_HEADDIM else dv
        raise ValueError(f"head dim must be in 1..{MAX_HEADDIM}, got {got}")


def check_qkv(q, k, v, packed: bool = False, same_tokens: bool = False) -> None:
    """Check q/k/v types, ranks, dtypes, devices and head layout.

    Padded inputs are ``[B, S, H, D]``; packed (varlen) inputs are ``[T, H, D]``. Any strides are
    accepted (every backend handles them). ``same_tokens``: q and k/v must hold the same tokens
    (sequence-parallel shards).
    """
    rank = 3 if packed else 4
    layout = "[total_tokens, nheads, headdim]" if packed else "[batch, seqlen, nheads, headdim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, rank, layout)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != v.shape[-1]:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if same_tokens and q.shape[:-2] != k.shape[:-2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must hold the same tokens (sequence parallelism "
            "shards queries and keys together)"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k/v must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    check_heads(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1])


def check_sink(sink, q: torch.Tensor) -> None:
    """A learnable sink: None, or a floating tensor ``[Hq]`` (one logit per query head) on q's device."""
    if sink is None:
        return
    if not isinstance(sink, torch.Tensor) or not sink.is_floating_point():
        got = sink.dtype if isinstance(sink, torch.Tensor) else type(sink).__name__
        raise TypeError(f"learnable_sink must be a floating torch.Tensor [nheads], got {got}")
    if sink.dim() != 1 or sink.shape[0] != q.shape[-2]:
        want = f"[nheads={q.shape[-2]}] (one logit per query head)"
        raise ValueError(f"learnable_sink must be {want}, got shape {tuple(sink.shape)}")
    if sink.device != q.device:
        raise ValueError(f"learnable_sink is on {sink.device} but q is on {q.device}")


def check_cu_seqlens(
    cu, total: int, name: str, device: torch.device, allow_cpu: bool = False, read: bool = True
) -> list[int] | None:
    """Check a ``cu_seqlens`` tensor: int32, 1-D, on ``device`` (or the CPU with ``allow_cpu``),
    starting at 0, non-decreasing, ending at ``total`` (the token count it describes); its values
    only with ``read``.

    Returns:
        Its values as a list when they were read (None inside ``skip_value_checks`` and the like).
    """
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as in flash-attn), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device and not (allow_cpu and cu.device.type == "cpu"):
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    if not read or not host_checks_allowed(cu):
        return None
    vals = cu.tolist()
    check_cu_list(vals, total, name)
    return vals


def bounded_cu(cu: torch.Tensor, total: int, max_len: int) -> tuple[torch.Tensor, list]:
    """A ``cu_seqlens`` bounded on its device, ``min(cummax(max(cu, 0)), total)`` (equal to ``cu``
    when valid; otherwise still non-decreasing inside ``[0, total]``, so every row it describes
    exists), and the ``(bit, failed)`` verdicts of its checks (``ringflash.device_errors.BITS``:
    ``cu_seqlens`` its start, order and end; ``max_seqlen`` its longest sequence). Nothing is read
    on the host."""
    x = cu.long()
    safe = x.clamp(min=0).cummax(0).values.clamp(max=total).to(torch.int32)
    steps = x[1:] - x[:-1]
    shape = (x[0] != 0) | (x[-1] != total) | (steps < 0).any()
    return safe, [(BITS["cu_seqlens"], shape), (BITS["max_seqlen"], (steps > max_len).any())]


def check_cu_list(vals: list[int], total: int | None, name: str) -> None:
    """The values of a ``cu_seqlens``: start at 0, never decrease, end at ``total`` (unless None)."""
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {_short(vals)}")
    bad = next((i for i in range(1, len(vals)) if vals[i] < vals[i - 1]), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing, but entry {bad} ({vals[bad]}) < {vals[bad - 1]}")
    if total is not None and vals[-1] != total:
        raise ValueError(f"{name} ends at {vals[-1]} but the packed tensor has {total} tokens")


def check_max_seqlen(cu: torch.Tensor, max_seqlen, name: str, vals: list[int] | None = None) -> int:
    """``max_seqlen`` must be an int bounding every sequence length described by ``cu``."""
    n = check_int(max_seqlen, name, minimum=0)
    if vals is not None:
        actual = max(b - a for a, b in zip(vals[:-1], vals[1:], strict=True))
        if actual > n:
            raise ValueError(f"{name}={n} is smaller than the longest sequence ({actual})")
    return n


def _short(vals, limit: int = 12) -> str:
    """A list for an error message, elided in the middle when long."""
    if len(vals) <= limit:
        return str(list(vals))
    return f"[{', '.join(map(str, vals[:6]))}, ..., {', '.join(map(str, vals[-4:]))}] ({len(vals)} entries)"


def short_repr(x) -> str:
    """``repr`` for error messages: long lists and tuples elided."""
    return _short(x) if isinstance(x, (list, tuple)) else repr(x)
