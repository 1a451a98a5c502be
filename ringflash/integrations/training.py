"""Training a transformers causal LM on a sequence sharded over a group: ALST's data path, the loss
across the ranks, and DeepSpeed's tiled MLP and tiled logits loss wired to the model.

The data path is the one of DeepSpeed's ALST (``deepspeed.runtime.sequence_parallel.ulysses_sp.
UlyssesSPDataLoaderAdapter``); ``shard_batch`` applies it to a batch that every rank already holds
(no DeepSpeed needed), for a group of ``W`` ranks and a batch of ``S`` tokens per row:

    shift_labels = labels[:, 1:] padded with -100     token t predicts labels[t + 1], shifted on the
                                                      WHOLE row, so rank r's last token predicts
                                                      rank r+1's first
    x_r = x[:, r*S/W : (r+1)*S/W]                     every tensor [B, S, ...], contiguously;
                                                      position_ids stay global (restarting at 0 per
                                                      packed document); non-tensors are copied

The loss is the mean over the valid labels of the whole sequence: each rank sums the cross-entropy
of its own tokens and divides by the group's count of valid labels (one small gather), so the
ranks' terms add up to the loss and their gradients add up to its gradient. A gradient reducer
that AVERAGES over the sequence-parallel ranks needs each term multiplied by ``W``
(``grad_average=True``); one that sums them takes the terms as they are. Measured with DeepSpeed
0.19 on gloo: FSDP2's ``fully_shard`` and DeepSpeed given no ``mpu`` average (every ZeRO stage);
DeepSpeed given ALST's ``mpu`` sums over the sequence-parallel ranks at ZeRO-1/2 but averages at
ZeRO-3.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist
from torch.nn import functional

from ..comm.gather import all_gather_flat
from ..comm.groups import group_rank_world


def shard_batch(batch: dict, group: dist.ProcessGroup | None = None) -> dict:
    """This rank's shard of a batch, as ALST's ``UlyssesSPDataLoaderAdapter`` makes it.

    Args:
        batch: ``input_ids [B, S]``, ``labels [B, S]`` (-100 where nothing is predicted, e.g. each
            packed document's first token), ``position_ids [B, S]`` (global; made as
            ``arange(S)`` when absent), any other ``[B, S, ...]`` tensors; the same on every rank.
        group: the sequence-parallel group (None: the default group; no group: the batch itself,
            labels shifted).

    Returns:
        The batch with ``labels`` replaced by ``shift_labels``, every tensor cut to ``[B, S/W, ...]``.

    Raises:
        ValueError: a tensor's dim 1 is not ``S``, ``S`` does not divide by ``W``, or no ``labels``.
    """
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"a batch needs input_ids and labels, got {sorted(batch)}")
    for name in ("input_ids", "labels"):
        if not isinstance(batch[name], torch.Tensor) or batch[name].dim() < 2:
            got = (
                tuple(batch[name].shape)
                if isinstance(batch[name], torch.Tensor)
                else type(batch[name]).__name__
            )
            raise ValueError(f"{name} must be a tensor [B, S], got {got}")
    _, rank, world = group_rank_world(group)
    ids = batch["input_ids"]
    rows, seq = ids.shape[:2]
    if seq % world:
        raise ValueError(f"the batch's sequence length {seq} does not divide by the {world} ranks")
    out = dict(batch)
    if out.get("position_ids") is None:
        out["position_ids"] = torch.arange(seq, device=ids.device).expand(rows, seq)
    labels = out.pop("labels")
    out["shift_labels"] = functional.pad(labels, (0, 1), value=-100)[:, 1:]
    n = seq // world
    for key, val in out.items():
        if torch.is_tensor(val):
            if val.dim() < 2 or val.shape[1] != seq:
                raise ValueError(f"{key} has shape {tuple(val.shape)}: expected [B, {seq}, ...]")
            out[key] = val[:, rank * n : (rank + 1) * n].contiguous()
    return out


def _valid_count(shift_labels: torch.Tensor, group) -> int:
    g, _, world = group_rank_world(group)
    mine = (shift_labels != -100).sum().reshape(1).to(torch.int64)
    return int(all_gather_flat(mine, world, g).sum()) if world > 1 else int(mine)


def _term_scale(shift_labels, group, grad_average: bool) -> float:
    _, _, world = group_rank_world(group)
    total = _valid_count(shift_labels, group)
    return (world if grad_average else 1) / max(total, 1)


def sequence_parallel_loss(
    logits: torch.Tensor, shift_labels: torch.Tensor, group=None, grad_average: bool = False
) -> torch.Tensor:
    """This rank's term of the mean cross-entropy over the whole sharded sequence.

    Args:
        logits: ``[B, S/W, V]`` (any float dtype; computed in float32).
        shift_labels: ``[B, S/W]`` from ``shard_batch`` (or ALST's adapter), -100 where ignored.
        group: the sequence-parallel group.
        grad_average: the gradient reducer averages over the group's ranks (FSDP2, DeepSpeed
            without an mpu, ZeRO-3 with ALST's): the term is multiplied by ``W`` so the average is
            the gradient.

    Returns:
        A scalar to ``backward()``; ``loss_value(term, group, grad_average)`` is the loss itself.
    """
    ce = functional.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), reduction="sum")
    return ce * _term_scale(shift_labels, group, grad_average)


def loss_value(term: torch.Tensor, group=None, grad_average: bool = False) -> float:
    """The loss over the whole sequence from every rank's ``sequence_parallel_loss`` term."""
    g, _, world = group_rank_world(group)
    total = all_gather_flat(term.detach().float().reshape(1), world, g).sum() if world > 1 else term.detach()
    return float(total) / (world if grad_average else 1)


def tiled_causal_lm_loss(
    lm_head: torch.nn.Module,
    hidden_states: torch.Tensor,
    shift_labels: torch.Tensor,
    group=None,
    grad_average: bool = False,
    shards: int | None = None,
) -> torch.Tensor:
    """``sequence_parallel_loss`` without the ``[S/W, V]`` logits: DeepSpeed's ``TiledFusedLogitsLoss``
    runs ``lm_head`` and the cross-entropy on ``shards`` slices of the tokens.

    ``TiledFusedLogitsLoss`` back-propagates into ``lm_head`` inside its forward with an incoming
    gradient of one (its backward scales only the hidden states' gradient), so the normalisation is
    inside the tiled function here and the result must reach ``backward()`` unscaled (DeepSpeed's
    gradient accumulation divides the loss by its step count: keep ``gradient_accumulation_steps``
    at 1, or lm_head's gradient comes out that many times too large).

    Args:
        lm_head: the model's output projection (``model.lm_head``).
        hidden_states: ``[B, S/W, hidden]``, the last hidden states (``model.model(...)[0]``).
        shards: slices (default: about one per ``hidden`` tokens, at least one).
    """
    _check_shards(shards)  # before the collective of _term_scale
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    scale = _term_scale(shift_labels, group, grad_average)
    n = hidden_states.shape[0] * hidden_states.shape[1]
    shards = shards or max(1, math.ceil(n / hidden_states.shape[-1]))

    def loss_fn(head, x, y):
        logits = head(x).float()
        return functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum") * scale

    params = [p for p in lm_head.parameters() if p.requires_grad]
    return TiledFusedLogitsLoss.apply(
        loss_fn, lm_head, hidden_states, shift_labels, None, shards, params, "sum"
    )


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Recompute each decoder layer of a transformers model in its backward (activation
    checkpointing, non-reentrant, as sequence-parallel training needs: the recomputation runs the
    layer's collectives again in the same order on every rank). Uses
    ``activation_checkpointing_enable`` where transformers has it (5.x, whose older
    ``gradient_checkpointing_enable`` is a deprecated alias), else ``gradient_checkpointing_enable``.

    Example:
        >>> training.checkpoint_layers(lm)
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_shards(shards) -> None:
    if shards is not None and (not isinstance(shards, int) or isinstance(shards, bool) or shards < 1):
        raise ValueError(f"shards must be a positive int or None (the default), got {shards!r}")


def tile_mlps(model: torch.nn.Module, shards: int | None = None) -> int:
    """Run every decoder layer's MLP of ``model`` through DeepSpeed's ``TiledMLP``: the MLP sees
    slices of the tokens, and its backward recomputes them slice by slice, so the intermediate
    activations ``[S/W, intermediate]`` never exist at once. Patches the model's own modules (not
    the class), so other models in the process are unchanged.

    Args:
        shards: slices per call (default: about one per ``hidden`` tokens, as DeepSpeed's example).
            Every rank sees ``S/W`` tokens, so every rank picks the same count (ZeRO-3 gathers the
            MLP's weights once per slice: the counts must match).

    Returns:
        The number of MLPs patched.
    """
    _check_shards(shards)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def forward(self, x):
        n = shards or max(1, math.ceil(x.shape[-2] / x.shape[-1]))
        params = [p for p in self.parameters() if p.requires_grad]
        return TiledMLP.apply(self._untiled_forward, self, x, n, params)

    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("MLP") and not hasattr(module, "_untiled_forward"):
            cls_forward = type(module).forward
            module._untiled_forward = lambda self, x, f=cls_forward: f(self, x)
            module.forward = types.MethodType(forward, module)
            count += 1
    if count == 0:
        done = any(hasattr(m, "_untiled_forward") for m in model.modules())
        raise ValueError(
            f"every MLP of {type(model).__name__} is tiled already"
            if done
            else f"no module whose class name ends in 'MLP' in {type(model).__name__}"
        )
    return count


def decoder_hidden_states(lm: torch.nn.Module, offload: bool = False, **kw) -> torch.Tensor:
    """``lm.model(**kw)[0]``: a transformers causal LM's last hidden states (before its head).

    Args:
        offload: keep what the decoder stack saves for its backward in host memory until then
            (``torch.autograd.graph.save_on_cpu``, pinned for CUDA tensors). With activation
            checkpointing that is one input per layer, so the GPU holds one layer's activations
            whatever the depth. Only the stack: around a tiled loss it would also copy every
            tile's logits out and back, which the loss makes and consumes within its forward.
    """
    if not offload:
        return lm.model(**kw)[0]
    first = kw.get("input_ids", kw.get("inputs_embeds"))
    pin = isinstance(first, torch.Tensor) and first.is_cuda
    with torch.autograd.graph.save_on_cpu(pin_memory=pin):
        return lm.model(**kw)[0]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm, operation for operation: float32 variance, the normalised row
    cast back to x's dtype, times the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _LeanRMSNorm(torch.autograd.Function):
    """RMSNorm that saves only its input: the backward recomputes the float32 rows ``chunk`` tokens
    at a time, so neither pass keeps ``[tokens, hidden]`` float32 copies (transformers' norm saves
    two per call, 16 bytes per token and channel of a bf16 model)."""

    @staticmethod
    def forward(ctx, x, weight, eps, chunk):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.chunk = eps, chunk
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
        for i in range(0, rows.shape[0], chunk):
            out[i : i + chunk] = _rms_norm(rows[i : i + chunk], weight, eps)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
        dx = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        w = weight.detach().requires_grad_(ctx.needs_input_grad[1])
        for i in range(0, rows.shape[0], ctx.chunk):
            xs = rows[i : i + ctx.chunk].detach().requires_grad_(dx is not None)
            with torch.enable_grad():
                y = _rms_norm(xs, w, ctx.eps)
            wants = [t for t in (xs, w) if t.requires_grad]
            grads = list(torch.autograd.grad(y, wants, g[i : i + ctx.chunk]))
            if dx is not None:
                dx[i : i + ctx.chunk] = grads.pop(0)
            if grads:
                dw += grads[0].to(acc)
        dx = None if dx is None else dx.view(x.shape)
        return dx, dw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None, None


def _check_formula(cls: type, eps: float) -> type:
    """``cls`` if its forward computes ``_rms_norm``, checked on a stand-in holding only a weight and
    ``variance_epsilon`` (the model's own weights may be partitioned, as under ZeRO-3)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 24, generator=g), torch.rand(24, generator=g) + 0.5
    try:
        with torch.no_grad():
            same = torch.equal(
                cls.forward(types.SimpleNamespace(weight=w, variance_epsilon=eps), x), _rms_norm(x, w, eps)
            )
    except (AttributeError, TypeError, RuntimeError):
        same = False
    if not same:
        raise ValueError(f"{cls.__name__} is not Llama's RMSNorm formula: left unpatched")
    return cls


def lean_rmsnorms(model: torch.nn.Module, chunk_tokens: int = 8192) -> int:
    """Make every RMSNorm of ``model`` that computes transformers' Llama formula save only its
    input: its backward recomputes the normalised rows ``chunk_tokens`` at a time. Outputs are the
    same bit for bit; gradients are those of the same operations (the weight's summed over the
    chunks in float32, or the weight's dtype if wider). At long sequences this removes the largest
    activations a checkpointed layer recomputes: two float32 copies of the hidden states per norm.
    Patches the model's modules, not their class; works on weights partitioned by ZeRO-3.

    Returns:
        The number of norms patched.

    Raises:
        ValueError: a module named ``*RMSNorm`` whose output differs from that formula (Gemma's
            ``1 + weight``, say): it is left as it was and named in the error; or no norm found.
    """
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    norms = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm") and not hasattr(m, "_unlean_forward")
    ]
    if not norms:
        done = any(hasattr(m, "_unlean_forward") for m in model.modules())
        raise ValueError(
            f"every RMSNorm of {type(model).__name__} is lean already"
            if done
            else f"no module whose class name ends in 'RMSNorm' in {type(model).__name__}"
        )
    checked: set = set()
    for m in norms:
        eps = getattr(m, "variance_epsilon", None)
        if eps is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise ValueError(f"{type(m).__name__} has no weight and variance_epsilon: not Llama's RMSNorm")
        if type(m) not in checked:  # the same formula? a few rows through the class's own forward
            checked.add(_check_formula(type(m), eps))
    for m in norms:
        m._unlean_forward = m.forward
        m.forward = types.MethodType(
            lambda self, x: _LeanRMSNorm.apply(x, self.weight, self.variance_epsilon, chunk_tokens), m
        )
    return len(norms)


__all__ = [
    "checkpoint_layers",
    "decoder_hidden_states",
    "lean_rmsnorms",
    "loss_value",
    "sequence_parallel_loss",
    "shard_batch",
    "tile_mlps",
    "tiled_causal_lm_loss",
]
