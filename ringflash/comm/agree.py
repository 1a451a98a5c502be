"""Ranks agree on their arguments before any data moves.

Every distributed entry point (ring, Ulysses, the hybrid, sharded decoding) validates its
arguments locally (``ringflash.checks``), then calls :func:`agree` with the error it found (or
None) and a few named fields that every rank must share (shapes, dtype, masks, layout, options).
One small all-gather of int64 codes per group decides, on the host: when any rank's input is bad,
or the ranks disagree, EVERY rank raises ``ValueError`` before the first collective of the real
call, so a bad input on one rank is never a hang, an abort, or a result built from a half-filled
buffer. Only then does a second gather (Python objects) collect readable reports: the error text
of the rank that failed, or each rank's value of the first field that differs (dtypes, layouts
and cu_seqlens by name and value, not by code).

The gathers run on the host: over a gloo group of the same ranks when the caller's group is
NCCL-only (created once per set of ranks), so a check never waits for the GPU nor adds a device
collective to the stream. For a 2-D grid (Ulysses x ring), the codes go through the first group,
then the second: every rank of the grid learns the outcome.
"""

from __future__ import annotations

import array
import struct
import weakref
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..checks import short_repr

_MAX_FIELDS = 40
_HOST_GROUPS: dict[tuple[int, ...], dist.ProcessGroup | None] = {}


def host_group(group, members: list[int]):
    """A group over the same ranks that takes CPU tensors: ``group`` itself unless it is NCCL-only,
    else a gloo group of ``members`` (global ranks), created on first use and kept; None when no
    gloo is built in (the check then goes through the device).

    An argument check over NCCL would put a collective on the GPU stream and copy its result back,
    so every call would wait for all queued GPU work and the GPU would idle while the kernels are
    launched; over gloo the check costs host time only.
    """
    backend = str(dist.get_backend(group))
    if "nccl" not in backend or "gloo" in backend:
        return group
    key = tuple(members)
    if key not in _HOST_GROUPS:
        try:
            _HOST_GROUPS[key] = dist.new_group(list(key), backend="gloo", use_local_synchronization=True)
        except (RuntimeError, ValueError):
            _HOST_GROUPS[key] = None
    return _HOST_GROUPS[key]


# Per group (held weakly: a destroyed group must not be kept alive, with its threads): its
# members by world size.
_MEMBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def members_of(group, world: int) -> list[int]:
    """Global ranks of the ``world`` ranks of ``group`` (kept per group: asked on every call)."""
    try:
        known = _MEMBERS.setdefault(group, {})
    except TypeError:  # not weakly referable: asked anew
        known = {}
    members = known.get(world)
    if members is None:
        members = known[world] = [dist.get_global_rank(group, r) for r in range(world)]
    return members


def gather_rows(row: torch.Tensor, group, members: list[int]) -> torch.Tensor:
    """All-gather a small int64 CPU ``row`` over ``group`` on the host: ``[world, len(row)]``."""
    hg = host_group(group, members)
    if hg is None:  # NCCL only: through the device (this syncs the host with the GPU)
        dev = torch.device("cuda", torch.cuda.current_device())
        rows = [torch.empty_like(row, device=dev) for _ in members]
        dist.all_gather(rows, row.to(dev), group=group)
        return torch.stack(rows).cpu()
    rows = [torch.empty_like(row) for _ in members]
    dist.all_gather(rows, row, group=hg)
    return torch.stack(rows)


def _gather_objects(obj, group, members: list[int]) -> list:
    hg = host_group(group, members)
    out: list = [None] * len(members)
    dist.all_gather_object(out, obj, group=hg if hg is not None else group)
    return out


