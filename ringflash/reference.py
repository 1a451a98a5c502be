"""Plain PyTorch attention returning ``(out, lse)``: the oracle every test compares with.

It materialises the full score matrix, so it is for tests and small inputs only. Run it in float64
on the CPU for the truth, or in a low precision to measure how much plain PyTorch loses there.
Conventions are flash-attn's: bottom-right causal alignment, ``window_size=(left, right)`` with -1
for unbounded, ``softcap * tanh(scores / softcap)``, GQA/MQA by head groups, a natural-log float32
LSE of shape ``(batch, nheads, seqlen_q)``, ``-inf`` and output 0 for rows that see no key.
"""

from __future__ import annotations

import torch

from .masking import diag_bounds, visible


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    diag_offset: int | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention for padded inputs.

    Args:
        q: ``[B, Sq, Hq, D]``. k: ``[B, Sk, Hk, D]``. v: ``[B, Sk, Hk, Dv]``; ``Hq % Hk == 0``.
        diag_offset: the key index aligned with query 0 (default ``Sk - Sq``, bottom-right).
        upcast: compute in the input dtype when False (used to measure low-precision error).

    Returns:
        ``(out [B, Sq, Hq, Dv] in q.dtype, lse [B, Hq, Sq] float32, or float64 for float64 input)``.
    """
    dtype = q.dtype
    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    cdtype = (torch.float64 if dtype == torch.float64 else torch.float32) if upcast else dtype
    g = Hq // Hk
    qf = q.to(cdtype).transpose(1, 2)
    kf = k.to(cdtype).transpose(1, 2).repeat_interleave(g, dim=1)
    vf = v.to(cdtype).transpose(1, 2).repeat_interleave(g, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    diag = Sk - Sq if diag_offset is None else diag_offset
    lo, hi = diag_bounds(diag, causal, window_size)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    s = s.masked_fill(~visible(i, j, lo, hi), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0))
    out = torch.matmul(p.to(vf.dtype), vf).transpose(1, 2)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return out.to(dtype), lse.to(lse_dtype)


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention for packed inputs ``[T, H, D]``; returns ``(out [Tq, Hq, Dv], lse [Hq, Tq])``."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, lse = attention_ref(
            q[None, cq[b] : cq[b + 1]],
            k[None, ck[b] : ck[b + 1]],
            v[None, ck[b] : ck[b + 1]],
            softmax_scale,
            causal,
            window_size,
            softcap,
            upcast=upcast,
        )
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)
