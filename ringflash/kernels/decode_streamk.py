"""Stream-K decoding: every program gets an equal share of the whole batch's key tiles.

The split kernel (``decode.py``) gives every (batch row, KV head) the same number of programs, so
its grid is a whole number of programs per row: with 8 KV heads on an H100's 132 SMs, batch 1 (16
splits) and batch 16 (one split) both run 128 programs and leave 4 SMs idle, and rows of unequal
length leave programs idle at the end. Here the grid is one program per SM. Lay every (batch row,
KV head)'s visible key tiles end to end (batch row, then KV head, then key): of ``T`` tiles in all,
program ``p`` of ``P`` takes ``[p T / P, (p + 1) T / P)``, so no two programs differ by more than
one tile. A program's range may cross rows: its part of each row is a *piece*, streamed with the
online softmax of the split kernel. A row that lies in one piece writes its result directly;
otherwise every piece writes a float32 partial ``(out, lse)`` and the row's last piece to finish
merges them (one counter per row, see ``decode_counters.py``).

Pieces are numbered ``p + n(r)``, where ``n(r)`` counts the non-empty rows before row ``r``. The
number grows strictly along the tiles, so it is unique and below ``P + rows``, and the pieces of a
row are consecutive. Lengths are read on the device and every buffer is sized from the shapes, so a
call can be captured in a CUDA graph. Rows with no visible key end as ``out = 0``, ``lse = -inf``.

Applies when one block of query rows holds a KV head's whole group (``GROUP * Sq <= 64``) and the
batch is at most ``MAX_BATCH``; the launcher uses the split kernel otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, pad_dim
from .decode_combine import _combine_rows
from .decode_counters import semaphore_buffer
from .decode_tiles import _append_tokens, _attend_block, _store_rows

__all__ = ["MAX_BATCH", "decode_stream_k", "stream_k_applies"]

MAX_BATCH = 1024
_COMBINE_TILE = 8192  # rows x pieces x D_PAD floats loaded at once by the merge


@triton.jit
def _pick(vec, sel):
    """The element of ``vec`` where ``sel`` is true (exactly one)."""
    return tl.sum(tl.where(sel, vec, 0), 0)


@triton.jit
def _first_program(t, n_work, total):
    """The program whose tiles ``[p T / P, (p + 1) T / P)`` hold tile ``t``."""
    return ((t + 1) * n_work - 1) // total


@triton.jit
def _locate(t, row_end_v, tiles_v, tiles_before_v, rows_before_v, offs_b, b_ok, n_kv_heads):
    """Tile ``t`` of all: ``(batch row, KV head, tile in its row, the row's tiles, n(row))``."""
    b = tl.sum(((row_end_v <= t) & b_ok).to(tl.int32), 0)
    sel = offs_b == b
    tiles_b = tl.maximum(_pick(tiles_v, sel), 1)
    off = t - _pick(tiles_before_v, sel).to(tl.int64) * n_kv_heads
    hk = (off // tiles_b).to(tl.int32)
    k = (off % tiles_b).to(tl.int32)
    return b, hk, k, tiles_b, _pick(rows_before_v, sel).to(tl.int64) * n_kv_heads + hk


@triton.jit(
    do_not_specialize=[
        "batch",
        "seqlen_q",
        "n_new",
        "page_size",
        "capacity",
        "n_rows",
        "window_left",
        "window_right",
    ]
)
def _decode_stream_k_kernel(
    Q,
    K,
    V,
    KN,
    VN,
    OP,
    LSEP,
    O,
    LSE,
    SEM,
    SEQLENS,
    BT,
    CBI,
    DIAG,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_btb,
    stride_opn,
    stride_ops,
    stride_opg,
    stride_lps,
    stride_lpg,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_ls,
    batch,
    seqlen_q,
    n_new,
    page_size,
    capacity,
    n_rows,
    window_left,
    window_right,
    n_kv_heads,
    sm_scale,
    softcap,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_CBI: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
    FUSE_APPEND: tl.constexpr,
    EVICT: tl.constexpr,
    COMBINE_M: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)

    # Every batch row's visible keys (the same for its KV heads): [start, cache_end) from the
    # cache, [new_start, end) the new tokens (FUSE_APPEND; read from KN/VN), in whole tiles each.
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < batch
    n_old_v = tl.minimum(tl.maximum(tl.load(SEQLENS + offs_b, mask=b_ok, other=0), 0), capacity - n_new)
    seqlen_v = n_old_v + n_new
    if DIAG_FROM_PTR:
        diag_v = tl.load(DIAG + offs_b, mask=b_ok, other=0)
    else:
        diag_v = seqlen_v - seqlen_q
    start_v = tl.zeros([BLOCK_B], tl.int32)
    end_v = seqlen_v
    if HAS_LO:
        start_v = tl.maximum(diag_v - window_left, 0)
    if HAS_HI:
        end_v = tl.minimum(end_v, seqlen_q + diag_v + window_right)
    end_v = tl.maximum(end_v, start_v)
    if FUSE_APPEND:
        cache_end_v = tl.maximum(tl.minimum(end_v, n_old_v), start_v)
        new_start_v = tl.minimum(tl.maximum(start_v, n_old_v), end_v)
    else:
        cache_end_v = end_v
        new_start_v = end_v
    cache_tiles_v = tl.cdiv(cache_end_v - start_v, BLOCK_N)
    tiles_v = tl.where(b_ok, cache_tiles_v + tl.cdiv(end_v - new_start_v, BLOCK_N), 0)
    tiles_before_v = tl.cumsum(tiles_v, 0) - tiles_v
    nonempty_v = (tiles_v > 0).to(tl.int32)
    rows_before_v = tl.cumsum(nonempty_v, 0) - nonempty_v
    row_end_v = (tiles_before_v + tiles_v).to(tl.int64) * n_kv_heads
    n_tiles = tl.sum(tiles_v, 0).to(tl.int64) * n_kv_heads
    total = tl.maximum(n_tiles, 1)  # a divisor
    n_work = tl.minimum(n_tiles, n_prog)  # programs with tiles, at least one tile each

    offs_r = tl.arange(0, BLOCK_M)
    offs_t = offs_r // GROUP
    offs_g = offs_r % GROUP
    row_ok = offs_t < seqlen_q
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    out_ok = row_ok[:, None] & d_ok[None, :]
    qk_scale = sm_scale * 1.4426950408889634
    cap_scale = 0.0
    cap_out = 0.0
    if SOFTCAP:
        cap_scale = sm_scale / softcap
        cap_out = softcap * 1.4426950408889634

    # One loop over this program's tiles, with no branch, so it is software-pipelined like the
    # split kernel's: each tile finds its row from the tile index, K/V come from the cache or (new
    # tokens) from KN/VN by a pointer select, and at a piece's last tile the result is stored
    # (final or partial, by masks) and the running softmax restarts.
    t_start = (pid * total) // tl.maximum(n_work, 1)
    t_end = ((pid + 1) * total) // tl.maximum(n_work, 1)
    if pid >= n_work:
        t_end = t_start
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for tt in range(t_start, t_end):
        b, hk, k, tiles_b, row_pieces = _locate(
            tt, row_end_v, tiles_v, tiles_before_v, rows_before_v, offs_b, b_ok, n_kv_heads
        )
        sel = offs_b == b
        n_old = _pick(n_old_v, sel)
        diag = _pick(diag_v, sel)
        cache_tiles = _pick(cache_tiles_v, sel)
        is_new = k >= cache_tiles
        j0 = tl.where(
            is_new, _pick(new_start_v, sel) + (k - cache_tiles) * BLOCK_N, _pick(start_v, sel) + k * BLOCK_N
        )
        offs_j = j0 + offs_n
        j_ok = offs_j < tl.where(is_new, _pick(end_v, sel), _pick(cache_end_v, sel))
        offs_h = hk * GROUP + offs_g
        q = tl.load(
            Q
            + b.to(tl.int64) * stride_qb
            + offs_t[:, None] * stride_qs
            + offs_h[:, None] * stride_qh
            + offs_d[None, :],
            mask=out_ok,
            other=0.0,
        )
        if HAS_CBI:
            cache_row = tl.minimum(tl.maximum(tl.load(CBI + b), 0), n_rows - 1).to(tl.int64)
        else:
            cache_row = b.to(tl.int64)
        in_cache = (j_ok & (k < cache_tiles)) != 0
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * stride_btb + offs_j // page_size, mask=in_cache, other=0)
            page = tl.minimum(tl.maximum(page, 0), n_rows - 1)
            k_rows = page.to(tl.int64) * stride_kb + (offs_j % page_size).to(tl.int64) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (offs_j % page_size).to(tl.int64) * stride_vs
        else:
            k_rows = cache_row * stride_kb + offs_j.to(tl.int64) * stride_ks
            v_rows = cache_row * stride_vb + offs_j.to(tl.int64) * stride_vs
        k_ptrs = K + hk * stride_kh + k_rows[:, None] + offs_d[None, :]
        v_ptrs = V + hk * stride_vh + v_rows[:, None] + offs_d[None, :]
        if FUSE_APPEND:
            src = (offs_j - n_old).to(tl.int64)
            kn_ptrs = (
                KN
                + b.to(tl.int64) * stride_knb
                + hk * stride_knh
                + src[:, None] * stride_kns
                + offs_d[None, :]
            )
            vn_ptrs = (
                VN
                + b.to(tl.int64) * stride_vnb
                + hk * stride_vnh
                + src[:, None] * stride_vns
                + offs_d[None, :]
            )
            k_ptrs = tl.where(is_new, kn_ptrs, k_ptrs)
            v_ptrs = tl.where(is_new, vn_ptrs, v_ptrs)
        kv_mask = j_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_ptrs, mask=kv_mask, other=0.0, eviction_policy=EVICT)
        vt = tl.load(v_ptrs, mask=kv_mask, other=0.0, eviction_policy=EVICT)
        m_i, l_i, acc = _attend_block(
            q,
            kt,
            vt,
            offs_j,
            j_ok,
            offs_t,
            row_ok,
            m_i,
            l_i,
            acc,
            diag - window_left,
            diag + window_right,
            qk_scale,
            cap_scale,
            cap_out,
            HAS_LO,
            HAS_HI,
            SOFTCAP,
            DOT_PREC,
            DOT_F32,
        )
        # End of a piece: the row's last tile, or this program's.
        piece_end = (k == tiles_b - 1) | (tt == t_end - 1)
        row_start = tt - k
        p_a = _first_program(row_start, n_work, total)
        p_b = _first_program(row_start + tiles_b - 1, n_work, total)
        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        # (compared with 0: bools combined with scalar compares come out as int32 in the interpreter)
        done_ok = (row_ok & piece_end) != 0
        _store_rows(
            O,
            LSE,
            b,
            offs_t,
            offs_h,
            offs_d,
            o,
            lse,
            (done_ok & (p_a == p_b)) != 0,
            d_ok,
            stride_ob,
            stride_os,
            stride_oh,
            stride_lb,
            stride_lh,
            stride_ls,
        )
        piece = pid + row_pieces
        part_ok = (done_ok & (p_a != p_b)) != 0
        o_ptrs = OP + piece * stride_opn + offs_t[:, None] * stride_ops + offs_g[:, None] * stride_opg
        tl.store(o_ptrs + offs_d[None, :], o, mask=part_ok[:, None] & d_ok[None, :])
        tl.store(LSEP + offs_t * stride_lps + offs_g * stride_lpg + piece, lse, mask=part_ok)
        m_i = tl.where(piece_end, float("-inf"), m_i)
        l_i = tl.where(piece_end, 0.0, l_i)
        acc = tl.where(piece_end, 0.0, acc)

    # Only a program's first and last pieces can share their row with other programs: count them
    # in, and the last to arrive merges the row. As in the split kernel, the acq_rel atomic
    # publishes this program's partial stores and, for the last, acquires the others'; the last
    # puts the counter back to 0.
    tl.debug_barrier()
    first_row_start = (
        t_start
        - _locate(t_start, row_end_v, tiles_v, tiles_before_v, rows_before_v, offs_b, b_ok, n_kv_heads)[2]
    )
    for end_piece in tl.static_range(2):
        tt = t_start
        if end_piece == 1:
            tt = t_end - 1
        b, hk, k, tiles_b, row_pieces = _locate(
            tt, row_end_v, tiles_v, tiles_before_v, rows_before_v, offs_b, b_ok, n_kv_heads
        )
        row_start = tt - k
        p_first = _first_program(row_start, n_work, total)
        p_last = _first_program(row_start + tiles_b - 1, n_work, total)
        counts = (t_start < t_end) & (p_first != p_last)
        if end_piece == 1:
            counts = counts & (row_start > first_row_start)  # not the first piece's row again
        if counts:
            sem = SEM + b * n_kv_heads + hk
            done = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
            if done == p_last - p_first:
                first = p_first + row_pieces
                # _combine_rows addresses head h = hk * GROUP + g at h * stride; shift the bases so
                # that lands on g, and start at the row's first piece.
                _combine_rows(
                    OP + first * stride_opn - hk * GROUP * stride_opg,
                    LSEP + first - hk * GROUP * stride_lpg,
                    O,
                    LSE,
                    b,
                    hk,
                    0,
                    GROUP * seqlen_q,
                    (p_last - p_first + 1).to(tl.int32),
                    0,
                    stride_ops,
                    stride_opg,
                    stride_opn,
                    0,
                    stride_lps,
                    stride_lpg,
                    stride_ob,
                    stride_os,
                    stride_oh,
                    stride_lb,
                    stride_lh,
                    stride_ls,
                    GROUP,
                    HEAD_DIM,
                    D_PAD,
                    COMBINE_M,
                    SPLIT_BLOCK,
                )
                tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")

    # Every row's new tokens into the cache (no program reads cache slots from n_old on, so any
    # program may write them at any time); rows with no visible key: out = 0, lse = -inf.
    for r in range(pid, batch * n_kv_heads, n_prog):
        b = r // n_kv_heads
        hk = r % n_kv_heads
        if _pick(tiles_v, offs_b == b) == 0:
            offs_h = hk * GROUP + offs_g
            _store_rows(
                O,
                LSE,
                b,
                offs_t,
                offs_h,
                offs_d,
                tl.zeros([BLOCK_M, D_PAD], tl.float32),
                tl.full([BLOCK_M], float("-inf"), tl.float32),
                row_ok,
                d_ok,
                stride_ob,
                stride_os,
                stride_oh,
                stride_lb,
                stride_lh,
                stride_ls,
            )
        if FUSE_APPEND:
            if HAS_CBI:
                cache_row = tl.minimum(tl.maximum(tl.load(CBI + b), 0), n_rows - 1).to(tl.int64)
            else:
                cache_row = b.to(tl.int64)
            _append_tokens(
                K + hk * stride_kh,
                V + hk * stride_vh,
                KN + b.to(tl.int64) * stride_knb + hk * stride_knh,
                VN + b.to(tl.int64) * stride_vnb + hk * stride_vnh,
                BT,
                b,
                cache_row,
                _pick(n_old_v, offs_b == b),
                n_new,
                offs_n,
                offs_d,
                d_ok,
                stride_kb,
                stride_ks,
                stride_vb,
                stride_vs,
                stride_kns,
                stride_vns,
                stride_btb,
                page_size,
                n_rows,
                PAGED,
                BLOCK_N,
            )


def stream_k_applies(batch: int, group: int, seqlen_q: int, block_m: int) -> bool:
    """Whether :func:`decode_stream_k` serves this shape (one query-row block per KV head)."""
    return 0 < batch <= MAX_BATCH and group * seqlen_q <= block_m


def decode_stream_k(args: dict, programs: int):
    """Launch the stream-K kernel on ``programs`` programs. ``args``: what ``decode.decode_fwd``
    prepared (tensors, strides, scalars and meta-parameters of the split kernel's launch)."""
    q, out = args["q"], args["out"]
    B, Sq, Hq, D = q.shape
    Hk, group = args["n_kv_heads"], args["group"]
    dev = q.device
    pieces = programs + B * Hk
    o_part = torch.empty((pieces, Sq, group, D), dtype=torch.float32, device=dev)
    lse_part = torch.empty((Sq, group, pieces), dtype=torch.float32, device=dev)
    sem = semaphore_buffer(dev, B * Hk)
    d_pad = pad_dim(D)
    combine_m = min(args["block_m"], next_pow2(group * Sq))
    _decode_stream_k_kernel[(programs,)](
        q,
        args["k_cache"],
        args["v_cache"],
        args["k_new"],
        args["v_new"],
        o_part,
        lse_part,
        out,
        args["lse"],
        sem,
        args["cache_seqlens"],
        args["block_table"],
        args["cache_batch_idx"],
        args["diag"],
        *q.stride()[:3],
        *args["k_cache"].stride()[:3],
        *args["v_cache"].stride()[:3],
        *args["k_new"].stride()[:3],
        *args["v_new"].stride()[:3],
        args["stride_bt"],
        *o_part.stride()[:3],
        *lse_part.stride()[:2],
        *out.stride()[:3],
        *args["lse"].stride()[:3],
        B,
        Sq,
        args["n_new"],
        args["page_size"],
        args["capacity"],
        args["k_cache"].shape[0],
        args["window_left"],
        args["window_right"],
        Hk,
        args["softmax_scale"],
        args["softcap"],
        GROUP=group,
        HEAD_DIM=D,
        D_PAD=d_pad,
        COMBINE_M=combine_m,
        SPLIT_BLOCK=max(1, _COMBINE_TILE // (combine_m * d_pad)),
        BLOCK_M=args["block_m"],
        BLOCK_B=max(16, next_pow2(B)),
        **args["meta"],
    )
