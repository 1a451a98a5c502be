"""The one place a backend is chosen: attention, its backward, decoding, cache appends and merges.

A backend is an object with the methods of :class:`Backend` (the interface every layer above
calls; ``ringflash.blockwise`` documents the arguments). Three are built in:

- ``"triton"``: the Triton kernels of ``ringflash.kernels`` (CUDA tensors; CPU tensors only under
  Triton's interpreter, ``TRITON_INTERPRET=1`` set before Triton is imported);
- ``"torch"``: the blockwise PyTorch backend of ``ringflash.blockwise`` (any device);
- ``"cudnn"``: cuDNN's attention through PyTorch (``ringflash.cudnn``), for the attention calls it
  computes exactly (``cudnn.serves``); every other call, and decoding, goes to ``"triton"`` (or
  ``"torch"`` without Triton), never to a different mask.

By default CUDA tensors use ``"triton"`` when Triton is importable and everything else uses
``"torch"``; ``use_backend`` overrides the choice inside a block. Tunables (tile sizes, launch
options) are explicit config objects (``BlockwiseConfig``, ``ringflash.kernels.options``'s
``AttnConfig`` / ``DecodeConfig``) set for a block with ``use_config``; nothing reads or assigns
module globals. ``ops.py``, ``decode.py`` and ``parallel/`` call the backend returned by
:func:`backend_for`; none of them imports ``ringflash.kernels``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from . import blockwise, blockwise_cache, cudnn
from .blockwise import BlockwiseConfig
from .checks import bounded_cu
from .device_errors import error_flag, or_verdicts
from .kernels.options import TMA_MODES, AttnConfig, DecodeConfig, tma_mode, use_tma  # noqa: F401 (re-exported)
from .kernels.tables import SignatureTable  # noqa: F401 (re-exported: the public functions' plans)

BACKENDS = ("triton", "torch", "cudnn")
# Two-part diagonals (``diag_offset`` rows ``(diag, split, diag2)`` of a packed call) need ``split``
# and ``split + diag`` to be multiples of this: the Triton kernels' largest tile, so that no tile
# holds rows or keys of both parts' diagonals (``kernels.common.varlen_diag``).
SPLIT_TILE = 128
# Plain lists (innermost choice last) rather than ContextVars: torch.compile can read and guard
# on a module-level list, not on ContextVar.get.
_forced: list[str] = []
_configs: list[object] = []


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_interpreter() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``; Triton reads it once,
    when it is imported, and so does this)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def pushed(stack: list, value):
    """``value`` on top of ``stack`` inside the block (the ``use_*`` context managers nest: the
    innermost block wins)."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ringflash attention and decoding calls inside the block on backend ``name``.

    Args:
        name: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
            ``"torch"`` (the blockwise PyTorch backend, any device) or ``"cudnn"`` (cuDNN's
            attention where it computes the call exactly, the next backend elsewhere; CUDA).

    Raises:
        ValueError: an unknown name, ``"triton"`` without the triton package, or ``"cudnn"``
            without a CUDA build of PyTorch with cuDNN.

    Example:
        >>> with ringflash.use_backend("torch"):
        ...     out = ringflash.flash_attn_func(q, k, v, causal=True)
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise ValueError(
            "backend 'triton' asked for, but the triton package is not installed "
            "(pip install triton, or pip install 'ringflash[triton]')"
        )
    if name == "cudnn" and not cudnn.available():
        raise ValueError(
            "backend 'cudnn' asked for, but PyTorch has no CUDA device with cuDNN attention here "
            "(install a CUDA build of torch >= 2.5: pip install torch --index-url "
            "https://download.pytorch.org/whl/cu128)"
        )
    with pushed(_forced, name):
        yield


@contextlib.contextmanager
def use_config(config):
    """Use ``config`` (a ``BlockwiseConfig``, or ``ringflash.kernels.options.AttnConfig`` /
    ``DecodeConfig``) for the calls inside the block; each backend reads the innermost config of
    its own type. Configs change tiling and scheduling, never results beyond rounding order.

    Example:
        >>> with ringflash.backends.use_config(BlockwiseConfig(block_q=64, block_k=64)):
        ...     out = ringflash.flash_attn_func(q, k, v)
    """
    with pushed(_configs, config):
        yield


