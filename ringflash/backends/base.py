"""The interface every backend has (:class:`Backend`, with the torch-operation versions of the
all-gather's row moves) and the blockwise PyTorch backend, which runs on any device."""

from __future__ import annotations

import torch

from .. import blockwise, blockwise_cache
from ..blockwise import BlockwiseConfig
from ..checks import bounded_cu
from ..device_errors import or_verdicts
from .state import current_config


class Backend:
    """The interface of a backend; ``ringflash.blockwise`` documents every argument.

    - ``attn_fwd(q, k, v, *, softmax_scale, causal, window_size, softcap, cu_seqlens_q,
      cu_seqlens_k, max_seqlen_q, max_seqlen_k, diag_offset, out, lse, merge, cu_bounds) -> (out,
      lse)``; a packed call's ``diag_offset`` may be two-part (``[n_seq, 3]``, see ``SPLIT_TILE``).
      ``cu_bounds`` (packed calls; ``attn_bwd`` takes it too and only clamps, the forward having
      reported): None trusts ``cu_seqlens``;
      ``"clamp"`` bounds each sequence to the tensors' rows on the device (valid values unchanged,
      ``checks.bounded_cu``); ``"report"`` also ORs the failed checks into the device's error flag.
      Nothing is read on the host. ``seq_order`` (packed calls, int32 ``[2, n_seq]``, or None):
      the order in which to take the sequences, heaviest first, for query tiles (row 0) and key
      tiles (row 1); a scheduling hint that changes no result (``kernels.common._attn_prologue``).
    - ``attn_bwd(dout, q, k, v, out, lse, *, ..., delta, dq, dk, dv, accumulate, dkv_rows) -> (dq,
      dk, dv)``: given buffers are added into (float32) or written (``accumulate``, per dQ and
      dK/dV); ``dkv_rows`` (packed calls with given buffers): ``(dk_rows, dv_rows)``, int64, the
      row of ``dk``/``dv`` that each key row's gradient goes to (``mapped_bwd``)
    - ``attn_bwd_delta(dout, out, packed) -> delta``
    - ``decode_fwd(q, k_cache, v_cache, cache_seqlens, *, n_new, k_new, v_new, block_table,
      cache_batch_idx, softmax_scale, causal, window_size, softcap, num_splits, diag_offset,
      out_dtype, cache_leftpad, check) -> (out, lse)``: attention over a KV cache; with
      ``k_new``/``v_new`` it also appends them (``cache_seqlens``: keys before the new ones); with
      ``check`` (the call's ``kv_checks.KVCacheArgs``) it also checks the index values as
      ``check_kv_values`` does, in the same launch where it can.
    - ``append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table, cache_batch_idx)``
    - ``combine(outs [N, B, Sq, H, D], lses [N, B, Sq, H], out_dtype) -> (out, lse [B, H, Sq])``:
      the exact merge of N float32 partials (sharded decoding).
    - ``check_kv_values(a, k_cache)``: OR the bits of the failed value checks of a KV-cache call
      (``kv_checks.KVCacheArgs``) into the device's error flag (``ringflash.device_errors``) without
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

    def attn_plan(self, q, k, v, lse=True, **kw):
        """A runner for later inference calls ``attn_fwd(q, k, v, **kw)`` of this call's signature
        (padded, results allocated, bottom-right masks), ``runner(q, k, v) -> (out, lse)``, or None
        where every call must take ``attn_fwd`` (the default). ``lse`` False: the caller does not
        take the LSE, which the runner may then return as None."""
        return None

    def varlen_plan(self, q, k, v, lse=True, **kw):
        """A runner for later packed inference calls ``attn_fwd(q, k, v, **kw)`` of this call's
        signature (``kw`` holds the call's ``cu_seqlens``, ``max_seqlen`` and ``cu_bounds``;
        results allocated, bottom-right masks), ``runner(q, k, v, cu_q, cu_k) -> (out, lse)``, or
        None where every call must take ``attn_fwd`` (the default). ``lse``: as ``attn_plan``."""
        return None

    def decode_plan(self, q, k_cache, v_cache, *, k_new, v_new, block_table, cache_batch_idx, **kw):
        """A runner for later ``decode_fwd`` calls of this call's signature (bottom-right masks),
        ``runner(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, cache_batch_idx,
        cache_leftpad) -> (out, lse)``, or None where every call must take ``decode_fwd`` (the
        default). ``kw``: ``decode_fwd``'s options, ``check`` (the runner queues the value checks)
        and ``lse`` (False: the runner returns ``(out, None)``)."""
        return None


def mapped_bwd(bwd, dout, q, k, v, out, lse, *, dk, dv, dkv_rows, **kw):
    """``bwd(dout, q, k, v, out, lse, dk=.., dv=.., **kw)`` (a backend's ``attn_bwd`` without
    ``dkv_rows``) for a call whose key rows' gradients go to rows ``dkv_rows`` of ``dk``/``dv``:
    those rows are taken out, the call adds into or writes them as it would in place (rows of
    sequences with no queries keep what they hold), and they are put back."""
    dk_rows, dv_rows = dkv_rows
    tk, tv = dk.index_select(0, dk_rows), dv.index_select(0, dv_rows)
    dq, _, _ = bwd(dout, q, k, v, out, lse, dk=tk, dv=tv, **kw)
    dk.index_copy_(0, dk_rows, tk)
    dv.index_copy_(0, dv_rows, tv)
    return dq, dk, dv


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

    def attn_bwd(self, dout, q, k, v, out, lse, cu_bounds=None, dkv_rows=None, **kw):
        if dkv_rows is not None:
            return mapped_bwd(
                self._bwd, dout, q, k, v, out, lse, dkv_rows=dkv_rows, cu_bounds=cu_bounds, **kw
            )
        return self._bwd(dout, q, k, v, out, lse, cu_bounds=cu_bounds, **kw)

    def _bwd(self, dout, q, k, v, out, lse, cu_bounds=None, **kw):
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
        from ..merge import combine_attn_partials

        out, lse = combine_attn_partials(outs, lses.permute(0, 1, 3, 2))
        return out.to(out_dtype), lse
