"""Triton kernels and their launchers: ``(q, k, v, ...) -> (out, lse)``, no autograd.

- ``kernels.fwd.attn_fwd`` / ``kernels.bwd.attn_bwd`` / ``kernels.bwd.attn_bwd_delta``: flash
  attention forward and backward (the interface of ``ringflash.blockwise``).
- ``kernels.decode``: split-KV decoding over a KV cache (``decode_fwd``), the cache append and the
  merge of partials.
- ``kernels.rows``: the all-gather's row moves in one pass: outgoing rows taken from K and V, and
  returned dK/dV rows summed from several sources into a gradient.
- ``kernels.options``: the configs passed to the launchers (``AttnConfig``, ``DecodeConfig``) and
  the TMA mode (``use_tma``).

Invariant: every launcher returns exact attention, ``softmax(q k^T * scale) v``, with its
natural-log LSE (``-inf`` and output 0 for rows that see no key). Nothing here imports anything
above ``ringflash.kernels``; this package imports nothing itself, so ``kernels.options`` loads
without Triton. CUDA tensors run the compiled kernels; CPU tensors need Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported) and run small fixed tiles.
"""