def current_config(kind: type):
    """The innermost ``use_config`` object of type ``kind``, or ``kind()`` (its defaults)."""
    for c in reversed(_configs):
        if isinstance(c, kind):
            return c
    return kind()


class Backend:
    """The interface of a backend; ``ringflash.blockwise`` documents every argument.

    - ``attn_fwd(q, k, v, *, softmax_scale, causal, window_size, softcap, cu_seqlens_q,
      cu_seqlens_k, max_seqlen_q, max_seqlen_k, diag_offset, out, lse, merge, cu_bounds) -> (out,
      lse)``; a packed call's ``diag_offset`` may be two-part (``[n_seq, 3]``, see ``SPLIT_TILE``).
      ``cu_bounds`` (packed calls; ``attn_bwd`` takes it too and only clamps, the forward having
      reported): None trusts ``cu_seqlens``;
      ``"clamp"`` bounds each sequence to the tensors' rows on the device (valid values unchanged,
      ``checks.bounded_cu``); ``"report"`` also ORs the failed checks into the device's error flag.
      Nothing is read on the host.
    - ``attn_bwd(dout, q, k, v, out, lse, *, ..., delta, dq, dk, dv, accumulate) -> (dq, dk, dv)``:
      given buffers are added into (float32) or written (``accumulate``, per dQ and dK/dV)
    - ``attn_bwd_delta(dout, out, packed) -> delta``
    - ``decode_fwd(q, k_cache, v_cache, cache_seqlens, *, n_new, k_new, v_new, block_table,
      cache_batch_idx, softmax_scale, causal, window_size, softcap, num_splits, diag_offset,
      out_dtype, cache_leftpad, check) -> (out, lse)``: attention over a KV cache; with
      ``k_new``/``v_new`` it also appends them (``cache_seqlens``: keys before the new ones); with
      ``check`` (the call's ``checks.KVCacheArgs``) it also checks the index values as
      ``check_kv_values`` does, in the same launch where it can.
    - ``append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table, cache_batch_idx)``
    - ``combine(outs [N, B, Sq, H, D], lses [N, B, Sq, H], out_dtype) -> (out, lse [B, H, Sq])``:
      the exact merge of N float32 partials (sharded decoding).
    - ``check_kv_values(a, k_cache)``: OR the bits of the failed value checks of a KV-cache call
      (``checks.KVCacheArgs``) into the device's error flag (``ringflash.device_errors``) without
      reading anything on the host.
    - ``gather_rows(k, v, rows) -> [len(rows), H, D]``: rows of ``[k; v]`` (the all-gather's
      outgoing K/V).
    - ``sum_rows_into(parts, out_k, out_v, sources, rows)``: rows summed from several sources
      into a gradient's rows (the all-gather's returned dK/dV).
    """

    name = ""

    def gather_rows(self, k, v, rows) -> torch.Tensor:
        """Rows ``rows`` of the concatenation ``[k; v]`` (``[T, H, D]`` each), as a new contiguous
        tensor. Torch operations here (the concatenation, then a select); a backend may do it in
        one pass."""
        return torch.cat([k, v]).index_select(0, rows)

    def sum_rows_into(self, parts, out_k, out_v, sources, rows) -> None:
        """``out_k[rows[i]]`` (``out_v[rows[i]]``) set to the float32 sum, in source order from
        0, of ``parts[sources[s, i]]`` (``parts[sources[s, n + i]]``, ``n = len(rows)``) over the
        sources ``s``, cast to the output's dtype; an index of -1 adds nothing (the all-gather's
        returned dK/dV partials). Torch operations here, one pass per source and no host sync; a
        backend may do it in one launch."""
        acc = torch.zeros((sources.shape[1], *parts.shape[1:]), dtype=torch.float32, device=parts.device)
        for at in sources if parts.shape[0] else ():
            seen = (at >= 0).view(-1, *([1] * (parts.dim() - 1)))
            acc += torch.where(seen, parts.index_select(0, at.clamp(min=0)), 0.0)
        n = rows.shape[0]
        out_k.index_copy_(0, rows, acc[:n].to(out_k.dtype))
        out_v.index_copy_(0, rows, acc[n:].to(out_v.dtype))

    def runs_on(self, device: torch.device) -> bool:
        """Whether this backend can run tensors on ``device``."""
        raise NotImplementedError

    def attn_plan(self, q, k, v, **kw):
        """A runner for later inference calls ``attn_fwd(q, k, v, **kw)`` of this call's signature
        (padded, results allocated, bottom-right masks), ``runner(q, k, v) -> (out, lse)``, or None
        where every call must take ``attn_fwd`` (the default)."""
        return None

    def varlen_plan(self, q, k, v, **kw):
        """A runner for later packed inference calls ``attn_fwd(q, k, v, **kw)`` of this call's
        signature (``kw`` holds the call's ``cu_seqlens``, ``max_seqlen`` and ``cu_bounds``;
        results allocated, bottom-right masks), ``runner(q, k, v, cu_q, cu_k) -> (out, lse)``, or
        None where every call must take ``attn_fwd`` (the default)."""
        return None

    def decode_plan(self, q, k_cache, v_cache, *, k_new, v_new, block_table, cache_batch_idx, **kw):
        """A runner for later ``decode_fwd`` calls of this call's signature (bottom-right masks),
        ``runner(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx,
        cache_leftpad) -> (out, lse)``, or None where every call must take ``decode_fwd`` (the
        default). ``kw``: ``decode_fwd``'s options and ``check`` (the runner queues the value checks)."""
        return None


