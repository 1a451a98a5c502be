"""Packed batches as frameworks pass them: the global documents of a stream sharded over ranks.

transformers (and DeepSpeed's sequence parallelism) mark packed documents in two ways:
``cu_seq_lens_q``/``cu_seq_lens_k`` keyword arguments (``DataCollatorWithFlattening(
return_flash_attn_kwargs=True)``), which here describe the GLOBAL stream that every rank loaded
before sharding, or ``position_ids`` that restart at 0 for every document. With only position
ids, each rank holds those of its own tokens: one small all-gather of them rebuilds the stream's
position ids (contiguous and stripe shards are the stream in a known order), and a document starts
wherever a position does not follow the one before it. Zigzag shards of a packed stream are cut per
document, so their order cannot be rebuilt from positions alone: pass ``cu_seq_lens_q`` then.

The result is cached for the last ``position_ids`` tensor seen (a model passes the same tensor to
every layer, and every rank does so alike), so a forward pays one gather, not one per layer.
"""

from __future__ import annotations

import weakref

import torch

from ..comm.agree import agree
from ..comm.gather import all_gather_flat
from ..parallel.hybrid import usp_positions_for
from ..parallel.layouts import positions

_last: dict = {}
_HINTS = {"position_ids shape": " (every rank passes the position ids of its own shard: [1, S / W])"}


def check_cu_pair(cu_q, cu_k) -> torch.Tensor:
    if cu_k is not None and cu_k is not cu_q and not _same_values(cu_q, cu_k):
        raise ValueError(
            "cu_seq_lens_q and cu_seq_lens_k differ: sequence-parallel self-attention needs one set of "
            "documents for queries and keys"
        )
    return cu_q


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values; compared where they are when on one device (one read of the
    verdict instead of two copies to the host)."""
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    return torch.equal(a, b)


def _stream(parts: torch.Tensor, layout: str) -> torch.Tensor:
    """The stream's values from every rank's shard ``parts [W, n_local]`` (contiguous or stripe)."""
    return parts.t().reshape(-1) if layout == "stripe" else parts.reshape(-1)


def global_cu_seqlens(
    group,
    rank: int,
    world: int,
    layout: str,
    position_ids=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    refresh: bool = False,
    unpacked=None,
) -> torch.Tensor | None:
    """The packed stream's global ``cu_seqlens`` (int32, on the CPU), or None when each batch row
    is one sequence (no documents marked). Every rank of ``group`` must call it alike.

    Args:
        position_ids: this rank's ``[B, S_local]`` position ids (B must be 1 for a packed stream).
        cu_seq_lens_q, cu_seq_lens_k: the global documents, when the data pipeline gives them;
            copied to the CPU, where the parallel calls read them without a device sync.
        refresh: gather the position ids (or copy ``cu_seq_lens_q``) even when this very tensor,
            unmodified as far as torch knows, was read by the last call. The cache serves a model's
            later layers, which all get the same tensor; its hit is decided on each rank alone, so
            the first layer of every forward refreshes on every rank alike: a tensor reused across
            steps and written where torch keeps no version (a collective into it, ``.data``,
            NumPy) is then neither stale nor the cause of one rank gathering while another does
            not (a hang).
        unpacked: for a caller whose single sequences are sharded otherwise than ``layout`` places
            a packed stream, ``(U, R, ring_layout)``: they are in ``usp_shard``'s order over a
            ``U x R`` grid. Position ids in that order are one sequence (None); any other stream
            is packed in ``layout``, a single document included, whose ``cu_seqlens`` is then
            ``[0, T]``.
    """
    if cu_seq_lens_q is not None:
        return _cached(cu_seq_lens_q, refresh, lambda: check_cu_pair(cu_seq_lens_q, cu_seq_lens_k).cpu())
    if world == 1:
        return _local_cu(position_ids)
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    gather = lambda: _gathered_cu(group, world, layout, position_ids, unpacked)  # noqa: E731
    return _cached(position_ids, refresh, gather, group, layout, unpacked)


def _cached(t: torch.Tensor, refresh: bool, compute, *context):
    """``compute()``, or what it gave the last call for this very tensor ``t`` (alive, the same
    torch version, the same ``context``) unless ``refresh``."""
    key = (id(t), t._version, *(c if isinstance(c, (str, tuple, type(None))) else id(c) for c in context))
    if not refresh and _last.get("key") == key and _last.get("ref") is not None and _last["ref"]() is t:
        return _last["cu"]
    cu = compute()
    _last.update(key=key, ref=weakref.ref(t), cu=cu)
    return cu


def _gathered_cu(group, world: int, layout: str, position_ids: torch.Tensor, unpacked=None):
    """The documents of a stream sharded contiguously or in stripes, from every rank's position
    ids (one all-gather, after the ranks agree on their shape: a gather of unequal shapes would
    abort gloo or hang NCCL instead of raising)."""
    agree([(group, world)], None, {"position_ids shape": tuple(position_ids.shape)}, "the group", _HINTS)
    pos = position_ids.reshape(-1)
    parts = all_gather_flat(pos, world, group).cpu()  # [W, S_local]
    n, p0 = parts.shape[1], int(parts.min())
    if unpacked is not None and all(
        torch.equal(parts[r], _usp_positions(unpacked, r, n) + p0) for r in range(world)
    ):
        return None
    whole = None if unpacked is None else torch.tensor([0, world * n], dtype=torch.int32)
    if layout in ("zigzag", "balanced"):
        if layout == "balanced" or not _one_sequence_zigzag(parts, world):
            raise ValueError(
                f"packed documents in the {layout} layout need the global cu_seqlens: pass cu_seq_lens_q "
                "(e.g. DataCollatorWithFlattening(return_flash_attn_kwargs=True), before sharding), or shard "
                "the stream contiguously or in stripes, whose position ids rebuild it"
            )
        return whole
    starts = _starts(_stream(parts, layout))
    return whole if starts is None else starts


def _usp_positions(grid: tuple, rank: int, n: int) -> torch.Tensor:
    """Positions of group rank ``rank``'s ``n`` tokens of one sequence in ``usp_shard``'s order over
    the grid ``(U, R, ring_layout)`` (Ulysses groups of ``U`` consecutive ranks)."""
    u, r, ring_layout = grid
    return usp_positions_for(rank % u, rank // u, u, r, n, ring_layout if r > 1 else "contiguous")


def _one_sequence_zigzag(parts: torch.Tensor, world: int) -> bool:
    """Whether every rank's positions are its padded zigzag positions of one sequence."""
    n = parts.shape[1]
    p0 = int(parts.min())
    return all(torch.equal(parts[r], positions("zigzag", r, world, n) + p0) for r in range(world))


def _starts(stream: torch.Tensor) -> torch.Tensor | None:
    """Documents of a stream of position ids: one starts wherever a position is not the previous
    one plus one. None for a single run."""
    breaks = (stream[1:] != stream[:-1] + 1).nonzero().flatten() + 1
    if breaks.numel() == 0:
        return None
    n = stream.numel()
    return torch.cat([torch.zeros(1, dtype=torch.int64), breaks, torch.tensor([n])]).to(torch.int32)


def longest_document(cu: torch.Tensor) -> int:
    """The longest document of ``cu`` (the ``max_seqlen`` of a varlen call); 0 for none."""
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _local_cu(position_ids) -> torch.Tensor | None:
    """One process: the documents of its own (whole) stream of position ids."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    return _starts(position_ids.reshape(-1).cpu())
