# Shapes use the papers' names (B, Sq, H, D, L) as in ringflash/kernels and blockwise.py.
# ruff: noqa: N806
"""Decoding with a KV cache sharded over the ranks of a process group.

Layout (contiguous): for every sequence ``b``, rank ``r`` holds one contiguous run of its keys,
global positions ``[key_offsets[b, r], key_offsets[b, r] + len[b, r])``, and the runs follow rank
order: ``key_offsets[b, r] = sum(len[b, :r])``. Lengths may be 0 on any rank. This is the layout a
contiguous ring / Ulysses prefill leaves behind (rank r holds tokens ``[r * L, (r + 1) * L)``).

One step: every rank attends the (replicated) query to its local shard with the split-KV kernel,
producing float32 partials ``(out_r, lse_r)``; ONE all_gather of the stacked partials (``B * Sq *
Hq * (D + 1)`` floats per rank, independent of the context length) and an exact LSE combine give
every rank the same result::

    lse = log sum_r exp(lse_r),   out = sum_r exp(lse_r - lse) out_r

Every rank combines the same gathered tensor in the same order, so the results are bitwise equal
across ranks. Shards with no key contribute ``lse = -inf`` (weight 0, never NaN).

Masks. With one query token and a causal mask every stored key is visible, and without a window
no positions are needed at all. With several query tokens (speculative decoding) and causal, or
with a sliding window, rank r must know where its run starts: query token ``t`` sits at global
position ``total[b] - Sq + t`` and rank r's local key ``j`` at ``key_offsets[b, r] + j``, so the
local diagonal offset is ``total[b] - Sq - key_offsets[b, r]``. Pass ``key_offsets`` (this rank's,
int32 ``[B]``) and ``global_seqlens`` (int32 ``[B]``, the total keys after the append), as
:class:`ShardedKVCache` does from its bookkeeping; when they are needed and not given, they are
computed from an all_gather of the local lengths (a second, tiny collective).

Where new tokens go (:class:`ShardedKVCache`): to the *tail rank* of each sequence, the last rank
whose run is non-empty (rank 0 for an empty sequence), while it has room; tokens that do not fit
go to the next rank, and so on. This keeps the runs contiguous and in rank order (ranks after the
tail are empty), so positions stay implicit. After a prefill every rank holds L tokens and the
last rank takes the new ones: give it room (``max_new_tokens``). Appending is host-side
bookkeeping (replicated, no communication); the attention itself syncs nothing with the host.
In ``ShardedKVCache.step`` the append's checks go into the step's one agreement and the ranks
write only once every rank has passed them, so one rank's bad append cannot part the tables.

With no process group, or a group of one rank, everything runs locally.
"""

from __future__ import annotations

import torch

from ..backends import backend_for
from ..checks import check_options, check_sink, resolve_scale, skip_value_checks
from ..comm.agree import agree
from ..comm.gather import all_gather_flat
from ..comm.groups import group_rank_world
from ..decode import attend_kvcache, flash_attn_with_kvcache, queue_value_checks
from ..kv_checks import KVCacheArgs
from ..merge import merge_sink

__all__ = ["ShardedKVCache", "sharded_flash_attn_with_kvcache"]

# The keyword arguments of ``ShardedKVCache.step`` (the cache supplies the rest).
_STEP_OPTIONS = frozenset(
    (
        "softmax_scale",
        "causal",
        "window_size",
        "softcap",
        "num_splits",
        "return_softmax_lse",
        "learnable_sink",
    )
)


def _validate(
    q,
    k_cache,
    v_cache,
    k,
    v,
    cache_seqlens,
    cache_batch_idx,
    block_table,
    opts,
    num_splits,
    key_offsets,
    global_seqlens,
    sink,
):
    causal, window, softcap, scale = check_options(*opts)
    a = KVCacheArgs(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, num_splits)
    backend_for(q)
    queue_value_checks(a, q, k_cache)
    for name, t in (("key_offsets", key_offsets), ("global_seqlens", global_seqlens)):
        if t is not None and (
            not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (a.batch,)
        ):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be an int32 tensor [B={a.batch}], got {got}")
    if (key_offsets is None) != (global_seqlens is None):
        raise ValueError("pass key_offsets and global_seqlens together (or neither)")
    check_sink(sink, q)
    return a, causal, window, softcap, scale


