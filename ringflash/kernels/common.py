"""Device code shared by the kernels: program prologue, mask bounds, block runs, tile loads. The
host side of their launches is ``launch_args``.

Mask convention (``ringflash.masking``): query ``i`` sees key ``j`` iff ``lo <= j - i <= hi`` with
``lo = diag - window_left`` (only when ``HAS_LO``) and ``hi = diag + window_right`` (``0`` when
causal; only when ``HAS_HI``). For one block of rows the visible columns split into three runs of
column blocks: a masked head (left window edge), a mask-free middle, and a masked tail (diagonal
and the sequence end). Blocks outside the runs are never touched, which is what lets ring
attention skip the blocks that its position offsets mask out. ``_run_bounds`` gives run ``RUN``'s
blocks, so a kernel's inner loop runs the three with ``MASKED`` a constexpr of each (the mask-free
middle compiles without mask code).

``_attn_prologue`` is the start of every attention program (forward, dK/dV, dQ): which sequence,
head and tile it owns, its sequence's bounds (padded or packed), its mask band, and how it
addresses its tile (64-bit bases; 64-bit loop steps when an offset of the call can pass 2^31).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Literal constants in the kernels: 1.4426950408889634 = log2(e) (scores move to base 2 so the
# exponentials are exp2), 0.6931471805599453 = ln(2) (the stored LSE is a natural log).


@triton.jit
def _tanh(x):
    # tanh through exp2 (one MUFU op): exact limits +-1 for large |x| (exp2 -> inf or 0), no NaN,
    # and absolute error ~1 ulp, which is what the softcapped score needs. It is also the one
    # formulation the interpreter and every Triton version share (no libdevice).
    e = tl.exp2(x * (2.0 * 1.4426950408889634))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """``a @ b + acc`` in float32. ``DOT_F32`` upcasts the operands first: only for bfloat16 under
    the interpreter, whose numpy matmul has no bfloat16 (it returns garbage, seen with 3.9)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


# Words of a device's error flag that the check kernels set, one per bit
# (``ringflash.device_errors.KERNEL_WORDS``, which a test holds equal to this).
FLAG_WORDS = tl.constexpr(8)


@triton.jit
def or_into_flag(FLAG, bits):
    """Raise the flag's word of each bit set in ``bits``: word ``i`` stands for bit ``2**i``
    (``ringflash.device_errors``). A word is only ever stored a 1, never read and rewritten: the
    flag is host memory, where atomics may not reach, and programs whose checks fail at once must
    not overwrite each other's bits, as a read-modify-write of one shared word would."""
    if bits != 0:
        i = tl.arange(0, FLAG_WORDS)
        tl.store(FLAG + i, tl.full([FLAG_WORDS], 1, tl.int32), mask=((bits >> i) & 1) != 0)


@triton.jit
def _tile_order(n_tiles, sched_width, GROUPED: tl.constexpr, REVERSE: tl.constexpr):
    """``(tile, head)`` of this program in a 1-D grid of ``n_tiles`` row tiles x heads.

    Without ``GROUPED``: head-major (every tile of head 0, then of head 1, ...; ``REVERSE`` runs a
    head's tiles last to first). Under a causal mask tiles differ in work (up to 2x the mean), and
    in head-major order the longest tiles of the last heads start near the end of the launch and
    run alone: at 8k tokens and 32 heads about a tenth of the time. ``GROUPED`` takes heads in
    groups of ``ceil(sched_width / n_tiles)`` (``sched_width``: four per SM) and, inside a group,
    goes tile by tile across its heads, longest first, so each group's longest tiles start first
    and its shorter tiles fill in behind them; a group still spans few heads, so the programs
    running at once share K/V (or Q/dO) through L2 as head-major order does.
    """
    pid = tl.program_id(0)
    n_heads = tl.num_programs(0) // n_tiles
    group = 1
    if GROUPED:
        # Only launches of up to 6 * sched_width programs (24 per SM): in larger ones the last
        # heads' tiles are a small part of the work, and head-major order keeps the most programs
        # on one head's K/V, which measured faster there (docs/performance.md).
        span = tl.minimum(n_heads, tl.cdiv(sched_width, n_tiles))
        group = tl.where(tl.num_programs(0) <= 6 * sched_width, span, 1)
    per_group = group * n_tiles
    g = pid // per_group
    r = pid - g * per_group
    width = tl.minimum(group, n_heads - g * group)  # heads in this group (the last may be short)
    rank = r // width
    head = g * group + (r - rank * width)
    tile = rank
    if REVERSE:
        tile = n_tiles - 1 - rank
    return tile, head


