"""The checks of a KV-cache call (``flash_attn_with_kvcache``, sharded decoding): its tensors'
shapes, dtypes and devices, and the values of its index tensors (``cache_seqlens``,
``cache_leftpad``, ``block_table``, ``cache_batch_idx``), on the host or queued on the device
(``ringflash.device_errors``), as ``ringflash.checks`` does for the other calls."""

from __future__ import annotations

import math
import numbers

import torch

from .checks import _short, check_heads, check_int, check_tensor, value_check_mode
from .device_errors import BITS, raise_completed


def _check_index(t, name, ndim, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dim(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


# Signatures of cache calls that passed ``_check_cache_tensors``: a decoding loop repeats a few, and
# the checks depend on nothing else. Bounded: many shapes start the table over.
_CACHE_CALLS_OK: set = set()


def _cache_call_key(*tensors) -> tuple | None:
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif type(t) is torch.Tensor:
            key.append((t.shape, t.dtype, t.device, t.stride(-1) if t.dim() else 0))
        else:
            return None  # something else: the full checks say what
    return tuple(key)


def _check_cache_tensors(q, k_cache, v_cache, k, v):
    key = _cache_call_key(q, k_cache, v_cache, k, v)
    if key is not None and key in _CACHE_CALLS_OK:
        return
    _check_cache_tensors_once(q, k_cache, v_cache, k, v)
    if key is not None:
        if len(_CACHE_CALLS_OK) >= 256:
            _CACHE_CALLS_OK.clear()
        _CACHE_CALLS_OK.add(key)


def _check_cache_tensors_once(q, k_cache, v_cache, k, v):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(t, name, 4, "[batch, seqlen, nheads, headdim]")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(
            f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        # The cache is written in place, so it cannot be copied into a friendlier layout.
        raise ValueError("k_cache and v_cache must be contiguous in the head dim (stride 1)")
    d, hq, hk = q.shape[-1], q.shape[2], k_cache.shape[2]
    if k_cache.shape[-1] != d:
        raise ValueError(f"q and the cache must share the head dim, got {d} and {k_cache.shape[-1]}")
    check_heads(hq, hk, d, d, "the cache")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v to append, or neither")
    if k is None:
        return
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, the cache has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        # Snew is k's: a v of another length would be broadcast into, or fail after, k's append.
        want = (q.shape[0], k.shape[1] if k.dim() == 4 else -1, hk, d)
        if t.dim() != 4 or tuple(t.shape) != want:
            raise ValueError(f"{name} must be [B, Snew, Hk, D] = {want}, got shape {tuple(t.shape)}")


class KVCacheArgs:
    """Validated, normalised arguments of one KV-cache call (shapes and int32 index tensors).

    Every check runs before anything is written, so a bad call leaves the cache untouched.
    """

    def __init__(
        self,
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens,
        cache_batch_idx,
        block_table,
        num_splits,
        cache_leftpad=None,
    ):
        _check_cache_tensors(q, k_cache, v_cache, k, v)
        if k is not None and k_cache.data_ptr() == v_cache.data_ptr():
            raise ValueError("k_cache and v_cache are the same memory: appending v would overwrite the new k")
        batch = q.shape[0]
        n_new = 0 if k is None else k.shape[1]
        self.paged = block_table is not None
        self.batch, self.seqlen_q, self.n_new = batch, q.shape[1], n_new
        if self.paged:
            if cache_batch_idx is not None:
                raise ValueError("cache_batch_idx cannot be combined with block_table (paged cache)")
            _check_index(block_table, "block_table", 2, q.device)
            if block_table.shape[0] != batch:
                raise ValueError(
                    f"block_table must be [B={batch}, max_blocks], got shape {tuple(block_table.shape)}"
                )
            if k_cache.shape[1] == 0:
                raise ValueError("a paged cache [num_blocks, page_size, Hk, D] needs page_size >= 1, got 0")
            self.capacity = block_table.shape[1] * k_cache.shape[1]
        else:
            if cache_batch_idx is not None:
                _check_index(cache_batch_idx, "cache_batch_idx", 1, q.device)
                if cache_batch_idx.shape[0] != batch:
                    raise ValueError(
                        f"cache_batch_idx must be [B={batch}], got shape {tuple(cache_batch_idx.shape)}"
                    )
            elif k_cache.shape[0] != batch:
                raise ValueError(
                    f"k_cache has {k_cache.shape[0]} rows but q has batch {batch}: pass cache_batch_idx "
                    "to map batch rows to cache rows"
                )
            self.capacity = k_cache.shape[1]
        if n_new > self.capacity:  # known from shapes: checked even when values are not
            raise ValueError(f"cannot append {n_new} tokens to a cache of {self.capacity} slots per row")
        if cache_seqlens is None:
            if k is not None:
                raise ValueError("appending k/v needs cache_seqlens (where the new tokens go)")
            # flash-attn: no cache_seqlens means every row uses its whole cache.
            cache_seqlens = torch.full((batch,), self.capacity, dtype=torch.int32, device=q.device)
        elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
            n = check_int(cache_seqlens, "cache_seqlens", minimum=0)
            if n + n_new > self.capacity:
                raise ValueError(
                    f"the cache is too small: a row needs {n + n_new} slots (cache_seqlens + {n_new} new) "
                    f"but holds {self.capacity}"
                )
            cache_seqlens = torch.full((batch,), n, dtype=torch.int32, device=q.device)
        else:
            _check_index(cache_seqlens, "cache_seqlens", 1, q.device)
            if cache_seqlens.shape[0] != batch:
                raise ValueError(
                    f"cache_seqlens must be int32 [B={batch}], got shape {tuple(cache_seqlens.shape)}"
                )
        if cache_leftpad is not None:
            if self.paged:
                raise ValueError(
                    "cache_leftpad cannot be combined with block_table (paged cache), as in flash-attn"
                )
            _check_index(cache_leftpad, "cache_leftpad", 1, q.device)
            if cache_leftpad.shape[0] != batch:
                raise ValueError(
                    f"cache_leftpad must be int32 [B={batch}], got shape {tuple(cache_leftpad.shape)}"
                )
        self.cache_leftpad = cache_leftpad
        self.cache_seqlens = cache_seqlens
        self.cache_batch_idx = cache_batch_idx
        self.block_table = block_table
        self.num_splits = check_int(num_splits, "num_splits (0 picks it)", minimum=0)
        mode = value_check_mode(q)
        if mode is not None:
            raise_completed(q.device)  # a failure an earlier call queued on the device
        if mode == "host":
            self._check_values(k_cache)
        # "device": the caller has its backend check them (``decode.attend_kvcache(check=True)``, in
        # the decoding launch; ``decode.queue_value_checks`` on their own)
        self.device_checks = mode == "device" and self.batch > 0

    def value_verdicts(self, k_cache) -> list[tuple[int, torch.Tensor]]:
        """``(bit, failed)`` per value check (``ringflash.device_errors.BITS``), computed on the
        tensors' device: lengths, pages and cache rows in range. Nothing is read on the host."""
        lens, n_rows = self.cache_seqlens, k_cache.shape[0]
        out = [
            (BITS["negative_length"], (lens < 0).any()),
            (BITS["too_long"], (lens > self.capacity - self.n_new).any()),
        ]
        if self.cache_leftpad is not None:
            pad = self.cache_leftpad
            out.append((BITS["leftpad"], ((pad < 0) | (pad > lens + self.n_new)).any()))
        if self.paged:
            bt, (_, used) = self.block_table, self._pages_in_use(k_cache.shape[1])
            out.append((BITS["page"], (used & ((bt < 0) | (bt >= n_rows))).any()))
        if self.cache_batch_idx is not None:
            idx = self.cache_batch_idx
            out.append((BITS["row"], ((idx < 0) | (idx >= n_rows)).any()))
            if self.n_new:  # only appends collide
                srt = idx.sort().values
                out.append((BITS["repeated_row"], (srt[1:] == srt[:-1]).any()))
        return out

    def _pages_in_use(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cols [1, max_pages], used [B, max_pages])``: the ``block_table`` entries that each
        row's keys, old and new, occupy (pages of ``page`` slots)."""
        bt = self.block_table
        lens = self.cache_seqlens.long().clamp(min=0)
        need = ((lens + self.n_new + page - 1) // page).clamp(max=bt.shape[1])
        cols = torch.arange(bt.shape[1], device=bt.device)[None, :]
        return cols, cols < need[:, None]

    def _shared_appends(self, k_cache) -> torch.Tensor | None:
        """For an append to a paged cache: per ``block_table`` entry, whether its row appends to
        that page while another entry in use (of any row) names the same page; None otherwise."""
        if not (self.paged and self.n_new):
            return None
        page, n_pages = k_cache.shape[1], k_cache.shape[0]
        cols, used = self._pages_in_use(page)
        pages = self.block_table.long().clamp(0, n_pages - 1)  # out of range: the page check reports it
        counts = torch.bincount(pages[used], minlength=n_pages)
        appends = used & (cols >= (self.cache_seqlens.long().clamp(min=0) // page)[:, None])
        return appends & (counts[pages] > 1)

    def _check_values(self, k_cache):
        """Lengths, pages and cache rows in range, and no page appended to that another entry in
        use names; one device-to-host read however many rows (the error path reads more to name
        the culprit). The page sharing is checked here only: the device checks leave it out (a
        search over every pair of rows), as flash-attn does."""
        if self.batch == 0:
            return
        verdicts = [failed for _, failed in self.value_verdicts(k_cache)]
        shared = self._shared_appends(k_cache)
        if shared is not None:
            verdicts.append(shared.any())
        if not any(torch.stack(verdicts).tolist()):
            return
        n_rows = k_cache.shape[0]
        lens = self.cache_seqlens.tolist()
        if any(n < 0 for n in lens):
            raise ValueError(f"cache_seqlens must be >= 0, got {_short(lens)}")
        if self.cache_leftpad is not None:
            pads = self.cache_leftpad.tolist()
            if any(p < 0 or p > n + self.n_new for p, n in zip(pads, lens, strict=True)):
                raise ValueError(
                    f"cache_leftpad must be in [0, cache_seqlens + new tokens] per row, got {_short(pads)} "
                    f"with cache_seqlens {_short(lens)}"
                )
        worst = max(lens) + self.n_new
        if worst > self.capacity:
            what = "block_table pages * page size" if self.paged else "k_cache.shape[1]"
            raise ValueError(
                f"the cache is too small: a row needs {worst} slots (cache_seqlens + {self.n_new} new) "
                f"but holds {self.capacity} ({what})"
            )
        if self.paged:
            page = k_cache.shape[1]
            for b, n in enumerate(lens):
                used = self.block_table[b, : math.ceil((n + self.n_new) / page)].tolist()
                if any(p < 0 or p >= n_rows for p in used):
                    raise ValueError(
                        f"block_table row {b} points outside the cache's {n_rows} pages: {_short(used)}"
                    )
        if shared is not None and bool(shared.any()):
            b, j = shared.nonzero()[0].tolist()
            p = int(self.block_table[b, j])
            raise ValueError(
                f"block_table row {b} appends to page {p}, which another entry in use also names: rows "
                "may share pages they only read (a common prefix), never a page that a row appends to"
            )
        idx = self.cache_batch_idx.tolist() if self.cache_batch_idx is not None else []
        if any(i < 0 or i >= n_rows for i in idx):
            raise ValueError(f"cache_batch_idx entries must be in [0, {n_rows}), got {_short(idx)}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"cache_batch_idx has repeated rows {_short(idx)}: appends would collide")
