"""The Triton backend: the kernels of ``ringflash.kernels`` on CUDA tensors, or on CPU tensors under
Triton's interpreter. The kernels are imported on first use, so that the package imports without
Triton."""

from __future__ import annotations

import torch

from ..device_errors import error_flag
from ..kernels.options import AttnConfig, DecodeConfig
from .base import Backend, TorchBackend, _bounded_by_ops
from .state import current_config, triton_interpreter


class TritonBackend(Backend):
    """The Triton kernels (``ringflash.kernels``): CUDA tensors, or CPU tensors under the interpreter."""

    name = "triton"

    def runs_on(self, device):
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter())

    def attn_fwd(self, q, k, v, cu_bounds=None, **kw):
        from ..kernels import decode, fwd

        if wide_float32(q, v):
            return _BLOCKWISE.attn_fwd(q, k, v, cu_bounds=cu_bounds, **kw)
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

    def attn_plan(self, q, k, v, lse=True, **kw):
        from ..kernels import decode, fwd_plan

        if wide_float32(q, v) or _split_kv_suits(q, k, v, decode):
            return None
        plan = fwd_plan.plan_fwd(q, k, v, config=current_config(AttnConfig), lse=lse, **kw)
        if plan is None:
            return None
        return lambda q, k, v: fwd_plan.run_fwd_plan(q, plan, k, v)

    def varlen_plan(self, q, k, v, cu_bounds=None, lse=True, **kw):
        from ..kernels import fwd_plan

        if wide_float32(q, v):
            return None
        kw = self._bounds(q, k, kw, cu_bounds)
        if "bound_cu" not in kw and cu_bounds is not None:
            return None  # bounded by torch operations: every call takes attn_fwd
        plan = fwd_plan.plan_fwd(q, k, v, config=current_config(AttnConfig), lse=lse, **kw)
        if plan is None:
            return None
        return lambda q, k, v, cu_q, cu_k: fwd_plan.run_fwd_plan(q, plan, k, v, cu_q, cu_k)

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
        from ..kernels.decode import decode_fwd

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
        from ..kernels import bwd

        if wide_float32(q, v):
            return _BLOCKWISE.attn_bwd(dout, q, k, v, out, lse, cu_bounds=cu_bounds, **kw)
        kw = self._bounds(q, k, kw, "clamp" if cu_bounds else None)
        return bwd.attn_bwd(dout, q, k, v, out, lse, config=current_config(AttnConfig), **kw)

    def attn_bwd_delta(self, dout, out, packed=False):
        from ..kernels import bwd

        return bwd.attn_bwd_delta(dout, out, packed=packed)

    def decode_fwd(self, q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, check=None, **kw):
        from ..kernels.decode import decode_fwd

        if wide_float32(q, v_cache):
            return _BLOCKWISE.decode_fwd(
                q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, check=check, **kw
            )
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
        from ..kernels.decode.plan import plan_decode, run_plan

        if wide_float32(q, v_cache):
            return None
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
        from ..kernels.rows import gather_rows

        return gather_rows(_unit_last(k), _unit_last(v), rows)

    def sum_rows_into(self, parts, out_k, out_v, sources, rows):
        from ..kernels.rows import sum_rows_into

        sum_rows_into(parts, out_k, out_v, sources, rows)

    def check_kv_values(self, a, k_cache):
        from ..kernels.decode.check import check_kv_values

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
        from ..kernels.decode import append_kv

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
        from ..kernels.decode import combine_partials

        _, batch, sq, heads, dim = outs.shape
        out = torch.empty((batch, sq, heads, dim), dtype=out_dtype, device=outs.device)
        lse = torch.empty((batch, heads, sq), dtype=torch.float32, device=outs.device)
        return combine_partials(outs, lses, out, lse, split_dim=0)


_BLOCKWISE = TorchBackend()


def wide_float32(q, v) -> bool:
    """Whether an attention or decoding call is float32 on a GPU with a head dim above 128: no tile
    of the attention kernels fits shared memory there (on an H100 every config ran out of it), nor
    do the decoding kernel's three stages of 64-key K/V tiles (384 KB), so the Triton backend runs
    such calls on the blockwise backend (exact, slower)."""
    return q.device.type == "cuda" and q.dtype == torch.float32 and max(q.shape[-1], v.shape[-1]) > 128


def _split_kv_suits(q, k, v, decode) -> bool:
    """Whether a padded forward goes to the split-KV decoding kernel (``decode.split_kv_pays``;
    under the interpreter the SM count is a stand-in, so tests reach this path too)."""
    from ..kernels.device import sm_count

    if v.shape[-1] != q.shape[-1] or not q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        return False
    return decode.split_kv_pays(
        q.shape[0], q.shape[1], q.shape[2], k.shape[2], k.shape[1], sm_count(q.device)
    )


def _unit_last(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()
