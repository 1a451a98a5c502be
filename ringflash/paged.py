"""Paged K/V for ``flash_attn_varlen_func(..., block_table=)``: each sequence's keys gathered from
its pages into one packed run, after its ``cu_seqlens_k`` and the pages it uses are checked."""

from __future__ import annotations

import torch

from .checks import check_cu_list, host_checks_allowed


def unpage(k, v, block_table, cu_seqlens_k, q):
    """Paged ``k``/``v`` ``[num_blocks, page_size, Hk, D]`` as packed ``[total_k, Hk, D]`` runs:
    sequence ``b``'s first ``len_b`` slots of the pages ``block_table[b]`` (gathered, so autograd
    scatters the gradients back into the pages)."""
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be a paged cache [num_blocks, page_size, Hk, D]")
    if k.shape[:3] != v.shape[:3] or k.shape[1] == 0:
        raise ValueError(
            "with block_table, k and v must be paged caches of the same [num_blocks, page_size >= 1, Hk], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if (
        not isinstance(block_table, torch.Tensor)
        or block_table.dtype != torch.int32
        or block_table.dim() != 2
    ):
        raise ValueError("block_table must be an int32 tensor [batch, max_blocks]")
    if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.dim() != 1:
        raise ValueError("cu_seqlens_k must be an int32 tensor [batch + 1]")
    if block_table.shape[0] != cu_seqlens_k.numel() - 1 or block_table.device != q.device:
        raise ValueError(
            f"block_table must be [batch={cu_seqlens_k.numel() - 1}, max_blocks] on {q.device}, "
            f"got {tuple(block_table.shape)} on {block_table.device}"
        )
    page = k.shape[1]
    cu = cu_seqlens_k.to(q.device).long()
    if host_checks_allowed(cu_seqlens_k):
        vals = cu_seqlens_k.tolist()  # the one read of the values: the checks and the total
        _check_pages(vals, block_table, page, k.shape[0])
        total = vals[-1]
    else:
        total = max(int(cu[-1]), 0)
    t = torch.arange(total, device=q.device)
    b = torch.searchsorted(cu[1:], t, right=True)  # the sequence of each key
    pos = t - cu[b]
    pages = block_table.long()[b, (pos // page).clamp(max=block_table.shape[1] - 1)].clamp(0, k.shape[0] - 1)
    idx = pages * page + pos % page
    return k.flatten(0, 1).index_select(0, idx), v.flatten(0, 1).index_select(0, idx)


def _check_pages(cu: list[int], block_table: torch.Tensor, page: int, n_pages: int) -> None:
    """A paged call's ``cu_seqlens_k`` (start at 0, never decrease) and the ``block_table`` entries
    its sequences use (inside the cache's ``n_pages`` pages, enough of them per sequence)."""
    check_cu_list(cu, None, "cu_seqlens_k")
    lens = [b - a for a, b in zip(cu, cu[1:], strict=False)]
    need = torch.tensor([-(-n // page) for n in lens])
    if int(need.max()) > block_table.shape[1]:
        raise ValueError(
            f"a sequence of {max(lens)} keys is longer than its block_table's {block_table.shape[1]} "
            f"pages of {page} slots hold"
        )
    table = block_table.cpu()
    bad = (torch.arange(table.shape[1])[None, :] < need[:, None]) & ((table < 0) | (table >= n_pages))
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(
            f"block_table[{row}, {col}] = {int(table[row, col])} is outside the cache's {n_pages} pages"
        )
