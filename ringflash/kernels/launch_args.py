"""The host side of the attention kernels' launches: their shared arguments (``attn_args``) and
the flags and autotune keys that follow from them, mask flags, strides, and the small integer
helpers every launcher uses."""

from __future__ import annotations

import torch
import triton

from .device import sm_count
from .options import AttnConfig


def sched_width(device: torch.device, config: AttnConfig) -> int:
    """The ``sched_width`` of ``_tile_order``: ``config.sched_per_sm`` programs per SM of ``device``."""
    return max(1, config.sched_per_sm * sm_count(device))


def mask_flags(causal: bool, window_size) -> tuple[bool, bool, int, int]:
    """``(HAS_LO, HAS_HI, window_left, window_right)`` for the kernels (right is 0 when causal)."""
    left, right = int(window_size[0]), int(window_size[1])
    has_hi = bool(causal) or right >= 0
    return left >= 0, has_hi, max(left, 0), 0 if causal else max(right, 0)


def stride_names(tensor: str, dims: str) -> tuple[str, ...]:
    """Kernel argument names of a tensor's strides: ``stride_names("q", "bsh")`` is
    ``("stride_qb", "stride_qs", "stride_qh")``."""
    return tuple(f"stride_{tensor}{d}" for d in dims)


def strides(t: torch.Tensor, names: tuple[str, ...], packed: bool = False) -> dict[str, int]:
    """Keyword arguments ``{name: stride}`` for the leading dims of ``t`` (``names`` from
    ``stride_names``); ``packed`` ``[T, H, D]`` tensors get a batch stride of 0 first, so that they
    are addressed as ``[1, T, H, D]``."""
    return dict(zip(names, (0, *t.stride()) if packed else t.stride(), strict=False))


def cdiv(a: int, b: int) -> int:
    """Host-side ceiling division (``triton.cdiv`` is a constexpr function, slower on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Host-side smallest power of two >= ``n``, as ``triton.next_power_of_2`` (0 for 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def pad_dim(d: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest dot) with masked loads."""
    return max(16, next_pow2(d))


def seq_bucket(s: int) -> int:
    """Autotune key for a sequence length: a power of two, so varlen batches reuse tuned configs."""
    return min(next_pow2(max(int(s), 1)), 16384)


def shape_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Autotune key of a call's shape: both lengths' buckets in one integer, so a ring step of 8k
    queries x 4k keys and one of 4k x 8k are tuned apart (their best tiles differ)."""
    return seq_bucket(seqlen_q) * 2**15 + seq_bucket(seqlen_k)


def dot_precision(dtype) -> str:
    """float32 inputs use 3xTF32 (about float32 accuracy at tensor-core speed); 16-bit ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def dot_f32(t) -> bool:
    """The interpreter path for bfloat16 needs float32 dot operands (see ``_dot``)."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def two_part(diag_offset) -> bool:
    """Whether a packed call's ``diag_offset`` gives two-part diagonals: ``[n_seq, 3]`` rows of
    ``(diag, split, diag2)``."""
    return isinstance(diag_offset, torch.Tensor) and diag_offset.dim() == 2


def varlen_diag(diag_offset, n_seq: int, device):
    """Per-sequence diagonal offsets for packed inputs as an int32 tensor, or None (bottom-right).

    ``[n_seq, 3]`` rows ``(diag, split, diag2)`` (``two_part``) describe causal sequences without a
    window whose query rows from ``split`` on see keys up to ``row + diag2`` instead of ``row +
    diag``, with ``diag2 >= diag``: a rank's two runs of one document against its keys, in one
    sequence. The kernels need ``split`` and ``split + diag`` to be multiples of 128 (the largest
    tile), so that no tile holds rows or keys of both parts' diagonals."""
    if diag_offset is None:
        return None
    if two_part(diag_offset):
        assert diag_offset.shape == (n_seq, 3), "two-part diagonals need (diag, split, diag2) per sequence"
        return diag_offset.to(device=device, dtype=torch.int32).contiguous()
    d = torch.as_tensor(diag_offset, dtype=torch.int32, device=device).reshape(-1)
    if d.numel() == 1 and n_seq != 1:
        d = d.expand(n_seq).contiguous()
    assert d.numel() == n_seq, "diag_offset needs one value per packed sequence"
    return d


# What ``call_tensors`` binds, in its order.
CALL_TENSORS = ("Q", "K", "V", "CU_Q", "CU_K", "DIAG_PTR", "SEQ_ORDER")


def call_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, diag_offset, n_seq: int, seq_order=None) -> dict:
    """The tensor arguments that ``attn_args`` derives, bound for one call: what a launch kept per
    call signature (``fwd._FWD_LAUNCHES``, ``bwd._BWD_LAUNCHES``) takes anew on every call."""
    packed = cu_seqlens_q is not None
    cu_k = cu_seqlens_k if packed else None
    diag = varlen_diag(diag_offset, n_seq, q.device) if packed else None
    order = seq_order if packed else None
    return dict(zip(CALL_TENSORS, (q, k, v, cu_seqlens_q, cu_k, diag, order), strict=True))