def _bounded_by_ops(q, k, kw: dict, bounds: str | None) -> dict:
    """``kw`` with its packed ``cu_seqlens`` replaced by copies bounded to the rows of ``q`` and ``k``
    by torch operations (``checks.bounded_cu``), the failed checks ORed into the device's error
    flag for ``bounds == "report"``; ``kw`` itself when nothing is to bound. No host sync."""
    cu_q, cu_k = kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k")
    if bounds is None or cu_q is None:
        return kw
    lens = (kw["max_seqlen_q"], kw["max_seqlen_k"])
    safe_q, verdicts = bounded_cu(cu_q, q.shape[0], lens[0])
    safe_k = safe_q
    if cu_k is not cu_q or q.shape[0] != k.shape[0] or lens[0] != lens[1]:
        safe_k, more = bounded_cu(cu_k, k.shape[0], lens[1])
        verdicts = [(bit, a | b) for (bit, a), (_, b) in zip(verdicts, more, strict=True)]
    if bounds == "report":
        or_verdicts(cu_q.device, verdicts)
    return {**kw, "cu_seqlens_q": safe_q, "cu_seqlens_k": safe_k}


class TorchBackend(Backend):
    """The blockwise PyTorch backend (``ringflash.blockwise``): any device."""

    name = "torch"

    def runs_on(self, device):
        return True

    def attn_fwd(self, q, k, v, cu_bounds=None, **kw):
        kw = _bounded_by_ops(q, k, kw, cu_bounds)
        return blockwise.attn_fwd(q, k, v, config=current_config(BlockwiseConfig), **kw)

    def attn_bwd(self, dout, q, k, v, out, lse, cu_bounds=None, **kw):
        kw = _bounded_by_ops(q, k, kw, "clamp" if cu_bounds else None)
        return blockwise.attn_bwd(dout, q, k, v, out, lse, config=current_config(BlockwiseConfig), **kw)

    def attn_bwd_delta(self, dout, out, packed=False):
        return blockwise.attn_bwd_delta(dout, out, packed=packed)

    def decode_fwd(self, q, k_cache, v_cache, cache_seqlens, check=None, **kw):
        if check is not None:
            self.check_kv_values(check, k_cache)
        cfg = current_config(BlockwiseConfig)
        return blockwise_cache.decode_fwd(q, k_cache, v_cache, cache_seqlens, config=cfg, **kw)

    def check_kv_values(self, a, k_cache):
        or_verdicts(k_cache.device, a.value_verdicts(k_cache))

    def append_kv(self, k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, cache_batch_idx=None):
        blockwise_cache.append_kv(
            k_cache, v_cache, k, v, cache_seqlens, block_table=block_table, cache_batch_idx=cache_batch_idx
        )

    def combine(self, outs, lses, out_dtype):
        from .merge import combine_attn_partials

        out, lse = combine_attn_partials(outs, lses.permute(0, 1, 3, 2))
        return out.to(out_dtype), lse


