"""The public ring-attention functions: one per layout over padded shards (``contiguous``,
``zigzag``, ``stripe``), their ``kvpacked``/``qkvpacked`` forms, and the packed-documents function
with its forms; each checks its arguments and calls ``ring_attention`` (``ring_attn.py``)."""

from __future__ import annotations

import torch

from .ring_attn import ring_attention

_ARGS_DOC = """
    Args:
        q: ``[B, S_local, Hq, D]``, this rank's shard of the queries in the function's layout.
        k, v: ``[B, S_local, Hk, D]`` with ``Hq % Hk == 0`` (GQA/MQA; only the KV heads travel).
        dropout_p: must be 0 (dropout is not supported).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: causal mask on global positions.
        window_size: ``(left, right)`` sliding window on global positions, -1 for unbounded.
        softcap: ``softcap * tanh(scores / softcap)`` when > 0.
        alibi_slopes: must be None (not supported).
        deterministic: accepted for compatibility; the ring is always deterministic.
        return_attn_probs: also return the float32 LSE ``[B, Hq, S_local]`` as ``(out, lse, None)``.
        learnable_sink: ``[Hq]`` float tensor or None: one logit per query head joining every
            row's softmax denominator (no value), merged exactly once after the ring.
        group: the ring's process group (None: the default group; not initialised: run locally).
            K/V travel through its send/receive, or by the GPUs' copy engines inside
            ``ringflash.use_ring_transport("copy_engine")`` (one node, NCCL).

    Returns:
        ``out [B, S_local, Hq, D]`` in q's dtype (or ``(out, lse, None)``).

    Raises:
        ValueError on every rank of the group when any rank's arguments are invalid or the ranks
        disagree on them (checked before any data moves).
"""
_PACKED_DOC = {
    "kv": "with K and V packed: ``kv [B, S_local, 2, Hk, D]`` (gradients flow into ``kv``).",
    "qkv": "with Q, K and V packed: ``qkv [B, S_local, 3, H, D]`` (gradients flow into ``qkv``).",
}


def _unpack(x, n: int, dim: int, shape: str):
    """Views of a packed ``x`` along ``dim`` (size ``n``), and an error message when it is malformed."""
    if not isinstance(x, torch.Tensor) or x.dim() <= dim or x.shape[dim] != n:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return [x] * n, f"expected {shape} with {n} at dim {dim}, got {got}"
    return list(x.unbind(dim)), None


def _padded(layout: str, name: str, doc: str):
    """The public function ``name``: ring attention over padded shards in ``layout``."""

    def fn(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
        learnable_sink=None,
    ):
        opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
        return ring_attention(name, q, k, v, layout, opts, return_attn_probs, group, sink=learnable_sink)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc + _ARGS_DOC
    return fn