@triton.jit
def _attn_prologue(
    CU_Q,
    CU_K,
    DIAG_PTR,
    SEQ_ORDER,
    seqlen_q,
    seqlen_k,
    diag,
    window_left,
    window_right,
    n_heads,
    sched_width,
    stride_a,
    stride_b,
    FLAG,
    total_q,
    total_k,
    HAS_HI: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DIAG_FROM_PTR: tl.constexpr,
    TWO_PART: tl.constexpr,
    ORDERED: tl.constexpr,
    WIDE: tl.constexpr,
    KEY_TILES: tl.constexpr,
    CHECK_CU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Where an attention program works: one tile of ``BLOCK`` query rows of one (sequence, query
    head) (forward, dQ), or with ``KEY_TILES`` of ``BLOCK`` keys of one (sequence, KV head) (dK/dV).

    ``seqlen_q``/``seqlen_k``/``diag`` are the launch's (the longest sequences when packed); packed
    sequences read their bounds from ``CU_Q``/``CU_K`` (bottom-right diagonal), and ``DIAG_PTR``
    holds one diagonal per sequence; with ``TWO_PART`` three values per sequence, ``(diag, split,
    diag2)``: rows from ``split`` on use ``diag2`` (a causal sequence whose queries are two runs
    of a document, see ``varlen_diag``), so a query tile takes the diagonal of its part, and a key
    tile ``diag2`` once it lies past the first part's last visible key. Causal tiles are ordered
    longest first (``_tile_order``). With ``ORDERED`` the launch's sequences are taken in the order
    of ``SEQ_ORDER`` (int32 ``[2, n_seq]``, a permutation per row: row 0 for query tiles, row 1
    for ``KEY_TILES``), which a caller that knows the lengths sorts heaviest first, so that the
    longest programs of a packed call do not start in its last wave; it changes when a program
    runs, never what it computes.

    ``CHECK_CU`` (packed calls whose ``cu_seqlens`` are not trusted): 1 clamps each sequence's
    bounds into the ``total_q``/``total_k`` rows of the tensors (``start`` into ``[0, total]``,
    ``end`` into ``[start, total]``), so that every row a program touches exists whatever the
    values; 2 also ORs the failed checks into ``FLAG`` (``ringflash.device_errors``: bit 64 for
    ``cu_seqlens`` that do not start at 0, decrease or do not end at the rows, bit 128 for a
    sequence longer than the launch's ``seqlen``), one program per sequence. Valid values are
    unchanged, so such a call computes what a trusted one does.

    Returns ``(b, h, t0, q_start, k_start, seqlen_q, seqlen_k, lo, hi, offs, row0, rows, step_a,
    step_b)``: the sequence and head; the tile's first row ``t0`` (past the sequence's end the
    caller returns); the sequence's first token in packed inputs (0 when padded), its lengths and
    mask band (query i sees key j iff ``lo <= j - i <= hi``); the tile's rows ``offs = t0 + [0,
    BLOCK)``; the tile's base row ``row0`` (the sequence's first row, plus ``t0`` with ``WIDE``) and
    ``rows``, the offsets that address the tile from it (``offs``, or ``[0, BLOCK)`` with
    ``WIDE``); and ``stride_a``/``stride_b``, the row strides of what the program streams, as
    int64 with ``WIDE``. 64-bit bases: ``b * stride_b`` overflows int32 for large batches of long
    sequences; with ``WIDE`` (a token offset of the call passes 2^31 elements, e.g. 512k tokens x
    32 heads x 128) the base also takes the tile's first row, so only in-tile offsets stay 32-bit
    and the loops step in 64 bits; without it the code is the plain 32-bit one.
    """
    if KEY_TILES:
        n_tiles = tl.cdiv(seqlen_k, BLOCK)
        pid_t, pid_bh = _tile_order(n_tiles, sched_width, HAS_HI, False)
    else:
        n_tiles = tl.cdiv(seqlen_q, BLOCK)
        pid_t, pid_bh = _tile_order(n_tiles, sched_width, HAS_HI, HAS_HI)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    n_seq = tl.num_programs(0) // (n_tiles * n_heads)
    if ORDERED:
        if KEY_TILES:
            b = tl.load(SEQ_ORDER + n_seq + b)  # row 1
        else:
            b = tl.load(SEQ_ORDER + b)
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        q_end = tl.load(CU_Q + b + 1)
        k_start = tl.load(CU_K + b)
        k_end = tl.load(CU_K + b + 1)
        if CHECK_CU == 2:
            if (pid_t == 0) & (h == 0):
                last = b == n_seq - 1
                bad = (q_end < q_start) | (k_end < k_start)
                bad |= (b == 0) & ((q_start != 0) | (k_start != 0))
                bad |= last & ((q_end != total_q) | (k_end != total_k))
                long = (q_end - q_start > seqlen_q) | (k_end - k_start > seqlen_k)
                or_into_flag(FLAG, bad.to(tl.int32) * 64 | long.to(tl.int32) * 128)
        if CHECK_CU:
            q_start = tl.minimum(tl.maximum(q_start, 0), total_q)
            q_end = tl.minimum(tl.maximum(q_end, q_start), total_q)
            k_start = tl.minimum(tl.maximum(k_start, 0), total_k)
            k_end = tl.minimum(tl.maximum(k_end, k_start), total_k)
        seqlen_q = q_end - q_start
        seqlen_k = k_end - k_start
        diag = seqlen_k - seqlen_q
    else:
        q_start = b * 0
        k_start = b * 0
    t0 = pid_t * BLOCK
    if DIAG_FROM_PTR:
        if TWO_PART:
            diag = tl.load(DIAG_PTR + 3 * b)
            split = tl.load(DIAG_PTR + 3 * b + 1)
            if KEY_TILES:
                late = t0 >= split + diag  # keys past the first part's reach
            else:
                late = t0 >= split
            diag = tl.where(late, tl.load(DIAG_PTR + 3 * b + 2), diag)
        else:
            diag = tl.load(DIAG_PTR + b)
    lo = diag - window_left
    hi = diag + window_right
    offs = t0 + tl.arange(0, BLOCK)
    if KEY_TILES:
        row0 = k_start
    else:
        row0 = q_start
    rows = offs
    step_a, step_b = stride_a, stride_b
    if WIDE:
        row0 = row0 + t0
        rows = tl.arange(0, BLOCK)
        step_a, step_b = tl.cast(stride_a, tl.int64), tl.cast(stride_b, tl.int64)
    return b, h, t0, q_start, k_start, seqlen_q, seqlen_k, lo, hi, offs, row0, rows, step_a, step_b


@triton.jit
def _block_ranges(
    r0,
    n_cols,
    lo,
    hi,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Column-block runs for rows ``[r0, r0 + BLOCK_R)`` where row r sees column c iff
    ``lo <= c - r <= hi`` and ``c < n_cols``.

    Returns ``(start, full_start, full_end, end)``: blocks from ``start`` to ``full_start`` and
    from ``full_end`` to ``end`` need the mask, blocks in ``[full_start, full_end)`` are entirely
    visible. ``start``, ``full_start`` and ``full_end`` are multiples of ``BLOCK_C``.
    """
    start = 0
    full_start = 0
    end = n_cols
    full_end = n_cols // BLOCK_C * BLOCK_C
    if HAS_LO:
        # Clamp before dividing: integer division of negatives is not floor division.
        start = tl.maximum(r0 + lo, 0) // BLOCK_C * BLOCK_C
        full_start = tl.cdiv(tl.maximum(r0 + BLOCK_R - 1 + lo, 0), BLOCK_C) * BLOCK_C
    if HAS_HI:
        end = tl.minimum(r0 + BLOCK_R + hi, n_cols)
        full_end = tl.maximum(tl.minimum(r0 + hi + 1, n_cols), 0) // BLOCK_C * BLOCK_C
    end = tl.maximum(end, start)
    full_start = tl.minimum(tl.maximum(full_start, start), end)
    full_end = tl.minimum(tl.maximum(full_end, full_start), end)
    return start, full_start, full_end, end


