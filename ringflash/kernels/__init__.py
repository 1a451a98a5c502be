"""Triton flash-attention kernels: the ``triton`` backend (same interface as ``ringflash.blockwise``).

``attn_fwd`` returns ``(out, lse)``; ``attn_bwd`` returns ``(dq, dk, dv)`` from the saved forward
results; ``attn_bwd_delta`` is ``rowsum(dout * out)`` laid out like the LSE. CUDA tensors run the
compiled kernels (autotuned for Hopper); CPU tensors need Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported) and run one fixed small tile shape.
"""

from .bwd import attn_bwd, attn_bwd_delta
from .fwd import attn_fwd

__all__ = ["attn_bwd", "attn_bwd_delta", "attn_fwd"]
