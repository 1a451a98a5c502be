"""DeepSpeed sequence parallelism (DeepSpeed-Ulysses) with ringflash kernels, past the head-count limit.

Two ways in:

1. ringflash as the ``local_attention`` of DeepSpeed's own ``deepspeed.sequence.layer.DistributedAttention``
   (``scatter_idx=2``; DeepSpeed >= 0.14 picks the gathered layout from ``batch_dim_idx``, older
   versions want ``gather_idx=1`` for ``[B, S, H, D]``). After DeepSpeed's all-to-all the local
   attention sees ``[B, S, H/P, D]`` (``batch_dim_idx=0``), which is exactly ``flash_attn_func``'s
   layout, so ``flash_attn_func`` itself can be passed. ``local_attention(...)`` below returns an
   adapter that also handles ``batch_dim_idx=1`` (``[S, B, H/P, D]``) and fixes default options::

       from deepspeed.sequence.layer import DistributedAttention
       from ringflash.integrations.deepspeed import local_attention
       attn = DistributedAttention(local_attention(causal=True), sp_group, scatter_idx=2, gather_idx=1)
       out = attn(q, k, v, 0)      # q, k, v: [B, S/P, H, D] (batch_dim_idx 0)

   DeepSpeed's all-to-all needs the head counts to divide by ``P`` (its uneven path needs at least
   ``P`` KV heads): with 8 KV heads Ulysses stops at 8 ranks.

2. ``ringflash.integrations.deepspeed.DistributedAttention``: a drop-in with DeepSpeed's constructor
   and forward signature that picks the algorithm from the head count ``Hq`` and ``P``:
   Ulysses when ``P`` divides ``Hq`` (KV heads replicated as needed, so GQA/MQA with ``Hk < P``
   works), ring attention when ``gcd(Hq, P) = 1``, and the hybrid (Ulysses over ``U = gcd(Hq, P)``
   consecutive ranks x ring over ``P / U``) in between. The sequence is sharded contiguously over
   the group, as for DeepSpeed-Ulysses (rank r holds ``[r*S/P, (r+1)*S/P)``). Swap the import::

       from ringflash.integrations.deepspeed import DistributedAttention
       attn = DistributedAttention(None, sp_group)        # None: ringflash's kernels
       out = attn(q, k, v, 0, causal=True)

This module needs no DeepSpeed to import; DeepSpeed's process groups are torch process groups.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checks import check_qkv, check_tensor
from ..comm.agree import agree
from ..comm.alltoall import seq_all_to_all
from ..comm.groups import build_usp_groups, group_rank_world
from ..ops import flash_attn_func
from ..parallel.hybrid import usp_attn_func, usp_degrees
from ..parallel.layouts import DOC_LAYOUTS
from ..parallel.ring_funcs import ring_flash_attn_func, ring_flash_attn_varlen_func
from ..parallel.ulysses import kv_replication, ulysses_attn_func, ulysses_attn_varlen_func
from .packing import check_cu_pair, global_cu_seqlens, longest_document

# Keyword arguments that mark a packed batch, as transformers passes them (see ``.packing``).
_PACKED_MARKS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")

_FLASH_ARGS = (
    "dropout_p",
    "softmax_scale",
    "causal",
    "window_size",
    "softcap",
    "alibi_slopes",
    "deterministic",
    "return_attn_probs",
)


def _flash_kwargs(args: tuple, kwargs: dict) -> dict:
    """flash_attn_func's options from positional ``args`` (in its order after q, k, v) and ``kwargs``."""
    if len(args) > len(_FLASH_ARGS):
        raise ValueError(f"too many positional options ({len(args)}): flash_attn_func takes {_FLASH_ARGS}")
    out = dict(zip(_FLASH_ARGS, args, strict=False))
    for key, val in kwargs.items():
        if key not in _FLASH_ARGS:
            raise ValueError(f"unknown attention option {key!r}: expected one of {_FLASH_ARGS}")
        if key in out:
            raise ValueError(f"attention option {key!r} given twice")
        out[key] = val
    return out


_HINTS = {"position_ids shape": " (every rank passes the position ids of its own shard: [B, S / P])"}