@triton.jit
def _run_bounds(RUN: tl.constexpr, start, full_start, full_end, end):
    """Blocks ``[run_start, run_end)`` of run ``RUN`` of ``_block_ranges``' runs: 0 the masked
    head, 1 the mask-free middle, 2 the masked tail. A kernel's inner loop runs
    ``for RUN in tl.static_range(3)`` with ``MASKED = RUN != 1``, so each run is compiled on its
    own, the middle without mask code."""
    if RUN == 0:
        run_start, run_end = start, full_start
    elif RUN == 1:
        run_start, run_end = full_start, full_end
    else:
        run_start, run_end = full_end, end
    return run_start, run_end


@triton.jit
def _visible(offs_r, offs_c, n_rows, n_cols, lo, hi, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Boolean ``[R, C]`` tile: in bounds and inside the diagonal band."""
    mask = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
    if HAS_HI:
        mask = mask & (offs_c[None, :] - offs_r[:, None] <= hi)
    if HAS_LO:
        mask = mask & (offs_c[None, :] - offs_r[:, None] >= lo)
    return mask


@triton.jit
def _rows_desc(base, n_rows, stride, COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """TMA descriptor of ``n_rows`` rows of ``COLS`` elements at ``base`` (row stride ``stride``,
    last dim contiguous), read in ``[BLOCK_R, BLOCK_C]`` tiles: rows past ``n_rows`` and columns
    past ``COLS`` read as 0, so tails need no masks. An empty sequence gets a one-row shape (a
    descriptor must be nonempty); no tile of it is read then."""
    return tl.make_tensor_descriptor(
        base, shape=[tl.maximum(n_rows, 1), COLS], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_C]
    )


@triton.jit
def _tile_src(
    seq,
    n_rows,
    stride_r,
    stride_c,
    offs_r,
    offs_c,
    COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TMA: tl.constexpr,
):
    """Where a kernel streams ``[BLOCK_R, BLOCK_C]`` tiles of the ``n_rows`` rows at ``seq`` from:
    with ``TMA`` their descriptor (``_rows_desc``), else the pointer tile of the first block (rows
    ``offs_r``, columns ``offs_c``), which the caller offsets and masks."""
    if TMA:
        return _rows_desc(seq, n_rows, stride_r, COLS, BLOCK_R, BLOCK_C)
    else:
        return seq + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def _scores(a, b, sm_scale, softcap, SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """Scores in log2 units and the tanh of the softcap (``t``; 0 when there is none)."""
    s = _dot(a, tl.trans(b), None, DOT_PREC, DOT_F32)
    if SOFTCAP:
        t = _tanh(s * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = 0.0
        s = s * (sm_scale * 1.4426950408889634)
    return s, t