def sharded_flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    return_softmax_lse=False,
    key_offsets=None,
    global_seqlens=None,
    group=None,
    learnable_sink=None,
):
    """:func:`ringflash.decode.flash_attn_with_kvcache` over a KV cache sharded across ``group``.

    Args:
        q: ``[B, Sq, Hq, D]``, the same on every rank.
        k_cache, v_cache, cache_batch_idx, block_table: this rank's shard, laid out as in
            ``flash_attn_with_kvcache`` (``[B_cache, S_local, Hk, D]`` or paged).
        k, v: ``[B, Snew, Hk, D]`` new tokens to append to THIS rank's shard (pass them on the
            rank that owns the sequence ends, None elsewhere), or None.
        cache_seqlens: int32 ``[B]`` (or int): keys already in this rank's shard (may be 0).
        key_offsets: int32 ``[B]``, global position of this rank's first key per sequence;
            global_seqlens: int32 ``[B]``, total keys per sequence after the append. Needed only
            for causal with ``Sq > 1`` or a window; computed by an all_gather when not given.
        group: the process group (None: the default group); no group or one rank runs locally.
        learnable_sink: ``[Hq]`` float tensor or None: merged once, after the ranks' partials.
        Other arguments: as ``flash_attn_with_kvcache``.

    Returns:
        ``out [B, Sq, Hq, D]`` (or ``(out, lse [B, Hq, Sq])``), identical on every rank.

    Raises:
        ValueError on every rank when any rank's arguments are invalid or the ranks disagree on
        the query, the masks or the options (checked before the first collective).

    Example:
        >>> out = sharded_flash_attn_with_kvcache(q, k_shard, v_shard, cache_seqlens=local_lens)
    """
    return _attend_sharded(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens,
        cache_batch_idx,
        block_table,
        softmax_scale,
        causal,
        window_size,
        softcap,
        num_splits,
        return_softmax_lse,
        key_offsets,
        global_seqlens,
        group,
        learnable_sink,
    )


def _attend_sharded(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    num_splits=0,
    return_softmax_lse=False,
    key_offsets=None,
    global_seqlens=None,
    group=None,
    learnable_sink=None,
    *,
    err=None,
    extra_fields=None,
    before_attend=None,
):
    """The body of :func:`sharded_flash_attn_with_kvcache`, with hooks for a caller that has work
    of its own to check and do inside the same step (``ShardedKVCache.step``).

    ``err``: an error the caller found on this rank (an exception, or None); ``extra_fields``:
    more name -> value pairs the ranks must share. Both go into the step's one agreement, so a
    caller's bad input raises ``ValueError`` on every rank without a second collective.
    ``before_attend``: called once the ranks agree and before anything is attended (or gathered);
    it returns the ``(cache_seqlens, key_offsets, global_seqlens)`` to attend with, of the same
    shapes, dtypes and devices as those passed in (they were checked in their place).
    """
    g, rank, world = group_rank_world(group)
    opts = (0.0, softmax_scale, window_size, softcap, None, causal)
    if world == 1:
        if err is not None:
            raise err
        if before_attend is not None:
            cache_seqlens, key_offsets, global_seqlens = before_attend()
        return flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            k,
            v,
            cache_seqlens=cache_seqlens,
            cache_batch_idx=cache_batch_idx,
            block_table=block_table,
            softmax_scale=softmax_scale,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            num_splits=num_splits,
            return_softmax_lse=return_softmax_lse,
            learnable_sink=learnable_sink,
        )
    fields = {}
    if err is None:
        try:
            a, causal, window, softcap, scale = _validate(
                q,
                k_cache,
                v_cache,
                k,
                v,
                cache_seqlens,
                cache_batch_idx,
                block_table,
                opts,
                num_splits,
                key_offsets,
                global_seqlens,
                learnable_sink,
            )
            fields = {
                "function": "sharded_flash_attn_with_kvcache",
                "q shape": tuple(q.shape),
                "dtype": str(q.dtype),
                "causal": causal,
                "window_size": window,
                "softcap": softcap,
                "softmax_scale": scale,
                "key_offsets given": key_offsets is not None,
                "learnable_sink given": learnable_sink is not None,
                **(extra_fields or {}),
            }
        except (ValueError, TypeError) as e:
            err = e
    agree([(g, world)], err, fields, "the group")
    if before_attend is not None:
        cache_seqlens, key_offsets, global_seqlens = before_attend()
        a.cache_seqlens = cache_seqlens  # same shape, dtype and device as the one checked
    scale = resolve_scale(scale, q.shape[-1])
    Sq = q.shape[1]
    with torch.no_grad():
        diag = None
        if (causal and Sq > 1) or window != (-1, -1):
            if key_offsets is None:
                # Where this rank's run starts: a tiny all_gather of the local lengths (the new
                # tokens are appended below, on this rank, so they count here).
                lens = all_gather_flat(a.cache_seqlens + a.n_new, world, g)  # [W, B]
                key_offsets = (lens.cumsum(0) - lens)[rank].to(torch.int32)
                global_seqlens = lens.sum(0).to(torch.int32)
            diag = (global_seqlens.to(q.device) - Sq - key_offsets.to(q.device)).to(torch.int32)
        out, lse = attend_kvcache(
            q,
            k_cache,
            v_cache,
            a,
            scale,
            causal,
            window,
            softcap,
            k=k,
            v=v,
            diag_offset=diag,
            out_dtype=torch.float32,
        )
        B, _, H, D = out.shape
        packed = torch.cat([out.reshape(-1), lse.transpose(1, 2).reshape(-1)])
        got = all_gather_flat(packed, world, g)  # the one collective of the step
        n = out.numel()
        outs = got[:, :n].view(world, B, Sq, H, D)
        lses = got[:, n:].view(world, B, Sq, H)
        out, lse = backend_for(q).combine(outs, lses, q.dtype)
        if learnable_sink is not None:  # once, after every rank's keys
            out, lse = merge_sink(out, lse, learnable_sink)
    return (out, lse) if return_softmax_lse else out