class TritonBackend(Backend):
    """The Triton kernels (``ringflash.kernels``): CUDA tensors, or CPU tensors under the interpreter."""

    name = "triton"

    def runs_on(self, device):
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter())

    def attn_fwd(self, q, k, v, cu_bounds=None, **kw):
        from .kernels import decode, fwd

        if kw.get("out") is None and kw.get("cu_seqlens_q") is None and _split_kv_suits(q, k, v, decode):
            # A few query rows against a long context (a generate loop without a KV cache): the
            # split-KV decoding kernel spreads the keys over every SM and reads K/V once per KV head.
            return self._split_kv(q, k, v, **kw)
        kw = self._bounds(q, k, kw, cu_bounds)
        return fwd.attn_fwd(q, k, v, config=current_config(AttnConfig), **kw)

    @staticmethod
    def _bounds(q, k, kw, bounds):
        """``kw`` for the kernels of a call with ``cu_bounds=bounds``: they bound each sequence
        themselves, one program per sequence reporting (``kernels.common._attn_prologue``). A call
        that launches no program (no sequence, no query rows, a longest sequence of 0) gets its
        bounds from torch operations instead, so that its checks still run."""
        if bounds is None or kw.get("cu_seqlens_q") is None:
            return kw
        if kw["cu_seqlens_q"].shape[0] < 2 or q.shape[0] == 0 or not kw.get("max_seqlen_q"):
            return _bounded_by_ops(q, k, kw, bounds)
        flag = error_flag(q.device) if bounds == "report" else None  # the device's, for its life
        return {**kw, "bound_cu": True, "flag": flag}

    def attn_plan(self, q, k, v, **kw):
        from .kernels import decode, fwd

        if _split_kv_suits(q, k, v, decode):
            return None
        plan = fwd.plan_fwd(q, k, v, config=current_config(AttnConfig), **kw)
        if plan is None:
            return None
        return lambda q, k, v: fwd.run_fwd_plan(q, plan, k, v)

    def varlen_plan(self, q, k, v, cu_bounds=None, **kw):
        from .kernels import fwd

        kw = self._bounds(q, k, kw, cu_bounds)
        if "bound_cu" not in kw and cu_bounds is not None:
            return None  # bounded by torch operations: every call takes attn_fwd
        plan = fwd.plan_fwd(q, k, v, config=current_config(AttnConfig), **kw)
        if plan is None:
            return None
        return lambda q, k, v, cu_q, cu_k: fwd.run_fwd_plan(q, plan, k, v, cu_q, cu_k)

    def _split_kv(
        self,
        q,
        k,
        v,
        *,
        softmax_scale,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        diag_offset=None,
        **_,
    ):
        from .kernels.decode import decode_fwd

        batch, seqlen_k = q.shape[0], k.shape[1]
        lens = torch.full((batch,), seqlen_k, dtype=torch.int32, device=q.device)
        diag = None if diag_offset is None else torch.full_like(lens, int(diag_offset))
        return decode_fwd(
            q,
            k,
            v,
            lens,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            diag_offset=diag,
            config=current_config(DecodeConfig),
        )

    def attn_bwd(self, dout, q, k, v, out, lse, cu_bounds=None, **kw):
        from .kernels import bwd

        kw = self._bounds(q, k, kw, "clamp" if cu_bounds else None)
        return bwd.attn_bwd(dout, q, k, v, out, lse, config=current_config(AttnConfig), **kw)

    def attn_bwd_delta(self, dout, out, packed=False):
        from .kernels import bwd

        return bwd.attn_bwd_delta(dout, out, packed=packed)

    def decode_fwd(self, q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, check=None, **kw):
        from .kernels.decode import decode_fwd

        flag = None
        if check is not None:
            if q.shape[1] == 0:  # no program of the decode kernel runs: the check on its own
                self.check_kv_values(check, k_cache)
            else:
                flag = error_flag(k_cache.device)
        # The split kernel reads rows with a unit stride in the head dim (the cache is checked to
        # have one: it is written in place).
        q, k_new, v_new = _unit_last(q), _unit_last(k_new), _unit_last(v_new)
        cfg = current_config(DecodeConfig)
        return decode_fwd(
            q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, config=cfg, check_flag=flag, **kw
        )

    def decode_plan(self, q, k_cache, v_cache, *, check=False, **kw):
        from .kernels.decode.plan import plan_decode, run_plan

        plan = plan_decode(q, k_cache, v_cache, config=current_config(DecodeConfig), check=check, **kw)
        if plan is None:
            return None

        flag = error_flag(k_cache.device) if check else None  # the device's, for the process's life

        def runner(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cbi, leftpad):
            return run_plan(
                q, plan, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cbi, leftpad, flag
            )

        return runner

    def gather_rows(self, k, v, rows):
        from .kernels.rows import gather_rows

        return gather_rows(_unit_last(k), _unit_last(v), rows)

    def sum_rows_into(self, parts, out_k, out_v, sources, rows):
        from .kernels.rows import sum_rows_into

        sum_rows_into(parts, out_k, out_v, sources, rows)

    def check_kv_values(self, a, k_cache):
        from .kernels.decode.check import check_kv_values

        check_kv_values(
            a.cache_seqlens,
            error_flag(k_cache.device),
            capacity=a.capacity,
            n_new=a.n_new,
            n_rows=k_cache.shape[0],
            page_size=k_cache.shape[1] if a.paged else 1,
            cache_leftpad=a.cache_leftpad,
            block_table=a.block_table,
            cache_batch_idx=a.cache_batch_idx,
        )

    def append_kv(self, k_cache, v_cache, k, v, cache_seqlens, *, block_table=None, cache_batch_idx=None):
        from .kernels.decode import append_kv

        append_kv(
            k_cache,
            v_cache,
            _unit_last(k),
            _unit_last(v),
            cache_seqlens,
            block_table=block_table,
            cache_batch_idx=cache_batch_idx,
        )

    def combine(self, outs, lses, out_dtype):
        from .kernels.decode import combine_partials

        _, batch, sq, heads, dim = outs.shape
        out = torch.empty((batch, sq, heads, dim), dtype=out_dtype, device=outs.device)
        lse = torch.empty((batch, heads, sq), dtype=torch.float32, device=outs.device)
        return combine_partials(outs, lses, out, lse, split_dim=0)


