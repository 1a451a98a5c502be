"""All-to-all for Ulysses sequence parallelism, differentiable, several tensors in one collective.

``all_to_all(tensors, scatter_dims, gather_dims, group)`` cuts every tensor into ``W`` equal chunks
along its scatter dim, sends chunk ``j`` to group rank ``j``, and concatenates the chunks received
from ranks ``0..W-1`` (in rank order) along its gather dim. For a sequence shard
``[B, S/W, H, D]`` with ``scatter=2, gather=1`` the result is ``[B, S, H/W, D]``: all tokens of
heads ``[r*H/W, (r+1)*H/W)`` on rank ``r``, the sequence in the order of the ranks' shards.

Every tensor's chunks for one destination are flattened and concatenated, so q, k and v (or
out and lse) travel in ONE ``all_to_all_single``. The backward of an all-to-all is the reverse
all-to-all (scatter and gather dims swapped), which ``SeqAllToAll`` runs on the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _world(group) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_to_all(
    tensors: Sequence[torch.Tensor],
    scatter_dims: Sequence[int],
    gather_dims: Sequence[int],
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """All-to-all of several tensors in one collective (not differentiable; see ``seq_all_to_all``).

    Args:
        tensors: tensors of any shapes and one dtype/device; ``tensors[i].shape[scatter_dims[i]]``
            must divide by the group size ``W`` (every rank passes the same shapes).
        scatter_dims: the dim each tensor is cut along (chunk ``j`` goes to rank ``j``).
        gather_dims: the dim the received chunks are concatenated along, in rank order.
        group: the process group (None: the default group).

    Returns:
        One tensor per input, with ``scatter_dims[i]`` divided and ``gather_dims[i]`` multiplied by ``W``.
    """
    world = _world(group)
    if world == 1:
        return list(tensors)
    dtypes = list(dict.fromkeys(x.dtype for x in tensors))
    if len(dtypes) > 1:  # one collective per dtype (e.g. bf16 outputs and their float32 LSE)
        outs: list = [None] * len(tensors)
        for dt in dtypes:
            idx = [i for i, x in enumerate(tensors) if x.dtype == dt]
            res = _one(
                world,
                [tensors[i] for i in idx],
                [scatter_dims[i] for i in idx],
                [gather_dims[i] for i in idx],
                group,
            )
            for i, r in zip(idx, res, strict=True):
                outs[i] = r
        return outs
    return _one(world, tensors, scatter_dims, gather_dims, group)


def _one(world, tensors, scatter_dims, gather_dims, group) -> list[torch.Tensor]:
    chunks, shapes = [], []
    for x, sd, _ in zip(tensors, scatter_dims, gather_dims, strict=True):
        sd = sd % x.dim()
        if x.shape[sd] % world:
            raise ValueError(
                f"all_to_all: dim {sd} of {tuple(x.shape)} does not divide by the group size {world}"
            )
        xs = x.unflatten(sd, (world, x.shape[sd] // world)).movedim(sd, 0)  # [W, ..., c, ...]
        shapes.append(xs.shape[1:])
        chunks.append(xs.reshape(world, -1))
    send = torch.cat(chunks, 1).contiguous() if len(chunks) > 1 else chunks[0].contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    outs, off = [], 0
    for x, shape, gd in zip(tensors, shapes, gather_dims, strict=True):
        n = shape.numel()
        part = recv[:, off : off + n].reshape(world, *shape)  # part[j]: rank j's chunk for me
        off += n
        gd = gd % x.dim()
        outs.append(part.movedim(0, gd).flatten(gd, gd + 1))
    return outs


class SeqAllToAll(torch.autograd.Function):
    """Autograd for ``all_to_all``: the backward is the all-to-all with the dims swapped."""

    @staticmethod
    def forward(ctx, group, scatter_dims, gather_dims, *tensors):
        ctx.group, ctx.scatter_dims, ctx.gather_dims = group, tuple(scatter_dims), tuple(gather_dims)
        return tuple(all_to_all(tensors, scatter_dims, gather_dims, group))

    @staticmethod
    def backward(ctx, *grads):
        # Autograd materialises missing gradients as zeros, so every rank joins the same collective.
        back = all_to_all(grads, ctx.gather_dims, ctx.scatter_dims, ctx.group)
        return (None, None, None, *back)


def seq_all_to_all(
    tensors: Sequence[torch.Tensor],
    scatter_dims: Sequence[int],
    gather_dims: Sequence[int],
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Differentiable ``all_to_all`` (arguments and shapes as there).

    Example:
        >>> # [B, S/W, H, D] sequence shards -> [B, S, H/W, D] head shards, q/k/v in one collective
        >>> q_h, k_h, v_h = seq_all_to_all([q, k, v], [2, 2, 2], [1, 1, 1], group)
    """
    if _world(group) == 1:
        return list(tensors)
    return list(SeqAllToAll.apply(group, tuple(scatter_dims), tuple(gather_dims), *tensors))
