"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Each rank holds a shard of Q, K and V in one of the layouts of ``layouts.py`` (``contiguous``,
``zigzag``, ``stripe``); K/V (only the KV heads, so GQA/MQA send less) travel the ring while every
rank merges its partial results exactly in float32 (see ``ring_loop.py``). The output is this
rank's shard of ``softmax(Q K^T * scale) V`` for the whole sequence, in the input dtype.

Causal masks, sliding windows and softcapping are exact for every layout: fully masked blocks are
skipped, and ring steps that no rank needs (a window shorter than the distance to a shard) are
neither computed nor communicated. ``zigzag`` and ``stripe`` balance the work of causal attention;
they are correct (but pointless) without a causal mask, so ``causal=False`` is allowed with every
layout.

Inputs are checked collectively: every rank all-gathers a small signature of its arguments (shapes,
dtype, layout, mask, group members) before any ring communication, so a bad input on any rank
raises ``ValueError`` on every rank instead of a hang. The check runs on the host: over a gloo
group of the same ranks when the ring's group is NCCL-only (created once per set of ranks), so it
never waits for the GPU nor adds a device collective to the stream. With no process group
initialised, or a group of one rank, the same functions compute locally.
"""

from __future__ import annotations

import functools
import itertools
import socket
import struct
import zlib

import torch
import torch.distributed as dist

from ..backends import RING_TRANSPORTS, backend_for, ring_prefetch, ring_transport
from ..comm.copy_engine import copy_engine_available
from ..comm.ring import RingComm, run_on_group
from .layouts import LAYOUTS, Plan, build_plan, build_varlen_plan, local_len_error
from .ring_loop import TAG_DKV, TAG_KV, ring_bwd_loop, ring_fwd_loop

_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_SIG_FIELDS = (
    "layout",
    "causal",
    "window_left",
    "window_right",
    "softcap",
    "softmax_scale",
    "packed",
    "batch",
    "local seqlen",
    "q heads",
    "kv heads",
    "head dim",
    "v head dim",
    "dtype",
    "cu_seqlens total",
    "cu_seqlens checksum",
    "group members",
    "ring transport",
    "node",
    "ring prefetch",
)
_SIG_HINTS = {
    "local seqlen": " (every rank needs a shard of equal length)",
    "batch": " (every rank needs a shard of equal length)",
    "ring transport": " (every rank must choose the same use_ring_transport)",
    "node": ' (use_ring_transport("copy_engine") needs every rank of the group on one node)',
    "ring prefetch": " (every rank must choose the same use_ring_prefetch)",
}


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, rank, world_size)``; ``(None, 0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given, but torch.distributed is not initialised")
        return None, 0, 1
    g = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(g)
    if rank < 0:
        raise ValueError("this process is not a member of the process group it passed")
    return g, rank, dist.get_world_size(g)


def _fbits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _local_error(q, k, v, layout, dropout_p, alibi_slopes, window_size, world, cu_list) -> str | None:
    """What is wrong with this rank's arguments (None when nothing is)."""
    packed = cu_list is not None
    nd = 3 if packed else 4
    shape_doc = "[T_local, H, D]" if packed else "[B, S_local, H, D]"
    if layout not in LAYOUTS:
        return f"unknown layout {layout!r}: expected one of {LAYOUTS}"
    if dropout_p != 0.0:
        return "dropout_p > 0 is not supported by ring attention (attention dropout is rarely used in LLMs)"
    if alibi_slopes is not None:
        return "alibi_slopes is not supported by ring attention"
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        return f"window_size must be a pair (left, right) with -1 for unbounded, got {window_size!r}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            return f"{name} must be a tensor {shape_doc}, got {getattr(t, 'shape', type(t))}"
        if t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}: expected float16, bfloat16 or float32"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (q.device == k.device == v.device):
        return "q, k, v must be on one device"
    if k.shape[:-1] != v.shape[:-1]:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in batch, length or heads"
    if q.shape[:-2] != k.shape[:-2]:
        return (
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must hold the same tokens (ring attention shards "
            "queries and keys together)"
        )
    if q.shape[-1] != k.shape[-1]:
        return f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}"
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        return f"head dims up to 256 are supported, got {q.shape[-1]} / {v.shape[-1]}"
    if q.shape[-2] % k.shape[-2]:
        return f"q heads ({q.shape[-2]}) must be a multiple of kv heads ({k.shape[-2]})"
    n_local = q.shape[0] if packed else q.shape[1]
    if packed:
        if len(cu_list) < 2 or cu_list[0] != 0 or any(b < a for a, b in itertools.pairwise(cu_list)):
            return "cu_seqlens must start at 0 and not decrease"
        if cu_list[-1] != world * n_local:
            return (
                f"cu_seqlens must describe the whole packed stream across the ring (global cu_seqlens): "
                f"its total is {cu_list[-1]}, but world_size * local tokens = {world} * {n_local} = "
                f"{world * n_local}. Pass the global cu_seqlens, not the cu_seqlens of this rank's shard."
            )
        return None
    return local_len_error(layout, world, n_local)