def records_graph(*tensors) -> bool:
    """Whether autograd records a call on these inputs (grad mode on, one of them requiring grad): a
    field every rank must share, since only the ranks that record it run the backward's
    collectives (the others would leave them waiting)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


GRAPH_HINT = (
    " (every rank must call with gradients alike: requires_grad on some of q/k/v and grad mode on, "
    "or on none, since the backward's collectives need every rank)"
)


def code(value) -> int:
    """An int64 code of a field value: equal values, equal codes (floats by their bits, anything
    else by the CRC of its ``repr``)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and -(2**62) < value < 2**62:
        return value
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    if isinstance(value, (list, tuple)):
        try:  # a long list of ints (cu_seqlens): its bytes, not its repr
            return zlib.crc32(array.array("q", value).tobytes()) + 2**40
        except (TypeError, OverflowError):
            pass
    return zlib.crc32(repr(value).encode()) + 2**40  # apart from small ints


def agree(
    groups: Sequence[tuple[object, int]],
    err: Exception | str | None,
    fields: dict[str, object],
    what: str = "the group",
    hints: dict[str, str] | None = None,
) -> None:
    """Raise ``ValueError`` on every rank when any rank's ``err`` is set or ``fields`` differ.

    Args:
        groups: ``[(group, world_size), ...]``: one group, or the two of a 2-D grid (every rank
            of the grid passes its own two); groups of one rank are skipped.
        err: this rank's error (the exception ``ringflash.checks`` raised, or its message), or
            None. With no group of more than one rank the exception itself is raised.
        fields: name -> value (ints, floats, bools, strings, tuples, dtypes, None); every rank of
            one entry point passes the same names in the same order. With ``err`` set the values
            are not compared.
        what: how messages name the group ("the ring", "the sequence-parallel group").
        hints: name -> advice appended when that field differs.
    """
    real = [(g, w, members_of(g, w)) for g, w in groups if w > 1]
    if not real:
        if isinstance(err, Exception):
            raise err
        if err:
            raise ValueError(err)
        return
    err = str(err) if err else None
    if len(fields) > _MAX_FIELDS - 3:
        raise AssertionError("too many fields to agree on")
    codes = [code(v) for v in fields.values()] if not err else []
    # [error, disagreement, name of the field set, codes..., zero padding]: every row has one length.
    row = [1 if err else 0, 0, code(tuple(fields))] + codes
    row = torch.tensor(row + [0] * (_MAX_FIELDS - len(row)), dtype=torch.int64)
    for g, _, members in real:
        # Compared as Python lists: a few tiny tensor operations would cost more host time than
        # the gather itself on a fast network.
        table = gather_rows(row, g, members).tolist()
        ok = [r[2:] for r in table if r[0] == 0]
        failed = any(r[0] for r in table)
        differ = any(r[1] for r in table) or any(r != ok[0] for r in ok[1:])
        row = row.clone()
        row[0], row[1] = int(failed), int(differ)
    if not (failed or differ):
        return
    reports = [(dist.get_rank(), err, {k: short_repr(v) for k, v in fields.items()})]
    for g, _, members in real:
        reports = [r for part in _gather_objects(reports, g, members) for r in part]
    by_rank = dict(sorted((r, (e, f)) for r, e, f in reports))
    bad = {r: e for r, (e, _) in by_rank.items() if e}
    if bad:
        lines = "; ".join(f"rank {r}: {e}" for r, e in bad.items())
        raise ValueError(f"invalid arguments on {len(bad)} rank(s) of {what} (every rank raises): {lines}")
    raise ValueError(_disagreement(by_rank, what, hints or {}))


def _disagreement(by_rank: dict, what: str, hints: dict[str, str]) -> str:
    first = next(iter(by_rank.values()))[1]
    for name in first:
        vals = {r: f.get(name) for r, (_, f) in by_rank.items()}
        if len(set(vals.values())) > 1:
            per = ", ".join(f"rank {r}: {v}" for r, v in vals.items())
            return f"ranks of {what} disagree on {name} ({per}){hints.get(name, '')}"
    names = {r: tuple(f) for r, (_, f) in by_rank.items()}
    return f"ranks of {what} called different functions or passed different arguments: {names}"