def _kvpacked(layout: str, name: str):
    def fn(
        q,
        kv,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
        learnable_sink=None,
    ):
        (k, v), error = _unpack(kv, 2, 2, "kv [B, S_local, 2, Hk, D]")
        opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
        return ring_attention(
            name, q, k, v, layout, opts, return_attn_probs, group, error=error, sink=learnable_sink
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``{name.replace('kvpacked_', '')}`` {_PACKED_DOC['kv']}" + _ARGS_DOC
    return fn


def _qkvpacked(layout: str, name: str):
    def fn(
        qkv,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        group=None,
        learnable_sink=None,
    ):
        (q, k, v), error = _unpack(qkv, 3, 2, "qkv [B, S_local, 3, H, D]")
        opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
        return ring_attention(
            name, q, k, v, layout, opts, return_attn_probs, group, error=error, sink=learnable_sink
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"``{name.replace('qkvpacked_', '')}`` {_PACKED_DOC['qkv']}" + _ARGS_DOC
    return fn


ring_flash_attn_func = _padded(
    "contiguous",
    "ring_flash_attn_func",
    """Ring attention over contiguous shards: rank ``r`` holds tokens ``[r*S/W, (r+1)*S/W)``.

    With ``causal=True`` the last rank does ``W`` times the work of the first; prefer zigzag or
    stripe for causal training.

    Example:
        >>> q, k, v = (shard(x, group, layout="contiguous") for x in (q_full, k_full, v_full))
        >>> out = ring_flash_attn_func(q, k, v, causal=True, group=group)
""",
)
zigzag_ring_flash_attn_func = _padded(
    "zigzag",
    "zigzag_ring_flash_attn_func",
    """Ring attention over zigzag shards: the sequence is cut into ``2W`` chunks and rank ``r``
    holds chunks ``r`` and ``2W-1-r`` (``S_local`` even), which balances causal work exactly.

    Example:
        >>> q, k, v = (shard(x, group, layout="zigzag") for x in (q_full, k_full, v_full))
        >>> out = zigzag_ring_flash_attn_func(q, k, v, causal=True, group=group)
""",
)
stripe_flash_attn_func = _padded(
    "stripe",
    "stripe_flash_attn_func",
    """Ring attention over striped shards: token ``t`` goes to rank ``t % W`` (stripes of one token),
    which balances causal work; each step's causal mask is the local diagonal (``diag=0`` for keys
    of ranks ``<= r``, ``-1`` for later ranks).

    Example:
        >>> q, k, v = (shard(x, group, layout="stripe") for x in (q_full, k_full, v_full))
        >>> out = stripe_flash_attn_func(q, k, v, causal=True, group=group)
""",
)
ring_flash_attn_kvpacked_func = _kvpacked("contiguous", "ring_flash_attn_kvpacked_func")
ring_flash_attn_qkvpacked_func = _qkvpacked("contiguous", "ring_flash_attn_qkvpacked_func")
zigzag_ring_flash_attn_kvpacked_func = _kvpacked("zigzag", "zigzag_ring_flash_attn_kvpacked_func")
zigzag_ring_flash_attn_qkvpacked_func = _qkvpacked("zigzag", "zigzag_ring_flash_attn_qkvpacked_func")
stripe_flash_attn_kvpacked_func = _kvpacked("stripe", "stripe_flash_attn_kvpacked_func")
stripe_flash_attn_qkvpacked_func = _qkvpacked("stripe", "stripe_flash_attn_qkvpacked_func")
RING_FUNCS = {
    "contiguous": ring_flash_attn_func,
    "zigzag": zigzag_ring_flash_attn_func,
    "stripe": stripe_flash_attn_func,
}


def ring_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    group=None,
    layout="contiguous",
    method="ring",
    learnable_sink=None,
    heads_k_stride=None,
):
    """Sequence-parallel attention over a packed stream of documents sharded across the group.

    ``cu_seqlens`` describes the WHOLE packed stream (all ranks' tokens, the same on every rank);
    each rank holds ``T / W`` of its tokens in ``layout`` (as ``shard(x, group, dim=0,
    layout=layout, cu_seqlens=cu_seqlens)`` leaves them). Each document attends only to itself;
    documents may cross shard boundaries and need no divisibility: only the total ``T`` must divide
    by the world size.

    Args:
        q: ``[T_local, Hq, D]``; k, v: ``[T_local, Hk, D]``: this rank's shard.
        cu_seqlens: int32 ``[N + 1]`` (on q's device or the CPU), global cumulative document
            lengths, ``cu_seqlens[-1] == W * T_local``.
        max_seqlen: an int bounding the longest document.
        layout: how the stream was sharded: ``"contiguous"`` (rank r holds tokens
            ``[r*T/W, (r+1)*T/W)``), ``"zigzag"`` (every document cut into ``2W`` pieces, rank r
            holding pieces ``r`` and ``2W-1-r``: balanced causal work), ``"stripe"``, or
            ``"balanced"`` (documents whole on one rank where the work stays balanced, the long
            ones in zigzag pieces: the fastest for streams of many documents; see
            ``ringflash.parallel.doc_layouts``).
        method: ``"ring"`` (K/V travel the ring, each block only as far as a document that it holds
            reaches), ``"allgather"`` (each rank gathers the K/V of the documents it reads, and
            sends their float32 dK/dV back) or ``"auto"`` (``ringflash.parallel.method_cost``).
        heads_k_stride: for the all-gather, how many KV heads each piece of the exchange carries
            (a divisor of ``Hk``): a piece's calls run while the next piece travels. None: the
            whole exchange at once except on CUDA, where it goes in 4 or 2 pieces when each
            piece's call keeps 4 waves of programs (``ringflash.parallel.allgather.pieces_for``).
        Other arguments as for ``ring_flash_attn_func``.

    Returns:
        ``out [T_local, Hq, D]`` in q's dtype, or ``(out, lse [Hq, T_local] float32, None)``.

    Raises:
        ValueError on every rank when any rank's arguments are invalid or the ranks disagree.

    Example:
        >>> cu = torch.tensor([0, 700, 1500, 4096], dtype=torch.int32)   # 3 documents, 4 ranks
        >>> q, k, v = (shard(x, group, dim=0, layout="zigzag", cu_seqlens=cu) for x in (q_all, k_all, v_all))
        >>> out = ring_flash_attn_varlen_func(q, k, v, cu, 2596, causal=True, group=group, layout="zigzag")
    """
    opts = (dropout_p, softmax_scale, window_size, softcap, alibi_slopes, causal)
    name = "ring_flash_attn_varlen_func"
    return ring_attention(
        name,
        q,
        k,
        v,
        layout,
        opts,
        return_attn_probs,
        group,
        cu_seqlens,
        max_seqlen,
        method=method,
        sink=learnable_sink,
        heads_k_stride=heads_k_stride,
    )


def _varlen_packed(q, k, v, error, cu_seqlens, max_seqlen, args, kwargs):
    """``ring_flash_attn_varlen_func`` on unpacked views; a malformed pack raises on every rank."""
    if error:
        return ring_attention(
            "ring_flash_attn_varlen_func", q, k, v, "contiguous", (), False, kwargs.get("group"), error=error
        )
    return ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, *args, **kwargs)


def ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, *args, **kwargs):
    """``ring_flash_attn_varlen_func`` with ``kv [T_local, 2, Hk, D]`` packed."""
    (k, v), error = _unpack(kv, 2, 1, "kv [T_local, 2, Hk, D]")
    return _varlen_packed(q, k, v, error, cu_seqlens, max_seqlen, args, kwargs)


def ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kwargs):
    """``ring_flash_attn_varlen_func`` with ``qkv [T_local, 3, H, D]`` packed."""
    (q, k, v), error = _unpack(qkv, 3, 1, "qkv [T_local, 3, H, D]")
    return _varlen_packed(q, k, v, error, cu_seqlens, max_seqlen, args, kwargs)