def wide_offsets(*tensors) -> bool:
    """True when an element offset inside some tensor can pass 2^31 - 1 (int32 index arithmetic
    would wrap): the kernels then step through tokens in 64 bits."""
    for t in tensors:  # plain loops: this runs on every launch, and generators cost host time
        last = 0
        for n, st in zip(t.shape, t.stride(), strict=True):
            last += (n - 1) * st
        if last >= 2**31 - 1:
            return True
    return False


# Flags of the attention kernels that follow from their arguments. Applied outside the autotuner,
# so that they are in its key and its prune sees the padded head dims.
attn_heuristics = triton.heuristics(
    {
        "D_PAD": lambda a: pad_dim(a["HEAD_DIM"]),
        "DV_PAD": lambda a: pad_dim(a["HEAD_DIM_V"]),
        "SOFTCAP": lambda a: a["softcap"] > 0,
        "IS_VARLEN": lambda a: a["CU_Q"] is not None,
        "DIAG_FROM_PTR": lambda a: a["DIAG_PTR"] is not None,
        "TWO_PART": lambda a: two_part(a["DIAG_PTR"]),
        "ORDERED": lambda a: a["SEQ_ORDER"] is not None,
        "DOT_PREC": lambda a: dot_precision(a["Q"].dtype),
        "DOT_F32": lambda a: dot_f32(a["Q"]),
    }
)


# What the attention kernels' tuned configs depend on, besides their own in-place flag (the forward's
# ACCUMULATE, the backward's ADD): the autotuners' keys.
TUNE_KEY = (
    "SEQ_BUCKET",
    "HEAD_DIM",
    "HEAD_DIM_V",
    "HAS_LO",
    "HAS_HI",
    "SOFTCAP",
    "IS_VARLEN",
    "TWO_PART",
    "TMA",
)


_Q, _K, _V = stride_names("q", "bshd"), stride_names("k", "bshd"), stride_names("v", "bshd")


def attn_args(
    q,
    k,
    v,
    *,
    softmax_scale,
    causal,
    window_size,
    softcap,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    diag_offset,
    config: AttnConfig,
    bound_cu: bool = False,
    flag: torch.Tensor | None = None,
    seq_order: torch.Tensor | None = None,
) -> tuple[dict, int, int, int]:
    """The launch arguments that the forward, dK/dV and dQ kernels share, and ``(B, Sq, Sk)``.

    Padded q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hk, D(v)]``; or packed q ``[Tq, Hq, D]``, k/v
    ``[Tk, Hk, D(v)]`` with int32 ``cu_seqlens_q``/``cu_seqlens_k`` ``[B + 1]`` (``Sq``/``Sk``
    are then the longest sequences, ``max_seqlen_*`` or computed). ``diag_offset``: the key index
    aligned with query 0 (an int; for packed inputs one per sequence), None for bottom-right.
    ``bound_cu``: packed ``cu_seqlens`` are not trusted: the kernels clamp each sequence's bounds
    to the tensors' rows and, given the device's error ``flag``, report failed checks into it
    (``_attn_prologue``'s ``CHECK_CU``). ``seq_order``: packed calls only, int32 ``[2, B]``, the
    order in which the programs take the sequences (``_attn_prologue``'s ``SEQ_ORDER``), or None.
    """
    packed = cu_seqlens_q is not None
    Hq, D = q.shape[-2], q.shape[-1]
    Hk, Dv = k.shape[-2], v.shape[-1]
    assert Hq % Hk == 0 and k.shape[-1] == D and D <= 256 and Dv <= 256
    has_lo, has_hi, wl, wr = mask_flags(causal, window_size)
    if packed:
        B = cu_seqlens_q.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        Sq, Sk, diag = int(max_seqlen_q), int(max_seqlen_k), 0
        diag_t = varlen_diag(diag_offset, B, q.device)
    else:
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        diag = Sk - Sq if diag_offset is None else int(diag_offset)
        diag_t = None
    args = dict(
        Q=q,
        K=k,
        V=v,
        CU_Q=cu_seqlens_q,
        CU_K=cu_seqlens_k if packed else None,
        DIAG_PTR=diag_t,
        SEQ_ORDER=seq_order if packed else None,
        **strides(q, _Q, packed),
        **strides(k, _K, packed),
        **strides(v, _V, packed),
        seqlen_q=Sq,
        seqlen_k=Sk,
        diag=diag,
        window_left=wl,
        window_right=wr,
        group=Hq // Hk,
        sm_scale=float(softmax_scale),
        softcap=float(softcap),
        sched_width=sched_width(q.device, config),
        SEQ_BUCKET=shape_bucket(Sq, Sk),
        HEAD_DIM=D,
        HEAD_DIM_V=Dv,
        HAS_LO=has_lo,
        HAS_HI=has_hi,
        FLAG=flag if packed and bound_cu else None,
        total_q=q.shape[0] if packed else 0,
        total_k=k.shape[0] if packed else 0,
        CHECK_CU=(2 if flag is not None else 1) if packed and bound_cu else 0,
    )
    return args, B, Sq, Sk