def _check_marks(marks: dict, marked_by: str | None, query, batch_dim_idx: int) -> None:
    """Raise ``ValueError`` unless the packed-batch marks fit ``query``: ``cu_seq_lens_q`` with one
    row and the same documents as ``cu_seq_lens_k``; ``position_ids`` ``[B or 1, S_local]``."""
    b, s = (query.shape[0], query.shape[1]) if batch_dim_idx == 0 else (query.shape[1], query.shape[0])
    if marked_by == "cu_seq_lens_q":
        if b != 1:
            raise ValueError(f"a packed batch (cu_seq_lens_q) is one row of documents, got {b} rows")
        check_cu_pair(marks["cu_seq_lens_q"], marks["cu_seq_lens_k"])
    elif marks["cu_seq_lens_k"] is not None:
        raise ValueError("cu_seq_lens_k given without cu_seq_lens_q: pass both (the same documents)")
    pos = marks["position_ids"]
    if pos is not None and (
        not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] not in (1, b) or pos.shape[1] != s
    ):
        got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        rows = f"{b} (or 1)" if b != 1 else "1"
        raise ValueError(f"position_ids must be this rank's [B={rows}, S_local={s}], got {got}")


def local_attention(batch_dim_idx: int = 0, **defaults: Any):
    """A ``local_attention`` for DeepSpeed's ``DistributedAttention`` running ringflash's kernel.

    Args:
        batch_dim_idx: the ``batch_dim_idx`` you pass to DeepSpeed's forward: 0 when the local
            attention receives ``[B, S, H/P, D]``, 1 for ``[S, B, H/P, D]``.
        **defaults: ``flash_attn_func`` options (``causal=True``, ``softmax_scale``, ...) used unless
            the forward's extra arguments override them.

    Returns:
        ``fn(q, k, v, *args, **kwargs) -> out`` in the layout it was given.

    Example:
        >>> attn = deepspeed.sequence.layer.DistributedAttention(local_attention(causal=True), group, 2, 1)
    """
    if batch_dim_idx not in (0, 1):
        raise ValueError(f"batch_dim_idx must be 0 ([B, S, H, D]) or 1 ([S, B, H, D]), got {batch_dim_idx}")

    def attn(q, k, v, *args, **kwargs):
        opts = {**defaults, **_flash_kwargs(args, kwargs)}
        if batch_dim_idx == 1:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out = flash_attn_func(q, k, v, **opts)
        if isinstance(out, tuple):
            out = out[0]
        return out.transpose(0, 1) if batch_dim_idx == 1 else out

    attn.__name__ = "ringflash_local_attention"
    return attn


# Creation order of the drop-in's modules: the first one built over a group (a model's first layer)
# gathers a packed batch's position ids anew on every rank (``global_cu_seqlens``'s ``refresh``).
_BUILT = itertools.count()
_LIVE: weakref.WeakSet = weakref.WeakSet()