class ShardedKVCache:
    """A KV cache sharded over ``group``: allocation, placement of new tokens, prefill, steps.

    Every rank holds ``k``/``v`` ``[batch, capacity, Hk, D]`` for its runs and the same host-side
    table ``lengths[b][r]`` (updated identically on every rank, no communication). New tokens go
    to each sequence's tail rank while it has room, then to the next rank (see the module doc).

    Example:
        >>> cache = ShardedKVCache.from_prefill(k_shard, v_shard, max_new_tokens=256, group=g)
        >>> out = cache.step(q, k_new, v_new, causal=True)   # append, then attend
    """

    def __init__(self, batch, capacity, n_kv_heads, head_dim, dtype=torch.bfloat16, device=None, group=None):
        if capacity < 0 or batch < 1:
            raise ValueError(f"need batch >= 1 and capacity >= 0, got {batch} and {capacity}")
        self.group = group
        _, self.rank, self.world = group_rank_world(group)
        self.capacity = int(capacity)
        self.k = torch.zeros(batch, capacity, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = [[0] * self.world for _ in range(batch)]
        self._sync_device()

    @classmethod
    def from_prefill(cls, k_shard, v_shard, capacity=None, max_new_tokens=0, group=None):
        """Build from a contiguous prefill's local shards ``[B, L, Hk, D]`` (rank r holds tokens
        ``[r * L, (r + 1) * L)``); ``capacity`` defaults to ``L + max_new_tokens`` on every rank."""
        B, L, Hk, D = k_shard.shape
        cap = L + max_new_tokens if capacity is None else capacity
        if cap < L:
            raise ValueError(f"capacity {cap} is smaller than the prefill shard length {L}")
        self = cls(B, cap, Hk, D, k_shard.dtype, k_shard.device, group)
        self.k[:, :L] = k_shard
        self.v[:, :L] = v_shard
        self.lengths = [[L] * self.world for _ in range(B)]
        self._sync_device()
        return self

    def _sync_device(self):
        """The device copies of the length table: this rank's lengths, key offsets, totals.

        One copy from pinned memory, queued without waiting (a copy from pageable memory would
        wait for the GPU, every step)."""
        mine = [row[self.rank] for row in self.lengths]
        offs = [sum(row[: self.rank]) for row in self.lengths]
        total = [sum(row) for row in self.lengths]
        host = torch.tensor([mine, offs, total], dtype=torch.int32)
        if self.k.is_cuda:
            table = host.pin_memory().to(self.k.device, non_blocking=True)
        else:
            table = host.to(self.k.device)
        self.seqlens, self.key_offsets, self.global_seqlens = table.unbind(0)

    def placement(self, n_new: int) -> list[list[tuple[int, int, int]]]:
        """For each sequence, ``(rank, first new token, count)`` pieces of an append of ``n_new``."""
        plan = []
        for b, row in enumerate(self.lengths):
            tail = max((r for r in range(self.world) if row[r] > 0), default=0)
            pieces, t, r = [], 0, tail
            while t < n_new:
                if r >= self.world:
                    raise ValueError(
                        f"sequence {b} is full: {sum(row)} tokens in {self.world} shards of {self.capacity}, "
                        f"cannot append {n_new}"
                    )
                room = self.capacity - row[r]
                take = min(room, n_new - t)
                if take > 0:
                    pieces.append((r, t, take))
                    t += take
                r += 1
            plan.append(pieces)
        return plan

    def _plan_append(self, k, v):
        """Check ``k``/``v`` against the cache and place them (``placement``), writing nothing."""
        if (k is None) != (v is None):
            raise ValueError("pass both k and v to append, or neither")
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            raise TypeError(f"k and v must be torch.Tensors, got {type(k).__name__} and {type(v).__name__}")
        if (
            k.shape != v.shape
            or k.dim() != 4
            or k.shape[0] != self.k.shape[0]
            or k.shape[2:] != self.k.shape[2:]
        ):
            want = (self.k.shape[0], "Snew", *self.k.shape[2:])
            raise ValueError(
                f"k/v must be [B, Snew, Hk, D] = {want} matching the cache, got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
        return self.placement(k.shape[1])

    def _write(self, k, v, plan):
        """Write this rank's pieces of a ``placement`` plan and update the (replicated) table."""
        for b, pieces in enumerate(plan):
            for r, t, n in pieces:
                if r == self.rank:
                    at = self.lengths[b][r]
                    self.k[b, at : at + n] = k[b, t : t + n]
                    self.v[b, at : at + n] = v[b, t : t + n]
                self.lengths[b][r] += n
        self._sync_device()

    def append(self, k, v):
        """Append ``k``/``v`` ``[B, Snew, Hk, D]`` (the same on every rank) to their owner ranks.

        Local (no communication): every rank must call it with the same shapes, or the length
        tables part. ``step`` appends with the ranks' agreement instead."""
        self._write(k, v, self._plan_append(k, v))  # raises before anything is written

    def step(self, q, k=None, v=None, **kw):
        """Append ``k``/``v`` (if given), then attend ``q [B, Sq, Hq, D]`` to the whole sharded cache.

        Keyword arguments go to :func:`sharded_flash_attn_with_kvcache` (causal, window_size, ...).
        When any rank's ``k``/``v`` is bad, or the ranks differ in whether they append or how many
        tokens, every rank raises ``ValueError`` and no rank's cache or ``lengths`` changes.
        """
        # Everything this rank could fail on is found before the step's one agreement and goes
        # into it: a rank that raised alone would leave the others waiting in the agreement.
        err, plan = None, None
        try:
            bad = sorted(set(kw) - _STEP_OPTIONS)
            if bad:
                raise TypeError(f"step() got unexpected keyword arguments {bad}")
            if k is not None or v is not None:
                plan = self._plan_append(k, v)
        except (ValueError, TypeError) as e:
            err = e
        fields = {"k/v given": plan is not None, "k/v new tokens (Snew)": 0 if plan is None else k.shape[1]}

        def append():  # after the ranks agree, so that all of them write or none does
            if plan is not None:
                self._write(k, v, plan)
            return self.seqlens, self.key_offsets, self.global_seqlens

        # The lengths come from this cache's own table (checked by ``placement``): reading them
        # back to check them again would cost a device sync per step.
        with skip_value_checks():
            return _attend_sharded(
                q,
                self.k,
                self.v,
                cache_seqlens=self.seqlens,
                key_offsets=self.key_offsets,
                global_seqlens=self.global_seqlens,
                group=self.group,
                err=err,
                extra_fields=fields,
                before_attend=append,
                **{n: x for n, x in kw.items() if n in _STEP_OPTIONS},
            )

    def total_length(self, b: int) -> int:
        return int(sum(self.lengths[b]))