class CudnnBackend(Backend):
    """cuDNN's attention (``ringflash.cudnn``) for the calls it computes exactly; every other call
    on the next backend (``"triton"``, or ``"torch"`` without Triton)."""

    name = "cudnn"

    def runs_on(self, device):
        return device.type == "cuda" and cudnn.available()

    @staticmethod
    def next(x: torch.Tensor) -> Backend:
        """The backend of the calls on ``x``'s device that cuDNN does not serve: the default one."""
        return _BACKENDS[_default_name(x.device)]

    def attn_fwd(self, q, k, v, **kw):
        if cudnn.serves(q, k, v, **kw):
            return cudnn.attn_fwd(q, k, v, **kw)
        return self.next(q).attn_fwd(q, k, v, **kw)

    def attn_bwd(self, dout, q, k, v, out, lse, **kw):
        if cudnn.serves_backward(dout, q, k, v, **kw):
            return cudnn.attn_bwd(dout, q, k, v, out, lse, **kw)
        return self.next(q).attn_bwd(dout, q, k, v, out, lse, **kw)

    def attn_bwd_delta(self, dout, out, packed=False):
        delta = self.next(dout).attn_bwd_delta(dout, out, packed=packed)
        return delta if packed else cudnn.mark_plain(delta)

    def decode_fwd(self, q, *args, **kw):
        return self.next(q).decode_fwd(q, *args, **kw)

    def decode_plan(self, q, *args, **kw):
        return self.next(q).decode_plan(q, *args, **kw)

    def check_kv_values(self, a, k_cache):
        self.next(k_cache).check_kv_values(a, k_cache)

    def gather_rows(self, k, *args):
        return self.next(k).gather_rows(k, *args)

    def sum_rows_into(self, parts, *args):
        self.next(parts).sum_rows_into(parts, *args)

    def append_kv(self, k_cache, *args, **kw):
        self.next(k_cache).append_kv(k_cache, *args, **kw)

    def combine(self, outs, lses, out_dtype):
        return self.next(outs).combine(outs, lses, out_dtype)