class DistributedAttention(nn.Module):
    """Drop-in for ``deepspeed.sequence.layer.DistributedAttention`` that goes past the head-count limit.

    Args:
        local_attention: None (or ``ringflash.flash_attn_func``): ringflash chooses Ulysses, ring or
            the hybrid. Any other callable ``(q, k, v, *args, **kwargs)`` is run inside Ulysses as
            DeepSpeed does (then ``Hq`` must divide by ``P``; KV heads are replicated as needed).
        sequence_process_group: the sequence-parallel group of ``P`` ranks (None: default group).
        scatter_idx: must be 2 (the head dim), as in DeepSpeed's default.
        gather_idx: accepted for compatibility; the sequence dim follows from ``batch_dim_idx``.
        sp_stream: accepted for compatibility (communication is not overlapped on a side stream).
        num_kv_heads: accepted for compatibility (read from ``key``).
        layout: the ring layout of the hybrid/ring paths; ``"contiguous"`` (default) is the sharding
            DeepSpeed users already feed; ``"zigzag"`` balances causal work but then the sequence must
            be sharded with ``ringflash.parallel.hybrid.usp_shard``.

    Forward:
        ``forward(query, key, value, batch_dim_idx, rotary_pos_emb=None, *args, **kwargs)`` with
        ``query [B, S/P, Hq, D]`` (``batch_dim_idx=0``) or ``[S/P, B, Hq, D]`` (``batch_dim_idx=1``),
        key/value with ``Hk`` heads; ``args``/``kwargs`` are ``flash_attn_func`` options (``causal``,
        ``softmax_scale``, ...) or go to the custom ``local_attention``. Returns the output in the
        query's layout. A packed batch (one row of documents, B = 1) is marked as transformers marks
        it: ``position_ids=`` (this rank's, restarting at 0 for every document) or
        ``cu_seq_lens_q=``/``cu_seq_lens_k=`` (the global documents); every document then attends
        only to itself (Ulysses when the heads divide by ``P``, else the ring; see
        ``ringflash.integrations.packing``).

    Example:
        >>> attn = DistributedAttention(None, sp_group)              # P = 16, Llama-3-8B: 32 q / 8 kv heads
        >>> out = attn(q, k, v, 0, causal=True)                      # Ulysses, KV heads repeated twice
        >>> out = attn(q, k, v, 0, causal=True, cu_seq_lens_q=cu)    # packed documents [1, S/P, H, D]
    """

    def __init__(
        self,
        local_attention: Any,
        sequence_process_group: dist.ProcessGroup | None,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        sp_stream=None,
        num_kv_heads: int | None = None,
        layout: str = "contiguous",
    ) -> None:
        super().__init__()
        if scatter_idx != 2:
            raise ValueError(
                f"scatter_idx must be 2 (the head dim of [B, S, H, D] / [S, B, H, D]), got {scatter_idx}"
            )
        if layout not in DOC_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: expected one of {DOC_LAYOUTS}")
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx, self.gather_idx, self.sp_stream = scatter_idx, gather_idx, sp_stream
        self.num_kv_heads = num_kv_heads
        self.layout = layout
        self._grids: dict[tuple[int, int], tuple] = {}
        self._order = next(_BUILT)
        _LIVE.add(self)

    def _first_of_its_group(self) -> bool:
        """Whether no live module over this group was built before this one: every rank builds its
        model's layers in the same order, so the ranks agree on it without a message."""
        return self._order == min(m._order for m in list(_LIVE) if m.spg is self.spg)

    def _ours(self) -> bool:
        return self.local_attn is None or self.local_attn is flash_attn_func

    def plan(self, nheads: int) -> tuple[str, int, int]:
        """``(algorithm, ulysses_degree, ring_degree)`` for ``nheads`` query heads on this group."""
        _, _, world = group_rank_world(self.spg)
        if not self._ours():
            return "ulysses", world, 1
        u, r = usp_degrees(nheads, world)
        return ("ulysses" if r == 1 else "ring" if u == 1 else "hybrid"), u, r

    def _grid(self, u: int, r: int):
        if (u, r) not in self._grids:  # only this group's ranks take part (local synchronisation)
            self._grids[(u, r)] = tuple(build_usp_groups(u, r, self.spg, local_sync=True))
        return self._grids[(u, r)]

    def forward(self, query, key, value, batch_dim_idx: int = 0, rotary_pos_emb=None, *args, **kwargs):
        g, rank, world = group_rank_world(self.spg)
        marks = {n: kwargs.pop(n, None) for n in _PACKED_MARKS}
        plan, err, opts = None, None, None
        marked_by = next((n for n in ("cu_seq_lens_q", "position_ids") if marks[n] is not None), None)
        try:
            if batch_dim_idx not in (0, 1):
                raise ValueError(f"batch_dim_idx must be 0 or 1, got {batch_dim_idx}")
            if rotary_pos_emb is not None:
                raise ValueError(
                    "rotary_pos_emb is not supported by ringflash's DistributedAttention: apply rotary "
                    "embeddings to the local shard before the call, with the shard's global positions"
                )
            check_tensor(query, "query", 4, "[B, S/P, H, D] or [S/P, B, H, D]")
            if not self._ours():  # the user's kernel runs inside Ulysses: check what it needs
                self._check_custom(query, key, value, world)
            else:  # the kernels' own checks, so a rank's bad tensors are reported as such
                check_qkv(*(x.transpose(0, 1) if batch_dim_idx else x for x in (query, key, value)))
            plan = self.plan(query.shape[2])
            if self.layout == "balanced" and marked_by is None:
                raise ValueError(
                    "the balanced layout places whole documents: it takes a packed batch (position_ids= or "
                    "cu_seq_lens_q=); shard single sequences with layout 'contiguous', 'zigzag' or 'stripe'"
                )
            # Parsed before any collective: a bad option on one rank is an error on every rank.
            opts = _flash_kwargs(args, kwargs) if self._ours() else None
            if opts and opts.get("return_attn_probs"):
                raise ValueError("return_attn_probs is not supported through DistributedAttention")
            _check_marks(marks, marked_by, query, batch_dim_idx)
        except (ValueError, TypeError) as e:
            err = e
        # The algorithm follows the head count and the packed path the marks, so ranks that differ
        # in either would run different collectives: they agree over the whole group before
        # anything moves. A call whose every next collective is an agreement over this same group
        # (Ulysses and the contiguous ring agree first thing, and so does the position ids' gather)
        # lets that one decide, since any two agreements over a group meet; an error found here,
        # the hybrid's sub-groups and a custom kernel need this one.
        if (
            err is not None
            or not self._ours()
            or plan[0] == "hybrid"
            or (plan[0] == "ring" and self.layout != "contiguous")
        ):
            fields = {}
            if plan:
                pos = marks["position_ids"]
                fields = {
                    "DistributedAttention plan": plan,
                    "batch_dim_idx": batch_dim_idx,
                    "shapes": (tuple(query.shape), tuple(key.shape), str(query.dtype)),
                    "packed batch marked by": marked_by,
                    "position_ids shape": tuple(pos.shape) if marked_by == "position_ids" else None,
                }
            agree([(g, world)], err, fields, "the sequence-parallel group", _HINTS)
        algo, u, r = plan
        if batch_dim_idx == 1:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not self._ours():
            out = self._custom_ulysses(query, key, value, batch_dim_idx, args, kwargs)
        else:
            cu = None
            if marked_by is not None:
                refresh = self._first_of_its_group()
                cu = global_cu_seqlens(
                    g,
                    rank,
                    world,
                    self.layout,
                    *marks.values(),
                    refresh=refresh,
                    unpacked=self._usp_grid(plan),
                )
            if cu is not None:
                out = self._packed(query, key, value, cu, algo, opts)
            elif algo == "ulysses":
                out = ulysses_attn_func(query, key, value, group=self.spg, **opts)
            elif algo == "ring" and self.layout == "contiguous":
                out = ring_flash_attn_func(query, key, value, group=self.spg, **opts)
            else:
                uly, ring = self._grid(u, r)
                out = usp_attn_func(
                    query, key, value, ulysses_group=uly, ring_group=ring, layout=self.layout, **opts
                )
        return out.transpose(0, 1) if batch_dim_idx == 1 else out

    def _usp_grid(self, plan) -> tuple | None:
        """How the unpacked path takes one sequence's shards, as ``global_cu_seqlens``'s
        ``unpacked``: ``(U, R, layout)`` of ``usp_shard`` (Ulysses alone and the contiguous ring
        take contiguous shards: ``(W, 1, "contiguous")``); None for the balanced layout, which
        places documents only."""
        algo, u, r = plan
        if self.layout == "balanced":
            return None
        if algo == "ulysses" or self.layout == "contiguous":
            return (u * r, 1, "contiguous")
        return (u, r, self.layout)

    def _packed(self, q, k, v, cu, algo, opts):
        """A packed batch (one row of documents, ``cu`` the global ones): Ulysses when the heads
        divide by the group and the stream is sharded contiguously, else the ring (any degree)."""
        if q.shape[0] != 1:
            raise ValueError(f"a packed batch is one row of documents, got {q.shape[0]} rows")
        longest = longest_document(cu)
        if algo == "ulysses" and self.layout == "contiguous":
            out = ulysses_attn_varlen_func(q[0], k[0], v[0], cu, longest, group=self.spg, **opts)
        else:
            out = ring_flash_attn_varlen_func(
                q[0], k[0], v[0], cu, longest, group=self.spg, layout=self.layout, **opts
            )
        return (
            tuple(x.unsqueeze(0) if i == 0 else x for i, x in enumerate(out))
            if isinstance(out, tuple)
            else out.unsqueeze(0)
        )

    @staticmethod
    def _check_custom(q, k, v, world):
        check_qkv(q, k, v, same_tokens=True)
        hq = q.shape[2]
        if hq % world:
            raise ValueError(
                f"a custom local_attention runs inside Ulysses, which needs the q heads ({hq}) to divide by "
                f"the sequence-parallel size ({world}); pass local_attention=None to let ringflash use "
                "ring / hybrid attention beyond the head count"
            )

    def _custom_ulysses(self, q, k, v, batch_dim_idx, args, kwargs):
        """Ulysses around a user's local attention, which sees DeepSpeed's post-all-to-all layout."""
        g, _, world = group_rank_world(self.spg)
        hq, hk = q.shape[2], k.shape[2]
        f = kv_replication(hq, hk, world)
        if f > 1:
            k, v = k.repeat_interleave(f, 2), v.repeat_interleave(f, 2)
        qh, kh, vh = seq_all_to_all([q, k, v], [2, 2, 2], [1, 1, 1], g)
        if batch_dim_idx == 1:
            qh, kh, vh = (x.transpose(0, 1) for x in (qh, kh, vh))
        out = self.local_attn(qh, kh, vh, *args, **kwargs)
        if batch_dim_idx == 1:
            out = out.transpose(0, 1)
        return seq_all_to_all([out], [1], [2], g)[0]


def sequence_parallel_degrees(nheads: int, world: int) -> tuple[int, int]:
    """``(ulysses_degree, ring_degree)`` the drop-in uses for ``nheads`` query heads over ``world`` ranks."""
    return usp_degrees(nheads, world)


__all__ = ["DistributedAttention", "local_attention", "sequence_parallel_degrees"]
