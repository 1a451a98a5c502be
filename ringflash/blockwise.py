"""Blockwise PyTorch attention backend: online softmax over key blocks, for CPU and any device.

The same interface as the Triton kernels in ``ringflash.kernels`` (see ``attn_fwd`` /
``attn_bwd``). Scores exist only one ``(block_q x block_k)`` tile per head at a time, so memory is
O(seqlen * block), never ``seqlen_q x seqlen_k``. Half-precision inputs are computed in float32.

Internally a query tile is laid out ``[B, Hk, G, bq, D]`` (G = query heads per KV head) and viewed
as ``[B, Hk, G*bq, D]`` for the matrix products, so GQA/MQA never repeats K or V and the dK/dV
products sum over the head group for free.

On CPU tensors a dense call whose mask PyTorch's fused CPU kernels can express (no mask, or a
causal band with no left window; no softcap; finite inputs) runs whole through them instead
(``blockwise_fused``), forward and backward; the tiles serve the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise_fused import fused_bwd, fused_cpu_op, fused_fwd, usable
from .masking import diag_bounds, is_fully_masked, is_masked_free, visible
from .merge import merge_into_, merge_rows_

_M_FLOOR = -1e30


@dataclass(frozen=True)
class BlockwiseConfig:
    """Tiles of the blockwise backend (set for a block with ``ringflash.backends.use_config``).

    Attributes:
        block_q: query rows per tile.
        block_k: the smallest key block.
        score_budget: bytes of float32 scores per (query tile x key block): key blocks grow up to
            this budget, so a tile needs few, large matrix products (fewer Python-level ops) while
            memory stays O(seqlen * block), never seqlen_q x seqlen_k for long inputs.
        fused_cpu: on CPU tensors, compute with PyTorch's fused flash-attention kernels (the
            fastest there): whole calls whose mask they can express (``blockwise_fused``), else
            the unmasked part of each tile; False: explicit products everywhere, as on other
            devices.
    """

    block_q: int = 256
    block_k: int = 256
    score_budget: int = 16 * 2**20
    fused_cpu: bool = True

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1 or self.score_budget < 0:
            raise ValueError(f"BlockwiseConfig needs block_q, block_k >= 1 and score_budget >= 0, got {self}")

    def key_block(self, rows: int) -> int:
        """Key block size for a query tile of ``rows`` = B * Hq * bq score rows."""
        return max(self.block_k, self.score_budget // (4 * max(rows, 1)))


DEFAULT_CONFIG = BlockwiseConfig()


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride in its last dim (PyTorch's fused CPU kernel and some matmul paths
    assume one); a copy only for views such as ``x[..., ::2]`` or a head-minor permute."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _masked_spans(lo: float, hi: float, i0: int, i1: int, j0: int, j1: int):
    """Key column spans of the tile [i0, i1) x [j0, j1) that hold masked entries: only those
    columns are masked, not the whole tile."""
    spans = []
    if lo != -math.inf and j0 < i1 - 1 + lo:
        spans.append((j0, min(j1, int(i1 - 1 + lo))))
    if hi != math.inf and j1 - 1 > i0 + hi:
        a = max(j0, int(i0 + hi) + 1)
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], j1)
        else:
            spans.append((a, j1))
    return spans


def _mask_tile_(x, lo, hi, i0, i1, j0, j1, value, shape5):
    """Fill the masked entries of the score/probability tile ``x [..., bq, j1-j0]`` with ``value``."""
    x5 = x.view(shape5)
    for a, b in _masked_spans(lo, hi, i0, i1, j0, j1):
        x5[..., a - j0 : b - j0].masked_fill_(~_tile_mask(lo, hi, i0, i1, a, b, x.device), value)


def _key_range(lo: float, hi: float, i0: int, i1: int, Sk: int) -> tuple[int, int]:
    j_start = 0 if lo == -math.inf else max(0, int(i0 + lo))
    j_end = Sk if hi == math.inf else min(Sk, int(i1 - 1 + hi) + 1)
    return j_start, j_end


def _tile_mask(lo, hi, i0, i1, j0, j1, device):
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    return visible(i, j, lo, hi)


def _q_tile(x: torch.Tensor, i0: int, i1: int, Hk: int) -> torch.Tensor:
    """``[B, S, Hq, D]`` rows i0:i1 -> float32 ``[B, Hk, G, bq, D]``."""
    B, _, Hq, D = x.shape
    return x[:, i0:i1].float().view(B, i1 - i0, Hk, Hq // Hk, D).permute(0, 2, 3, 1, 4)


def _fwd_tile_matmul(qb, kh, vh1, lo, hi, softcap, i0, i1, j_start, j_end, shape5, cfg):
    """Online softmax over key blocks with explicit products. ``qb [B, Hk, G*bq, D]`` is pre-scaled;
    ``vh1`` is V with a column of ones, so p @ [v | 1] yields the numerator and its row sum l in
    one product. Returns ``(out, lse)`` as ``[B, Hk, G*bq, Dv]`` and ``[B, Hk, G*bq, 1]``."""
    B, Hk, rows, _ = qb.shape
    Dv = vh1.shape[-1] - 1
    # A finite floor instead of -inf keeps exp(m - m_new) well defined for rows that have
    # seen no key yet (no isinf/where per tile); such rows end with l == 0.
    m = torch.full((B, Hk, rows, 1), _M_FLOOR, device=qb.device)
    acc = torch.zeros((B, Hk, rows, Dv + 1), device=qb.device)
    bk = cfg.key_block(B * Hk * rows)
    for j0 in range(j_start, j_end, bk):
        j1 = min(j_end, j0 + bk)
        if is_fully_masked(lo, hi, i0, i1, j0, j1):
            continue
        s = torch.matmul(qb, kh[:, :, j0:j1].float().transpose(-1, -2))
        if softcap > 0:
            s = torch.tanh(s.div_(softcap)).mul_(softcap)
        if not is_masked_free(lo, hi, i0, i1, j0, j1):
            _mask_tile_(s, lo, hi, i0, i1, j0, j1, -math.inf, shape5[:-1] + (j1 - j0,))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = s.sub_(m_new).exp_()
        alpha = torch.exp_(m.sub_(m_new))
        acc.mul_(alpha).add_(torch.matmul(p, vh1[:, :, j0:j1]))
        m = m_new
    acc, l = acc[..., :Dv], acc[..., Dv:]
    no_key = l == 0  # a NaN in the inputs gives l NaN: its LSE stays NaN, and so does every merge
    lse = torch.where(no_key, torch.full_like(l, -math.inf), m + torch.log(l))
    return acc / torch.where(no_key, torch.ones_like(l), l), lse


def _fwd_tile_fused(op, qb, kh, vh, scale, lo, hi, i0, i1, j_start, j_end, G, cfg):
    """The same tile through PyTorch's fused CPU kernel for the keys every row sees, and the
    explicit path (``_fwd_tile_matmul``) over the (at most ``bq``-wide) masked edges, merged by LSE.

    The edges stay off the fused kernel: its additive mask turns a masked score of ``+inf`` (an
    ``inf`` in a key) into NaN, which would reach rows that cannot see that key."""
    B, Hk, rows, _ = qb.shape
    f0 = max(j_start, int(i1 - 1 + lo)) if lo != -math.inf else j_start
    f1 = min(j_end, int(i0 + hi) + 1) if hi != math.inf else j_end
    if j_start >= j_end:
        spans = []
    elif f0 < f1:
        spans = [(f0, f1, False)] + [(a, b, True) for a, b in ((j_start, f0), (f1, j_end)) if a < b]
    else:
        spans = [(j_start, j_end, True)]
    out = lse = None
    bq = i1 - i0
    for a, b, masked in spans:
        if masked:
            ones = vh.new_ones(B, Hk, b - a, 1)
            vh1 = torch.cat([vh[:, :, a:b], ones], -1)
            # Key indices relative to the span: the band moves by ``a``.
            o, l = _fwd_tile_matmul(
                qb * scale, kh[:, :, a:b], vh1, lo - a, hi - a, 0.0, i0, i1, 0, b - a, (B, Hk, G, bq, 0), cfg
            )
        else:
            o, l = op(qb, kh[:, :, a:b], vh[:, :, a:b], 0.0, False, scale=scale)
            l = l.unsqueeze(-1)
        if out is None:
            out, lse = o.float(), l.float()
        else:
            merge_rows_(out, lse, o, l)
    if out is None:
        out = qb.new_zeros(B, Hk, rows, vh.shape[-1])
        lse = qb.new_full((B, Hk, rows, 1), -math.inf)
    return out, lse


def _fwd_dense(q, k, v, scale, causal, window_size, softcap, diag, out_acc, lse_acc, cfg):
    """Attention of padded ``q [B,Sq,Hq,D]`` over ``k, v [B,Sk,Hk,*]``.

    With ``out_acc.accumulate`` the result is merged into the float32 views ``out_acc.t`` /
    ``lse_acc``; otherwise it is written there as is.
    """
    B, Sq, Hq, _ = q.shape
    Sk, Hk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if B == 0 or Sq == 0:
        return
    G = Hq // Hk
    lo, hi = diag_bounds(diag, causal, window_size)
    if cfg.fused_cpu and usable(lo, softcap, q, k, v):  # the whole call in PyTorch's fused kernels
        out_b, lse_b = fused_fwd(q, k, v, scale, hi)
        if out_acc.accumulate:
            merge_into_(out_acc.t, lse_acc, out_b, lse_b)
        else:
            out_acc.t.copy_(out_b)
            lse_acc.copy_(lse_b)
        return
    # PyTorch's fused CPU kernel computes each tile fastest; softcap needs the explicit path.
    # The fused kernel turns a row whose scores are all NaN (a NaN in its query, or in the one key
    # of a span) into zeros with an LSE of 0, which a merge then weighs as a finite partial: inputs
    # holding a NaN take the explicit path, whose NaN reaches every row that sees it.
    op = fused_cpu_op() if cfg.fused_cpu and q.device.type == "cpu" and softcap == 0 else None
    if op is not None and (bool(torch.isnan(q).any()) or bool(torch.isnan(k).any())):
        op = None
    kh = k.permute(0, 2, 1, 3).float()  # [B, Hk, Sk, D]
    if op is not None:
        vh = v.permute(0, 2, 1, 3).float()
    else:
        vh = torch.cat([v.permute(0, 2, 1, 3).float(), v.new_ones(B, Hk, Sk, 1, dtype=torch.float32)], -1)
    for i0 in range(0, Sq, cfg.block_q):
        i1 = min(Sq, i0 + cfg.block_q)
        bq = i1 - i0
        j_start, j_end = _key_range(lo, hi, i0, i1, Sk)
        qt = _q_tile(q, i0, i1, Hk).reshape(B, Hk, G * bq, q.shape[-1])
        if op is not None:
            out_b, lse_b = _fwd_tile_fused(op, qt, kh, vh, scale, lo, hi, i0, i1, j_start, j_end, G, cfg)
        else:
            shape5 = (B, Hk, G, bq, 0)
            out_b, lse_b = _fwd_tile_matmul(
                qt * scale, kh, vh, lo, hi, softcap, i0, i1, j_start, j_end, shape5, cfg
            )
        # [B, Hk, G*bq, *] -> [B, bq, Hq, Dv] and [B, Hq, bq]
        out_b = out_b.reshape(B, Hk, G, bq, Dv).permute(0, 3, 1, 2, 4).reshape(B, bq, Hq, Dv)
        lse_b = lse_b.reshape(B, Hq, bq)
        if out_acc.accumulate:
            merge_into_(out_acc.t[:, i0:i1], lse_acc[:, :, i0:i1], out_b, lse_b)
        else:
            out_acc.t[:, i0:i1].copy_(out_b)
            lse_acc[:, :, i0:i1].copy_(lse_b)


def _bwd_dense(do, q, k, v, out, lse, delta, scale, causal, window_size, softcap, diag, dq, dk, dv, cfg):
    """Gradients of padded attention, recomputed from the saved LSE; adds into float32 dq/dk/dv.
    ``out``: the forward's output rows when ``delta`` is exactly their row sums with ``do`` (the
    fused path then hands them to its kernel), else None."""
    B, Sq, Hq, _ = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    if B == 0 or Sq == 0 or Sk == 0:
        return
    G = Hq // Hk
    lo, hi = diag_bounds(diag, causal, window_size)
    if cfg.fused_cpu and usable(lo, softcap, q, k, v, do):
        fused_bwd(do, q, k, v, out, lse, delta, scale, hi, dq, dk, dv)
        return
    kh = k.permute(0, 2, 1, 3)
    vh = v.permute(0, 2, 1, 3)
    dkh = dk.permute(0, 2, 1, 3)
    dvh = dv.permute(0, 2, 1, 3)
    # Rows that saw no key have lse = -inf; +inf makes their probabilities exactly 0.
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse.float())
    for i0 in range(0, Sq, cfg.block_q):
        i1 = min(Sq, i0 + cfg.block_q)
        bq = i1 - i0
        qb = (_q_tile(q, i0, i1, Hk) * scale).reshape(B, Hk, G * bq, q.shape[-1])
        dob = _q_tile(do, i0, i1, Hk).reshape(B, Hk, G * bq, do.shape[-1])
        lse_b = lse_safe[:, :, i0:i1].reshape(B, Hk, G * bq, 1)
        delta_b = delta[:, :, i0:i1].reshape(B, Hk, G * bq, 1)
        dqb = torch.zeros_like(qb)
        j_start, j_end = _key_range(lo, hi, i0, i1, Sk)
        # The backward keeps four score-sized tiles (s, p, dp, ds) alive at once.
        bk = cfg.key_block(4 * B * Hq * bq)
        for j0 in range(j_start, j_end, bk):
            j1 = min(j_end, j0 + bk)
            if is_fully_masked(lo, hi, i0, i1, j0, j1):
                continue
            kb = kh[:, :, j0:j1].float()
            vb = vh[:, :, j0:j1].float()
            s = torch.matmul(qb, kb.transpose(-1, -2))
            if softcap > 0:
                t = torch.tanh(s / softcap)
                s = t * softcap
            p = s.sub_(lse_b).exp_()
            if not is_masked_free(lo, hi, i0, i1, j0, j1):
                _mask_tile_(p, lo, hi, i0, i1, j0, j1, 0.0, (B, Hk, G, bq, j1 - j0))
            dvh[:, :, j0:j1] += torch.matmul(p.transpose(-1, -2), dob)
            ds = torch.matmul(dob, vb.transpose(-1, -2)).sub_(delta_b).mul_(p)
            if softcap > 0:
                ds.mul_(1.0 - t * t)
            dqb.add_(torch.matmul(ds, kb))
            dkh[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb)
        dq_tile = (
            (dqb * scale)
            .view(B, Hk, G, bq, q.shape[-1])
            .permute(0, 3, 1, 2, 4)
            .reshape(B, bq, Hq, q.shape[-1])
        )
        dq[:, i0:i1] += dq_tile


class _Target:
    """A float32 output buffer and whether results merge into it (accumulate) or overwrite it."""

    def __init__(self, t: torch.Tensor, accumulate: bool):
        self.t = t
        self.accumulate = accumulate


@dataclass(frozen=True)
class _Problem:
    """Which keys each query sees, shared by ``attn_fwd`` and ``attn_bwd``: the keyword arguments
    of ``_problem``."""

    scale: float
    causal: bool
    window_size: tuple
    softcap: float
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    diag_offset: object

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    def mask(self):
        return self.scale, self.causal, self.window_size, self.softcap

    def pieces(self, q_len: int, k_len: int):
        """``(q rows, k rows, diag)`` of each dense piece: one for a padded batch (rows ``None``:
        all of them), one per sequence for a packed one."""
        if not self.packed:
            diag = k_len - q_len if self.diag_offset is None else int(self.diag_offset)
            yield None, None, diag
            return
        cq, ck = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        d = self.diag_offset
        diags = d.tolist() if isinstance(d, torch.Tensor) else d
        for b in range(len(cq) - 1):
            diag = diags[b] if diags is not None else (ck[b + 1] - ck[b]) - (cq[b + 1] - cq[b])
            keys = slice(ck[b], ck[b + 1])
            if isinstance(diag, list):  # two-part: rows from ``split`` on use the second diagonal
                diag, split, diag2 = diag
                cut = min(cq[b] + max(split, 0), cq[b + 1])
                if cq[b] < cut < cq[b + 1]:
                    yield slice(cq[b], cut), keys, diag
                    yield slice(cut, cq[b + 1]), keys, diag2 + (cut - cq[b])
                    continue
                diag = diag if cut == cq[b + 1] else diag2
            yield slice(cq[b], cq[b + 1]), keys, diag


def _problem(
    *,
    softmax_scale,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    diag_offset=None,
    seq_order=None,
) -> _Problem:
    """The arguments ``attn_fwd`` and ``attn_bwd`` share (the kernels' names). ``max_seqlen_*`` and
    ``seq_order`` (the order in which the Triton kernels' programs take packed sequences) are
    accepted for the interface and unused: every piece is cut from ``cu_seqlens_*`` exactly."""
    window = tuple(window_size)
    return _Problem(softmax_scale, causal, window, softcap, cu_seqlens_q, cu_seqlens_k, diag_offset)


def _rows(x: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """Rows of a padded ``[B, S, ...]`` tensor (``rows`` None: all), or one packed sequence's rows
    of ``[T, ...]`` as a batch of one."""
    return x if rows is None else x[None, rows]


def _lse_rows(x: torch.Tensor, rows: slice | None) -> torch.Tensor:
    """The same for an LSE-shaped tensor (``[B, H, S]`` padded, ``[H, T]`` packed)."""
    return x if rows is None else x[:, rows].unsqueeze(0)


def attn_fwd(q, k, v, *, out=None, lse=None, merge=True, config: BlockwiseConfig | None = None, **problem):
    """Forward attention returning ``(out, lse)``.

    Padded: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hk, *]``, lse ``[B, Hq, Sq]``. Packed (``cu_seqlens_*``
    given): q ``[Tq, Hq, D]``, k/v ``[Tk, Hk, *]``, lse ``[Hq, Tq]``. ``problem``: ``softmax_scale``
    and optionally ``causal``, ``window_size``, ``softcap``, ``cu_seqlens_q``/``_k``,
    ``max_seqlen_q``/``_k``, ``diag_offset`` (the key index aligned with query 0: an int, or one
    per packed sequence, or ``[n_seq, 3]`` two-part diagonals ``(diag, split, diag2)``: rows from
    ``split`` on align key ``diag2`` with query 0, see ``kernels.launch_args.varlen_diag``; by default
    ``Sk - Sq`` per sequence). With ``out``/``lse`` given, the result
    is merged into them in place (accumulate mode, float32) or written over them (``merge=False``;
    ``out`` float32 or q's dtype; the rows of a packed sequence with no keys keep their values)
    and they are returned; otherwise ``out`` is in ``q.dtype``, ``lse`` float32. Inputs are trusted
    (the public functions in ``ringflash.ops`` validate them); any strides are taken. ``config``:
    tiles (default ``BlockwiseConfig()``).
    """
    cfg = config or DEFAULT_CONFIG
    p = _problem(**problem)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    given = out is not None
    accumulate = given and merge
    if not given:
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
        lse_shape = (q.shape[1], q.shape[0]) if p.packed else (q.shape[0], q.shape[2], q.shape[1])
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    for qr, kr, diag in p.pieces(q.shape[1], k.shape[1]):
        out_p, lse_p = _rows(out, qr), _lse_rows(lse, qr)
        kp = _rows(k, kr)
        if kp.shape[1] == 0:  # a packed sequence with no keys: given buffers keep their rows
            if not given:
                out_p.zero_()
                lse_p.fill_(-math.inf)
            continue
        _fwd_dense(_rows(q, qr), kp, _rows(v, kr), *p.mask(), diag, _Target(out_p, accumulate), lse_p, cfg)
    if given:
        return out, lse
    return out.to(q.dtype), lse


def attn_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    delta=None,
    dq=None,
    dk=None,
    dv=None,
    accumulate=(True, True),
    config: BlockwiseConfig | None = None,
    **problem,
):
    """Backward of ``attn_fwd`` from the saved ``(out, lse)``; returns ``(dq, dk, dv)``.

    ``problem``: as for ``attn_fwd``. ``out`` and ``lse`` are the final (fully merged) forward
    results; ``delta`` (rowsum of ``dout * out``, laid out like ``lse``) is computed when not given.
    With ``dq``/``dk``/``dv`` given they are returned: ``accumulate`` says whether the gradients
    are added into ``dq`` (first) and ``dk``/``dv`` (second), float32 then (ring steps), or written
    there; rows of a packed call's sequences with no keys (dQ) or no queries (dK/dV) are left as
    they are. Otherwise the gradients come back in the inputs' dtypes.
    """
    cfg = config or DEFAULT_CONFIG
    p = _problem(**problem)
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    given = dq is not None
    add_q, add_kv = accumulate if given else (False, False)
    # The fused CPU path reads ``out`` where ``delta`` is its row sums with ``dout`` (no gradient
    # into the LSE): known when computed here, else checked once for the whole call.
    plain = cfg.fused_cpu and q.device.type == "cpu" and out is not None
    if delta is None:
        delta = attn_bwd_delta(dout, out, packed=p.packed)
    elif plain:
        plain = torch.equal(delta, attn_bwd_delta(dout, out, packed=p.packed))
    plain_out = out if plain else None

    def work(x, buf, add):  # where the gradient is summed: the buffer itself, or float32 zeros
        return buf if add else torch.zeros(x.shape, dtype=torch.float32, device=x.device)

    gq, gk, gv = work(q, dq, add_q), work(k, dk, add_kv), work(v, dv, add_kv)
    pieces = list(p.pieces(q.shape[1], k.shape[1]))
    for qr, kr, diag in pieces:
        _bwd_dense(
            _rows(dout, qr),
            _rows(q, qr),
            _rows(k, kr),
            _rows(v, kr),
            None if plain_out is None else _rows(plain_out, qr),
            _lse_rows(lse, qr),
            _lse_rows(delta, qr),
            *p.mask(),
            diag,
            _rows(gq, qr),
            _rows(gk, kr),
            _rows(gv, kr),
            cfg,
        )
    if not given:
        return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)
    for qr, kr, _ in pieces:  # written gradients: the rows of every sequence with keys / queries
        n_q = q.shape[1] if qr is None else qr.stop - qr.start
        n_k = k.shape[1] if kr is None else kr.stop - kr.start
        if not add_q and n_k:
            _rows(dq, qr).copy_(_rows(gq, qr))
        if not add_kv and n_q:
            _rows(dk, kr).copy_(_rows(gk, kr))
            _rows(dv, kr).copy_(_rows(gv, kr))
    return dq, dk, dv


def attn_bwd_delta(dout: torch.Tensor, out: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """``rowsum(dout * out)`` in float32, laid out like the LSE (``[B, H, S]`` or ``[H, T]``)."""
    d = (dout.float() * out.float()).sum(-1)
    return d.transpose(-1, -2).contiguous() if packed else d.transpose(1, 2).contiguous()