@functools.cache
def _node_id() -> int:
    """A number for this host (the same in every process on it); read once, not on every call."""
    return zlib.crc32(socket.gethostname().encode())


def _signature(
    q, k, v, layout, causal, window_size, softcap, scale, cu_list, members, transport="nccl", prefetch=1
) -> list[int]:
    packed = cu_list is not None
    shape = (1,) + tuple(q.shape) if packed else tuple(q.shape)
    wl, wr = (int(window_size[0]), int(window_size[1])) if len(window_size) == 2 else (0, 0)
    return [
        LAYOUTS.index(layout) if layout in LAYOUTS else -1,
        int(bool(causal)),
        wl,
        wr,
        _fbits(softcap),
        _fbits(scale if scale is not None else -1.0),
        int(packed),
        shape[0],
        shape[1],
        shape[2],
        k.shape[-2],
        q.shape[-1],
        v.shape[-1],
        _DTYPES.get(q.dtype, 0),
        cu_list[-1] if packed else -1,
        hash(tuple(cu_list)) & (2**62 - 1) if packed else -1,
        hash(tuple(members)) & (2**62 - 1),
        RING_TRANSPORTS.index(transport),
        _node_id() if transport == "copy_engine" else -1,
        prefetch,
    ]


_HOST_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def host_group(group, members: list[int]):
    """A group over the same ranks that takes CPU tensors: ``group`` itself unless it is NCCL-only,
    else a gloo group of ``members`` (global ranks), created on first use and kept.

    An argument check over NCCL would put a collective on the GPU stream and copy its result back,
    so every call would wait for all queued GPU work and the GPU would idle while the ring's
    kernels are launched; over gloo the check costs host time only.
    """
    backend = str(dist.get_backend(group))
    if "nccl" not in backend or "gloo" in backend:
        return group
    key = tuple(members)
    if key not in _HOST_GROUPS:
        try:
            _HOST_GROUPS[key] = dist.new_group(list(key), backend="gloo", use_local_synchronization=True)
        except (RuntimeError, ValueError):  # a build without gloo: check over NCCL (see gather_rows)
            _HOST_GROUPS[key] = None
    return _HOST_GROUPS[key]


def gather_rows(row: torch.Tensor, group, members: list[int]) -> torch.Tensor:
    """All-gather a small int64 CPU ``row`` over ``group`` on the host: ``[world, len(row)]``."""
    hg = host_group(group, members)
    if hg is None:  # NCCL only: through the device (this syncs the host with the GPU)
        dev = torch.device("cuda", torch.cuda.current_device())
        rows = [torch.empty_like(row, device=dev) for _ in members]
        dist.all_gather(rows, row.to(dev), group=group)
        return torch.stack(rows).cpu()
    rows = [torch.empty_like(row) for _ in members]
    dist.all_gather(rows, row, group=hg)
    return torch.stack(rows)


def check_collectively(group, world: int, err: str | None, sig: list[int], members: list[int]) -> None:
    """Raise ``ValueError`` on every rank when any rank's ``err`` is set or the signatures differ."""
    if world == 1:
        if err:
            raise ValueError(err)
        return
    mine = torch.tensor([1 if err else 0] + sig, dtype=torch.int64)
    table = gather_rows(mine, group, members).tolist()
    if err:
        raise ValueError(f"{err} (raised on every rank of the ring)")
    bad = [r for r, row in enumerate(table) if row[0]]
    if bad:
        raise ValueError(
            f"rank(s) {bad} of the ring got invalid arguments (their error says which); every rank raises"
        )
    for f, name in enumerate(_SIG_FIELDS, start=1):
        vals = [row[f] for row in table]
        if len(set(vals)) > 1:
            if name in ("softcap", "softmax_scale"):
                vals = [struct.unpack("<d", struct.pack("<q", x))[0] for x in vals]
            hint = _SIG_HINTS.get(name, "")
            if name == "ring transport":
                vals = [RING_TRANSPORTS[x] for x in vals]
            raise ValueError(f"ranks of the ring disagree on {name}: {vals} by rank{hint}")


