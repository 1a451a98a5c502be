"""Hugging Face transformers attention backend: sequence-parallel (ring / Ulysses / hybrid /
all-gather) attention for any model that dispatches through ``transformers.AttentionInterface``
(Llama, Mistral, Qwen2, Gemma, ...).

``register(group, layout, method)`` registers an attention function and returns its name; build the
model with ``attn_implementation=name``. Each rank then feeds its own shard of the sequence
(``input_ids`` sharded in ``layout``) together with the GLOBAL ``position_ids`` of those tokens, and
gets back its shard of the full model's logits; gradients are those of the full model once summed
over the ranks. ``method="local"`` registers plain local attention even where a process group exists
(for a sequence-parallel wrapper that gathers the sequence itself, such as DeepSpeed's ALST).

``method="hybrid"`` runs Ulysses inside groups of ``U = gcd(Hq, W)`` consecutive ranks and the ring
across them (``ringflash.parallel.hybrid``), so the degree ``W`` may exceed the KV and query head
counts. Its layout is contiguous, which is exactly the sharding of DeepSpeed's ALST data loader
adapter (rank r holds tokens ``[r*S/W, (r+1)*S/W)``); ``U = W`` is plain Ulysses, ``U = 1`` the ring.

Packed documents (one row holding several documents) are recognised as transformers marks them:
``cu_seq_lens_q``/``cu_seq_lens_k`` keyword arguments (``DataCollatorWithFlattening(
return_flash_attn_kwargs=True)``), describing the global stream that every rank loaded before
sharding, or ``position_ids`` that restart at 0 for every document (``ringflash.integrations.
packing``). Each document then attends only to itself, across the ranks.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``
with ``query [B, Hq, S_local, D]`` and ``key``/``value [B, Hk, S_local, D]`` and expects
``(out [B, S_local, Hq, D], None)``. The name contains no "flash": transformers treats any
implementation name with "flash" in it as a flash-attn kernel to load from its hub. The name is not
in transformers' mask registry either, so no 4-D mask is built (the mask would describe the local
shard, not the global sequence): the causal mask comes from ``module.is_causal`` and sliding
windows from ``sliding_window``, both on global positions. gpt-oss's learnable sinks (``s_aux``)
join every path as ``learnable_sink``. The name's entry in transformers' mask registry hands on a
2-D token mask when some key slot holds no token (a padded batch, a static cache): one process
attends the tokens alone, as transformers' flash-attn path does; a sequence-parallel group raises
on every rank with how to pack the batch instead, and so does a model's own mask pattern.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from ..comm.agree import agree
from ..comm.groups import build_usp_groups, group_rank_world
from ..ops import flash_attn_func, flash_attn_varlen_func
from ..parallel.hybrid import usp_degrees
from ..parallel.layouts import DOC_LAYOUTS
from ..parallel.ring_attn import ring_attention
from ..parallel.ring_funcs import RING_FUNCS
from ..parallel.ulysses import sp_attention
from .packing import global_cu_seqlens, longest_document

METHODS = ("ring", "ulysses", "hybrid", "allgather", "local")
_REGISTERED: dict[tuple, str] = {}
_COUNTER = itertools.count(1)
_PACK_HINT = (
    "padding masks are not supported: pack the batch instead (one row of documents back to back, "
    "e.g. transformers' DataCollatorWithFlattening, with position_ids restarting per document or "
    "cu_seq_lens_q), and give pad or separator tokens the label -100"
)


def _mask_for_this_backend(
    *,
    batch_size=1,
    q_length=0,
    kv_length=0,
    q_offset=0,
    kv_offset=0,
    attention_mask=None,
    use_vmap=False,
    device=None,
    **_,
):
    """transformers' mask builder for a ringflash implementation name (``AttentionMaskInterface``).

    The kernels make the causal and window masks themselves, so no mask is built when every key
    slot holds a token: None. Otherwise the 2-D mask of the tokens is handed on, as transformers
    does for flash-attn: a padded batch, or a static cache whose first slots alone are filled (the
    mask is then shorter than the keys). One process attends those tokens alone
    (``_unpadded``); with a sequence-parallel group the attention raises on every rank. Without an
    entry transformers would drop the mask without a word. A model's own mask pattern
    (``or_mask_function``/``and_mask_function``, which transformers builds with ``use_vmap``) is
    handed on as a 4-D mask, which the attention refuses."""
    if use_vmap:
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        return attention_mask.view(batch_size, 1, 1, -1)
    if attention_mask is None:
        seen = int(q_offset) + q_length  # tokens so far: fewer than a static cache's slots
        if kv_offset or seen >= kv_length:
            return None
        attention_mask = torch.ones(batch_size, seen, dtype=torch.bool, device=device)
    attention_mask = attention_mask[:, -kv_length:]  # a sliding cache keeps the last kv_length
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _unpadded(q, k, v, mask: torch.Tensor, kw: dict) -> torch.Tensor:
    """One process's attention under a 2-D token mask ``[B, L]`` of the keys' first ``L`` slots (a
    padded batch, or a static cache's filled slots), as transformers runs flash-attn: each row's
    tokens form one sequence, its queries the mask's last ``Sq`` positions, aligned to its keys'
    end under a causal mask. Queries of padded positions get zeros. ``q [B, Sq, Hq, D]``,
    ``k``/``v [B, Sk, Hk, D]``; returns ``[B, Sq, Hq, Dv]``."""
    b, sq = q.shape[:2]
    if mask.dim() != 2 or mask.shape[0] != b or not sq <= mask.shape[1] <= k.shape[1]:
        raise ValueError(
            f"a 2-D attention_mask must be [batch={b}, tokens] with {sq} <= tokens <= {k.shape[1]} (the "
            f"queries, then the keys), got shape {tuple(mask.shape)}"
        )
    mask = mask.to(device=q.device, dtype=torch.bool)
    n = mask.shape[1]
    k, v = k[:, :n], v[:, :n]
    if bool(mask.all()):  # a static cache's filled slots: no padding
        return flash_attn_func(q, k, v, **kw)
    q_mask = mask[:, n - sq :]
    lens_q, lens_k = q_mask.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    cu_q = torch.nn.functional.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = torch.nn.functional.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q[q_mask], k[mask], v[mask], cu_q, cu_k, int(lens_q.max()), int(lens_k.max()), **kw
    )
    return out.new_zeros(*q.shape[:3], out.shape[-1]).index_put((q_mask,), out)


def _register_mask(name: str) -> None:
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53: no mask registry, the 2-D mask reaches the attention
        return
    AttentionMaskInterface.register(name, _mask_for_this_backend)


def _attention_interface():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "ringflash.integrations.transformers needs transformers (pip install transformers)"
        ) from e
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        raise ImportError(
            f"transformers {getattr(transformers, '__version__', '?')} has no AttentionInterface: "
            "custom attention backends need transformers >= 4.48 (pip install -U transformers)"
        )
    return interface


def make_attention(group: dist.ProcessGroup | None = None, layout: str = "contiguous", method: str = "ring"):
    """The transformers attention function (not registered): see ``register``.

    Returns:
        ``fn(module, query [B, Hq, S, D], key [B, Hk, S, D], value, attention_mask, scaling=None,
        dropout=0.0, sliding_window=None, softcap=None, is_causal=None, position_ids=None,
        cu_seq_lens_q=None, cu_seq_lens_k=None, s_aux=None, **kwargs)`` returning
        ``(out [B, S, Hq, D], None)``; ``s_aux``: learnable sinks ``[Hq]`` (gpt-oss).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    if layout not in DOC_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {DOC_LAYOUTS}")
    if method in ("ulysses", "hybrid") and layout != "contiguous":
        raise ValueError(f"{method} shards the sequence contiguously: use layout='contiguous'")
    grids: dict[tuple[int, int], tuple] = {}  # (U, R) -> (ulysses, ring) groups, built on first use

    def ulysses(q, k, v, opts, grw, error, sink, cu=None):
        """Ulysses over the whole group ``grw = (group, rank, world)``: rows of one sequence, or
        with ``cu`` a packed stream (its global documents)."""
        name, packed = "ulysses_attn_func", {}
        if cu is not None:
            name, packed = "ulysses_attn_varlen_func", dict(cu_seqlens=cu, max_seqlen=longest_document(cu))
        return sp_attention(
            name, q, k, v, opts, False, False, grw, None, "contiguous", error=error, sink=sink, **packed
        )

    def hybrid(q, k, v, opts, g, rank, world, error, sink):
        """Ulysses over U = gcd(Hq, W) consecutive ranks x the ring over W / U (one sequence per row)."""
        plan, err = None, error
        if not err:
            if isinstance(q, torch.Tensor) and q.dim() == 4:
                plan = usp_degrees(q.shape[2], world)
            else:
                err = "query must be a [B, S, H, D] tensor"
        if plan is not None and plan[1] == 1:  # Ulysses over the whole group
            return ulysses(q, k, v, opts, (g, rank, world), err, sink)
        if plan is not None and plan[0] == 1:  # no head to split: the ring
            return ring_attention(
                RING_FUNCS["contiguous"].__name__, q, k, v, "contiguous", opts, False, group, sink=sink
            )
        # The grid follows the head count, so the ranks agree on it (and on any error found here)
        # over the whole group before its groups are built; a rank that planned Ulysses or the ring
        # meets this gather with the same single gather of its own agreement.
        fields = {}
        if err is None:
            shapes = (tuple(q.shape), tuple(k.shape), str(q.dtype))
            fields = {"hybrid plan (ulysses, ring)": plan, "shapes": shapes}
        agree([(g, world)], err, fields, "the sequence-parallel group")
        if plan not in grids:  # only this group's ranks take part (local synchronisation)
            grids[plan] = tuple(build_usp_groups(*plan, group, local_sync=True))
        uly, ring = (group_rank_world(x) for x in grids[plan])
        return sp_attention("usp_attn_func", q, k, v, opts, False, False, uly, ring, "contiguous", sink=sink)

    def attention(
        module,
        query,
        key,
        value,
        attention_mask=None,
        scaling=None,
        dropout=0.0,
        sliding_window=None,
        softcap=None,
        is_causal=None,
        position_ids=None,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        s_aux=None,
        **kwargs,
    ):
        # Problems found here travel with the call, so a bad input on one rank is an error on every
        # rank of the group (the functions below agree on their arguments before any data moves).
        error = None
        g, rank, world = group_rank_world(group) if method != "local" else (None, 0, 1)
        token_mask = world == 1 and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        if attention_mask is not None and not token_mask:
            what = "padding, or a model's mask pattern"
            if world == 1:
                what = "a model's own mask pattern: only a 2-D mask of padded tokens is taken"
            error = f"ringflash's attention takes no attention_mask ({what}): {_PACK_HINT}"
        elif dropout:
            error = f"attention dropout ({dropout}) is not supported: set attention_dropout=0.0"
        sink = s_aux  # gpt-oss's learnable sinks, one logit per query head
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        window = (-1, -1)
        if sliding_window is not None and sliding_window > 0:
            window = (sliding_window - 1, 0 if causal else sliding_window - 1)
        q, k, v = (x.transpose(1, 2) if isinstance(x, torch.Tensor) else x for x in (query, key, value))
        opts = (0.0, scaling, window, softcap or 0.0, None, causal)
        first_layer = getattr(module, "layer_idx", None) in (0, None)  # every rank alike: see its docs
        cu = global_cu_seqlens(
            g, rank, world, layout, position_ids, cu_seq_lens_q, cu_seq_lens_k, refresh=first_layer
        )
        if cu is not None and isinstance(q, torch.Tensor) and q.shape[0] != 1:
            error = error or f"a packed batch is one row of documents, got {q.shape[0]} rows"
        if world == 1:  # one process: the local kernel (a torch.library op, so torch.compile traces it)
            if error:
                raise ValueError(error)
            kw = dict(softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)
            kw["learnable_sink"] = sink
            if token_mask:
                if cu is not None:
                    raise ValueError(f"a packed batch takes no attention_mask: {_PACK_HINT}")
                return _unpadded(q, k, v, attention_mask, kw), None
            if cu is None:
                return flash_attn_func(q, k, v, **kw), None
            cud, n = cu.to(q.device), longest_document(cu)
            return flash_attn_varlen_func(q[0], k[0], v[0], cud, cud, n, n, **kw).unsqueeze(0), None
        if cu is None:  # one sequence per row
            row_layout = layout
            if layout == "balanced":
                error = error or (
                    "layout 'balanced' places whole documents on ranks: pass the packed batch's global "
                    "cu_seq_lens_q / cu_seq_lens_k (a batch of single sequences takes another layout)"
                )
                row_layout = "contiguous"  # the error is raised on every rank through the ring's checks
            if method == "hybrid":
                return hybrid(q, k, v, opts, g, rank, world, error, sink), None
            if method == "ulysses":
                out = ulysses(q, k, v, opts, (g, rank, world), error, sink)
            else:
                out = ring_attention(
                    RING_FUNCS[row_layout].__name__,
                    q,
                    k,
                    v,
                    row_layout,
                    opts,
                    False,
                    group,
                    error=error,
                    sink=sink,
                )
            return out, None
        q, k, v = (x[0] if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in (q, k, v))
        if method == "ulysses":
            out = ulysses(q, k, v, opts, (g, rank, world), error, sink, cu)
        else:
            out = ring_attention(
                "ring_flash_attn_varlen_func",
                q,
                k,
                v,
                layout,
                opts,
                False,
                group,
                cu,
                longest_document(cu),
                error=error,
                method="ring" if method == "hybrid" else method,  # the hybrid takes no documents
                sink=sink,
            )
        return out.unsqueeze(0), None

    return attention


def register(
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    method: str = "ring",
    name: str | None = None,
) -> str:
    """Register a sequence-parallel attention with transformers and return its name.

    Args:
        group: the sequence-parallel group (None: the default group; with torch.distributed not
            initialised the backend is plain local flash attention).
        layout: how each rank's ``input_ids`` were sharded: ``"contiguous"`` (rank r holds
            ``[r*S/W, (r+1)*S/W)``), ``"zigzag"`` or ``"stripe"`` (``ringflash.parallel.shard``), or
            for packed batches ``"balanced"`` (documents whole on one rank where the work stays
            balanced; needs the global ``cu_seq_lens_q``).
        method: ``"ring"`` (any head count), ``"ulysses"`` (heads must divide by W; contiguous),
            ``"hybrid"`` (Ulysses over ``gcd(Hq, W)`` consecutive ranks x the ring across them, any
            head count; contiguous; a packed batch runs the ring over the whole group),
            ``"allgather"`` (packed documents: the stream's K/V gathered, see
            ``ring_flash_attn_varlen_func``; a batch of single sequences runs the ring) or
            ``"local"`` (plain local attention on every rank, whatever the group: for a wrapper that
            does the sequence parallelism itself).
        name: the implementation name (default ``sp_<method>_<layout>``, plus ``_g<n>`` for an
            explicit group); must not contain "flash" (transformers would fetch a hub kernel).

    Returns:
        The name to pass as ``attn_implementation``.

    Raises:
        ImportError: transformers is missing or has no ``AttentionInterface`` (older than 4.48).

    Example:
        >>> name = register(group, layout="zigzag")
        >>> model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
        >>> logits = model(input_ids=shard(ids, group, layout="zigzag"),
        ...                position_ids=shard(torch.arange(S)[None], group, layout="zigzag"),
        ...                use_cache=False).logits             # [B, S/W, vocab]: this rank's shard
        >>> # packed documents: one row, global cu_seqlens, every tensor sharded per document
        >>> sh = lambda x: shard(x, group, dim=1, layout="zigzag", cu_seqlens=cu)
        >>> logits = model(input_ids=sh(ids), position_ids=sh(pos), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        ...                use_cache=False).logits
    """
    interface = _attention_interface()
    fn = make_attention(group, layout, method)
    if name is None:
        key = (id(group) if group is not None else None, layout, method)
        if key not in _REGISTERED:
            suffix = f"_g{next(_COUNTER)}" if group is not None else ""
            _REGISTERED[key] = f"sp_{method}_{layout}{suffix}"
        name = _REGISTERED[key]
    if "flash" in name.lower():
        raise ValueError(
            f"attention implementation name {name!r} contains 'flash': transformers would treat it as a "
            "flash-attn kernel and try to fetch it from its hub; choose another name"
        )
    if name in ("eager", "sdpa", "flex_attention", "paged|eager"):
        raise ValueError(f"{name!r} is one of transformers' own attention implementations")
    interface.register(name, fn)
    _register_mask(name)
    return name
