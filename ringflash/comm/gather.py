"""All-gathers of whole tensors over a group (the sharded decode's partials, unsharding), and the
uneven all-to-all of rows that the all-gather method for packed documents exchanges."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def all_gather_flat(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """All-gather ``x`` flattened: ``[world, x.numel()]``, row ``r`` from group rank ``r``.

    NCCL gathers into one output buffer (no per-rank copies); gloo has no
    ``all_gather_into_tensor``, so its parts are stacked.
    """
    return start_all_gather_flat(x, world, group)()


def start_all_gather_flat(x: torch.Tensor, world: int, group) -> Callable[[], torch.Tensor]:
    """Start ``all_gather_flat(x, world, group)`` and return the function that waits for it and
    returns its result, so that work queued in between overlaps the collective (on a GPU, the
    wait orders the current stream after the collective; the host does not block)."""
    x = x.contiguous().view(-1)
    if world == 1:
        out = x.clone().view(1, -1)
        return lambda: out
    if x.is_cuda and "nccl" in str(dist.get_backend(group)):
        out = torch.empty((world, x.numel()), dtype=x.dtype, device=x.device)
        work = dist.all_gather_into_tensor(out, x, group=group, async_op=True)

        def done():
            work.wait()
            return out

        return done
    parts = [torch.empty_like(x) for _ in range(world)]
    work = dist.all_gather(parts, x, group=group, async_op=True)

    def stacked():
        work.wait()
        return torch.stack(parts)

    return stacked


def all_gather_cat(x: torch.Tensor, world: int, group, dim: int) -> torch.Tensor:
    """All-gather ``x`` (the same shape on every rank) and concatenate along ``dim`` in rank order."""
    parts = all_gather_flat(x, world, group).view(world, *x.shape)
    return torch.cat(parts.unbind(0), dim)


def start_exchange(x: torch.Tensor, sends: list[int], recvs: list[int], group) -> Callable[[], torch.Tensor]:
    """Start an uneven all-to-all of ``x``'s rows: the first ``sends[0]`` rows go to group rank 0,
    the next ``sends[1]`` to rank 1, and so on; returns the function that waits for it and returns
    the rows received, ``[sum(recvs), *x.shape[1:]]``, ``recvs[s]`` of them from rank ``s``, in rank
    order. Every rank of the group calls it (with zeros where it exchanges nothing); work queued
    before the wait overlaps the transfer."""
    x = x.contiguous()
    out = x.new_empty((sum(recvs), *x.shape[1:]))
    work = dist.all_to_all_single(out.flatten(1), x.flatten(1), recvs, sends, group=group, async_op=True)

    def done():
        work.wait()
        return out

    return done
