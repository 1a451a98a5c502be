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

import torch

from .. import cudnn
from ..blockwise import BlockwiseConfig  # noqa: F401 (re-exported)
from ..kernels.options import TMA_MODES, AttnConfig, DecodeConfig, tma_mode, use_tma  # noqa: F401 (re-exported)
from ..kernels.tables import SignatureTable  # noqa: F401 (re-exported: the public functions' plans)
from .base import Backend, TorchBackend, _bounded_by_ops  # noqa: F401 (re-exported)
from .state import _configs, _forced, current_config, pushed, triton_available, triton_interpreter  # noqa: F401
from .triton_kernels import TritonBackend

BACKENDS = ("triton", "torch", "cudnn")
# Two-part diagonals (``diag_offset`` rows ``(diag, split, diag2)`` of a packed call) need ``split``
# and ``split + diag`` to be multiples of this: the Triton kernels' largest tile, so that no tile
# holds rows or keys of both parts' diagonals (``kernels.launch_args.varlen_diag``).
SPLIT_TILE = 128


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
        if kw.get("dkv_rows") is None and cudnn.serves_backward(dout, q, k, v, **kw):
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
    from ..kernels.device import bandwidth_per_sm, sm_count

    sms = sm_count(device)
    return sms, bandwidth_per_sm(device) * 1e9 * sms


def beside(device: torch.device, purpose: str, wanted: bool = True):
    """A context manager for work beside the current stream's: yields the context of the CUDA
    device's second stream for ``purpose`` (``kernels.device.beside``: it starts after the work
    queued so far, and the current stream waits for it when the block ends), or a no-op for other
    devices, ``wanted`` False, or a graph capture before the stream exists."""
    if device.type != "cuda":
        return contextlib.nullcontext(contextlib.nullcontext())
    from ..kernels.device import beside as on_side

    return on_side(device, purpose, wanted)


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