def device_throughput(device: torch.device) -> tuple[int, float] | None:
    """``(SMs, memory bytes per second)`` of a CUDA device (from its properties: the memory clock
    and bus width), or None for other devices."""
    if device.type != "cuda":
        return None
    from .kernels.device import bandwidth_per_sm, sm_count

    sms = sm_count(device)
    return sms, bandwidth_per_sm(device) * 1e9 * sms


def _split_kv_suits(q, k, v, decode) -> bool:
    """Whether a padded forward goes to the split-KV decoding kernel (``decode.split_kv_pays``;
    under the interpreter the SM count is a stand-in, so tests reach this path too)."""
    from .kernels.device import sm_count

    if v.shape[-1] != q.shape[-1] or not q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        return False
    return decode.split_kv_pays(
        q.shape[0], q.shape[1], q.shape[2], k.shape[2], k.shape[1], sm_count(q.device)
    )


def _unit_last(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


_BACKENDS = {"torch": TorchBackend(), "triton": TritonBackend(), "cudnn": CudnnBackend()}


def _default_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def dispatch_state() -> tuple:
    """What every ``use_backend``, ``use_config`` and ``use_tma`` block in force adds up to: equal
    tuples choose the same backend, configs and loads for a call."""
    return (_forced[-1] if _forced else None, *_configs, tma_mode())


def plan_signature(tensors, options, window, *extra) -> tuple | None:
    """The key of a public function's planned call: each tensor's shape, strides, dtype and device
    (None kept as None), each option's value and type and the types of ``window``'s members,
    ``extra``, and the dispatch state in force (``dispatch_state``). None, for a call that takes
    the full path: a tensor that is neither a plain tensor nor a ``Parameter``, or a window that
    is not a tuple."""
    if type(window) is not tuple:
        return None
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif type(t) is torch.Tensor or type(t) is torch.nn.Parameter:  # a model's sink is a Parameter
            key.append((t.shape, t.stride(), t.dtype, t.device))
        else:
            return None
    return (*key, *options, *map(type, options), *map(type, window), *extra, dispatch_state())


def backend_name(device: torch.device) -> str:
    """The name of the backend that a call on ``device`` uses now."""
    if _forced:
        return _forced[-1]
    return _default_name(device)


def get_backend(name: str) -> Backend:
    """The backend called ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS}") from None


def backend_for(x: torch.Tensor) -> Backend:
    """The backend that a call on tensor ``x`` uses now.

    Raises:
        ValueError: the chosen backend cannot run tensors on ``x``'s device (e.g. ``"triton"``
            on CPU tensors without ``TRITON_INTERPRET=1``).
    """
    be = get_backend(backend_name(x.device))
    if not be.runs_on(x.device):
        raise ValueError(
            f"backend {be.name!r} cannot run {x.device.type} tensors: 'triton' and 'cudnn' run CUDA "
            "tensors ('triton' CPU tensors too with TRITON_INTERPRET=1 set before triton is "
            "imported); use use_backend('torch') for other devices"
        )
    return be