# Plans depend only on these arguments and are read-only once built (their pieces only cache device
# copies of their own index lists), so a training loop builds each one once: building one costs
# hundreds of microseconds of host time at 8 ranks.
@functools.lru_cache(maxsize=256)
def _cached_plan(layout, rank, world, n_local, causal, window) -> Plan:
    return build_plan(layout, rank, world, n_local, causal, window)


@functools.lru_cache(maxsize=64)
def _cached_varlen_plan(cu, rank, world, n_local, causal, window) -> Plan:
    return build_varlen_plan(list(cu), rank, world, n_local, causal, window)


class RingAttention(torch.autograd.Function):
    """Autograd for one ring: forward and backward both run ``ring_loop`` over the same plan."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        plan: Plan,
        scale: float,
        softcap: float,
        group,
        packed: bool,
        transport: str,
        prefetch: int,
    ):
        k, v = k.contiguous(), v.contiguous()
        comm = _comm(group, plan, transport, q.device)
        backend = backend_for(q)
        loop = ring_fwd_loop(backend, q, k, v, plan, scale, softcap, packed, prefetch)
        out32, lse = run_on_group(loop, comm)
        out = out32.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.softcap, ctx.group, ctx.packed = plan, scale, softcap, group, packed
        ctx.transport = transport
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        comm = _comm(ctx.group, ctx.plan, ctx.transport, q.device)
        loop = ring_bwd_loop(
            backend_for(q), dout.contiguous(), q, k, v, out, lse, ctx.plan, ctx.scale, ctx.softcap, ctx.packed
        )
        dq, dk, dv = run_on_group(loop, comm)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def _comm(group, plan: Plan, transport: str, device: torch.device) -> RingComm | None:
    """The ring's communicator: with ``transport="copy_engine"`` the K/V and the travelling dK/dV go
    to the next rank by copy engine (a dK/dV sent home over several hops goes through the group)."""
    if plan.world == 1:
        return None
    tags = (TAG_KV, TAG_DKV) if transport == "copy_engine" else ()
    return RingComm(group, copy_engine_tags=tags, device=device)


def forward_prefetch(transport: str) -> int:
    """K/V blocks the ring's forward holds at once: ``use_ring_prefetch``'s choice, or 1 under the
    copy-engine transport (its receive slots are passed on one rank ahead, and only by copy
    engine, so a held block cannot also travel further ahead)."""
    return 1 if transport == "copy_engine" else ring_prefetch()


def _transport_error(q: torch.Tensor, group, world: int, transport: str) -> str | None:
    if transport != "copy_engine" or world == 1:
        return None
    if not q.is_cuda or dist.get_backend(group) != "nccl" or not copy_engine_available():
        return (
            'use_ring_transport("copy_engine") needs CUDA tensors, an NCCL group and PyTorch symmetric '
            f"memory (got {q.device.type} tensors, a {dist.get_backend(group)} group)"
        )
    return None


def _ring(
    q,
    k,
    v,
    layout,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    return_attn_probs,
    group,
    cu_seqlens=None,
    pre_error=None,
):
    g, rank, world = group_rank_world(group)
    cu_list = None
    if cu_seqlens is not None:
        cu_list = [
            int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)
        ]
    transport = ring_transport()
    prefetch = forward_prefetch(transport)
    err = pre_error or _local_error(q, k, v, layout, dropout_p, alibi_slopes, window_size, world, cu_list)
    err = err or _transport_error(q, g, world, transport)
    members = [dist.get_global_rank(g, r) for r in range(world)] if g is not None else [0]
    sig = (
        _signature(
            q,
            k,
            v,
            layout,
            causal,
            window_size,
            softcap,
            softmax_scale,
            cu_list,
            members,
            transport,
            prefetch,
        )
        if not err
        else []
    )
    if err:
        sig = [0] * len(_SIG_FIELDS)
    check_collectively(g, world, err, sig, members)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    window = (int(window_size[0]), int(window_size[1]))
    if cu_list is None:
        plan = _cached_plan(layout, rank, world, q.shape[1], bool(causal), window)
    else:
        plan = _cached_varlen_plan(tuple(cu_list), rank, world, q.shape[0], bool(causal), window)
    packed = cu_list is not None
    out, lse = RingAttention.apply(
        q, k, v, plan, float(scale), float(softcap), g, packed, transport, prefetch
    )
    return (out, lse, None) if return_attn_probs else out


_ARGS_DOC = """
    Args:
        q: ``[B, S_local, Hq, D]``, this rank's shard of the queries in the function's layout.
        k, v: ``[B, S_local, Hk, D]`` with ``Hq % Hk == 0`` (GQA/MQA; only the KV heads travel).
        dropout_p: must be 0 (dropout is not supported).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: causal mask on global positions.
        window_size: ``(left, right)`` sliding window on global positions, -1 for unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` when > 0.
        alibi_slopes: must be None (not supported).
        deterministic: accepted for compatibility; the ring is always deterministic.
        return_attn_probs: also return the float32 LSE ``[B, Hq, S_local]`` as ``(out, lse, None)``.
        group: the ring's process group (None: the default group; not initialised: run locally).
            K/V travel through its send/receive, or by the GPUs' copy engines inside
            ``ringflash.use_ring_transport("copy_engine")`` (one node, NCCL).

    Returns:
        ``out [B, S_local, Hq, D]`` in q's dtype (or ``(out, lse, None)``).
"""


def _padded(layout: str, doc: str):
    def fn(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
    ):
        return _ring(
            q,
            k,
            v,
            layout,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            return_attn_probs,
            group,
        )

    fn.__doc__ = doc + _ARGS_DOC
    return fn


ring_flash_attn_func = _padded(
    "contiguous",
    """Ring attention over contiguous shards: rank ``r`` holds tokens ``[r*S/W, (r+1)*S/W)``.

    With ``causal=True`` the last rank does ``W`` times the work of the first; prefer zigzag or
    stripe for causal training.

    Example:
        >>> q, k, v = (shard(x, group, layout="contiguous") for x in (q_full, k_full, v_full))
        >>> out = ring_flash_attn_func(q, k, v, causal=True, group=group)
""",
)
ring_flash_attn_func.__name__ = ring_flash_attn_func.__qualname__ = "ring_flash_attn_func"

zigzag_ring_flash_attn_func = _padded(
    "zigzag",
    """Ring attention over zigzag shards: the sequence is cut into ``2W`` chunks and rank ``r``
    holds chunks ``r`` and ``2W-1-r`` (``S_local`` even), which balances causal work exactly.

    Example:
        >>> q, k, v = (shard(x, group, layout="zigzag") for x in (q_full, k_full, v_full))
        >>> out = zigzag_ring_flash_attn_func(q, k, v, causal=True, group=group)
""",
)
zigzag_ring_flash_attn_func.__name__ = zigzag_ring_flash_attn_func.__qualname__ = (
    "zigzag_ring_flash_attn_func"
)

stripe_flash_attn_func = _padded(
    "stripe",
    """Ring attention over striped shards: token ``t`` goes to rank ``t % W`` (stripes of one token),
    which balances causal work; each step's causal mask is the local diagonal (``diag=0`` for keys
    of ranks ``<= r``, ``-1`` for later ranks).

    Example:
        >>> q, k, v = (shard(x, group, layout="stripe") for x in (q_full, k_full, v_full))
        >>> out = stripe_flash_attn_func(q, k, v, causal=True, group=group)
""",
)
stripe_flash_attn_func.__name__ = stripe_flash_attn_func.__qualname__ = "stripe_flash_attn_func"


def _unpack(x: torch.Tensor, n: int, dim: int, name: str):
    """Split a packed ``x`` along ``dim`` (size ``n``) into views; an error string when it is malformed."""
    if not isinstance(x, torch.Tensor) or x.dim() <= dim or x.shape[dim] != n:
        return [x] * n, f"{name} must have size {n} at dim {dim}, got {getattr(x, 'shape', type(x))}"
    return list(x.unbind(dim)), None


def _kvpacked(layout: str, name: str):
    def fn(
        q,
        kv,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
    ):
        (k, v), err = _unpack(kv, 2, 2, "kv [B, S_local, 2, Hk, D]")
        return _ring(
            q,
            k,
            v,
            layout,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            return_attn_probs,
            group,
            pre_error=err,
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"""``{name.replace("kvpacked_", "")}`` with ``kv [B, S_local, 2, Hk, D]`` packed."""
    return fn


def _qkvpacked(layout: str, name: str):
    def fn(
        qkv,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
    ):
        (q, k, v), err = _unpack(qkv, 3, 2, "qkv [B, S_local, 3, H, D]")
        return _ring(
            q,
            k,
            v,
            layout,
            dropout_p,
            softmax_scale,
            causal,
            window_size,
            softcap,
            alibi_slopes,
            return_attn_probs,
            group,
            pre_error=err,
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"""``{name.replace("qkvpacked_", "")}`` with ``qkv [B, S_local, 3, H, D]`` packed."""
    return fn


ring_flash_attn_kvpacked_func = _kvpacked("contiguous", "ring_flash_attn_kvpacked_func")
ring_flash_attn_qkvpacked_func = _qkvpacked("contiguous", "ring_flash_attn_qkvpacked_func")
zigzag_ring_flash_attn_kvpacked_func = _kvpacked("zigzag", "zigzag_ring_flash_attn_kvpacked_func")
zigzag_ring_flash_attn_qkvpacked_func = _qkvpacked("zigzag", "zigzag_ring_flash_attn_qkvpacked_func")
stripe_flash_attn_kvpacked_func = _kvpacked("stripe", "stripe_flash_attn_kvpacked_func")
stripe_flash_attn_qkvpacked_func = _qkvpacked("stripe", "stripe_flash_attn_qkvpacked_func")


def ring_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    group=None,
):
    """Ring attention over a packed stream of documents sharded contiguously across the ring.

    ``cu_seqlens`` describes the WHOLE packed stream (all ranks' tokens, the same on every rank);
    rank ``r`` holds tokens ``[r*T/W, (r+1)*T/W)`` of it. Documents may cross shard boundaries;
    only the total ``T`` must divide by the world size. Each document attends only to itself.

    Args:
        q: ``[T_local, Hq, D]``; k, v: ``[T_local, Hk, D]``: this rank's shard.
        cu_seqlens: int ``[N + 1]``, global cumulative document lengths, ``cu_seqlens[-1] == W * T_local``.
        max_seqlen: the longest document (accepted for compatibility; lengths come from cu_seqlens).
        Other arguments as for ``ring_flash_attn_func``.

    Returns:
        ``out [T_local, Hq, D]`` in q's dtype, or ``(out, lse [Hq, T_local] float32, None)``.

    Example:
        >>> cu = torch.tensor([0, 700, 1500, 4096], dtype=torch.int32)   # 3 documents, 4 ranks
        >>> q, k, v = (shard(x, group, dim=0, layout="contiguous") for x in (q_all, k_all, v_all))
        >>> out = ring_flash_attn_varlen_func(q, k, v, cu, 2596, causal=True, group=group)
    """
    if cu_seqlens is None:
        cu_seqlens = [0, 0]
    return _ring(
        q,
        k,
        v,
        "contiguous",
        dropout_p,
        softmax_scale,
        causal,
        window_size,
        softcap,
        alibi_slopes,
        return_attn_probs,
        group,
        cu_seqlens=cu_seqlens,
    )


def ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, *args, **kwargs):
    """``ring_flash_attn_varlen_func`` with ``kv [T_local, 2, Hk, D]`` packed."""
    (k, v), err = _unpack(kv, 2, 1, "kv [T_local, 2, Hk, D]")
    if err:
        return _ring(
            q,
            k,
            v,
            "contiguous",
            0.0,
            None,
            False,
            (-1, -1),
            0.0,
            None,
            False,
            kwargs.get("group"),
            cu_seqlens=cu_seqlens,
            pre_error=err,
        )
    return ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs)


def ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kwargs):
    """``ring_flash_attn_varlen_func`` with ``qkv [T_local, 3, H, D]`` packed."""
    (q, k, v), err = _unpack(qkv, 3, 1, "qkv [T_local, 3, H, D]")
    if err:
        return _ring(
            q,
            k,
            v,
            "contiguous",
            0.0,
            None,
            False,
            (-1, -1),
            0.0,
            None,
            False,
            kwargs.get("group"),
            cu_seqlens=cu_seqlens,
            pre_error=err,
        )
    return ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs)
