"""Ring point-to-point communication and the drivers that run a ring loop.

A ring loop (``ringflash.parallel.ring_attn``) is written once, as a generator that *yields*
its communication requests instead of calling torch.distributed itself:

    handle  = yield Post(tensors, shift)   # start sending to rank+shift, receiving from rank-shift
    ...compute on the current block while the transfer is in flight...
    tensors = yield Wait(handle)           # the tensors that rank-shift posted

Two drivers execute such loops:

- ``run_on_group(loop, comm)``: one real rank. ``RingComm`` posts the receives and sends with
  ``torch.distributed.batch_isend_irecv`` into fresh buffers (double buffering: the next block
  arrives while the current one is used), for NCCL (one coalesced group) and gloo (separate
  isend/irecv works, matched by tag, every one waited on).
- ``run_simulated(loops)``: ``W`` virtual ranks in one process (one device), interleaved
  cooperatively with mailboxes: the same loop code, for tests and the one-GPU benchmark. With
  ``profile=True`` it times each rank's compute between communication points.
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Post:
    """Request: send ``tensors`` to rank ``rank + shift`` and receive the same shapes from ``rank - shift``.

    ``tag`` separates independent streams (K/V and dK/dV) between the same pair of ranks.
    ``recv``: the shapes and dtypes to receive when they differ from what is sent (``[]``: receive
    nothing; ``tensors=[]``: send nothing), from rank ``rank - recv_shift`` (default ``shift``);
    with ``into``, the tensors themselves, received into (views of a larger buffer that the
    caller fills block by block, as a collective would write it).
    """

    tensors: Sequence[torch.Tensor]
    shift: int = 1
    tag: int = 0
    recv: Sequence[torch.Tensor] | None = None
    recv_shift: int | None = None
    into: bool = False

    @property
    def receives(self) -> Sequence[torch.Tensor]:
        return self.tensors if self.recv is None else self.recv

    @property
    def source_shift(self) -> int:
        return self.shift if self.recv_shift is None else self.recv_shift


@dataclass
class Wait:
    """Request: wait for the transfer ``handle`` (a ``Post``'s answer); answers the received tensors."""

    handle: object


RingLoop = Generator[object, object, object]


class RingComm:
    """Ring P2P over a process group: rank ``i`` sends to ``i + shift``, receives from ``i - shift``.

    Group ranks are mapped to global ranks with ``torch.distributed.get_global_rank`` (P2P ops
    address global ranks). ``timeout`` bounds each wait (default: the group's own timeout), so a
    dead or stuck peer raises instead of hanging.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        timeout: datetime.timedelta | None = None,
        copy_engine_tags: Sequence[int] = (),
        device: torch.device | None = None,
    ):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.global_ranks = [dist.get_global_rank(self.group, r) for r in range(self.world_size)]
        self.timeout = timeout
        # Posts with these tags to the next rank go by copy engine (``copy_engine.py``).
        self.copy_engine_tags = frozenset(copy_engine_tags)
        self.copy_engine = None
        if self.copy_engine_tags:
            from .copy_engine import CopyEngineRing

            self.copy_engine = CopyEngineRing.for_group(self.group, device, timeout)

    def peer(self, shift: int) -> int:
        """Global rank of the group rank ``shift`` steps ahead on the ring."""
        return self.global_ranks[(self.rank + shift) % self.world_size]

    def post(
        self,
        tensors: Sequence[torch.Tensor],
        shift: int = 1,
        tag: int = 0,
        recv=None,
        recv_shift=None,
        into: bool = False,
    ):
        """Start sending ``tensors`` ``shift`` ranks ahead and receiving ``recv`` (default: tensors
        of the same shapes; with ``into``, into those tensors) from ``recv_shift`` (default
        ``shift``) ranks behind."""
        regular = recv is None and recv_shift is None
        if (
            regular
            and self.copy_engine is not None
            and shift % self.world_size == 1
            and tag in self.copy_engine_tags
        ):
            return self.copy_engine.post(tensors, tag)
        dst = self.peer(shift)
        src = self.peer(-(shift if recv_shift is None else recv_shift))
        sends = [t.contiguous() for t in tensors]
        if into:
            bufs = list(recv)
        else:
            bufs = [
                torch.empty(t.shape, dtype=t.dtype, device=t.device)
                for t in (sends if recv is None else recv)
            ]
        # Receives are posted first: gloo matches messages per (peer, tag) in posting order, so each
        # tensor gets its own tag; NCCL ignores tags and runs the list as one group.
        ops = [dist.P2POp(dist.irecv, b, src, self.group, tag=tag * 64 + i) for i, b in enumerate(bufs)]
        ops += [dist.P2POp(dist.isend, t, dst, self.group, tag=tag * 64 + i) for i, t in enumerate(sends)]
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Transfer(works, bufs, sends, self.timeout)

    def finish(self) -> None:
        """The ring call is over (copy-engine messages: the last one received is released)."""
        if self.copy_engine is not None:
            self.copy_engine.finish()

    def abort(self) -> None:
        """The ring call failed: copy-engine flags are out of step, so that transport is dropped."""
        if self.copy_engine is not None:
            from .copy_engine import drop

            drop(self.group)
            self.copy_engine = None


class _Transfer:
    def __init__(self, works, bufs, sends, timeout):
        self.works, self.bufs, self._sends, self.timeout = works, bufs, sends, timeout

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            if self.timeout is None:
                w.wait()
            else:
                w.wait(self.timeout)
        self._sends = None
        return self.bufs


def run_on_group(loop: RingLoop, comm: RingComm | None):
    """Drive ``loop`` for this rank over ``comm`` (None: a ring of one, which must not communicate)."""
    try:
        return _drive(loop, comm)
    except BaseException:
        if comm is not None:
            comm.abort()
        raise


def _drive(loop: RingLoop, comm: RingComm | None):
    try:
        req = next(loop)
        while True:
            if isinstance(req, Post):
                if comm is None:
                    raise RuntimeError("a ring of one rank tried to communicate")
                resp = comm.post(req.tensors, req.shift, req.tag, req.recv, req.recv_shift, req.into)
            elif isinstance(req, Wait):
                resp = req.handle.wait()
            else:
                raise TypeError(f"unknown ring request {req!r}")
            req = loop.send(resp)
    except StopIteration as stop:
        if comm is not None:
            comm.finish()
        return stop.value


@dataclass
class SimProfile:
    """Seconds of compute per rank between consecutive communication points (``segments[rank][i]``).

    ``after[rank][i]`` is ``(sender, j)`` when segment ``i`` starts by receiving the message that
    ``sender`` posted at the end of its segment ``j`` (None otherwise, or when not recorded).
    """

    segments: list[list[float]]
    after: list[list[tuple[int, int] | None]] | None = None

    def rank_time(self, rank: int) -> float:
        return sum(self.segments[rank])

    def lockstep_time(self) -> float:
        """Time of the ring if every rank waited for every other at each exchange: the sum over
        segments of the slowest rank's segment (an upper bound on ``ring_time``)."""
        n = max(len(s) for s in self.segments)
        return sum(max(s[i] if i < len(s) else 0.0 for s in self.segments) for i in range(n))

    def ring_time(self) -> float:
        """Time of the ring when transfers take no time: each rank runs its segments in order, and
        a segment that starts with a receive also waits until the sender posted that message (as a
        real rank waits only for its own peer). The last rank to finish sets the time. Without
        recorded messages, ``lockstep_time``."""
        if self.after is None:
            return self.lockstep_time()
        world = len(self.segments)
        end: list[list[float]] = [[] for _ in range(world)]
        pending = [0] * world
        # Every message is posted before it is received, so sweeping the ranks repeatedly, each as
        # far as its messages allow, schedules every segment.
        while any(pending[r] < len(self.segments[r]) for r in range(world)):
            moved = False
            for r in range(world):
                while pending[r] < len(self.segments[r]):
                    i = pending[r]
                    dep = self.after[r][i]
                    if dep is not None and len(end[dep[0]]) <= dep[1]:
                        break
                    start = max(end[r][-1] if end[r] else 0.0, end[dep[0]][dep[1]] if dep else 0.0)
                    end[r].append(start + self.segments[r][i])
                    pending[r] += 1
                    moved = True
            if not moved:
                raise ValueError("SimProfile.after: a segment waits for a message never posted")
        return max((e[-1] for e in end if e), default=0.0)


def run_simulated(
    loops: Sequence[RingLoop],
    profile: bool = False,
    sync: Callable[[], None] | None = None,
    cuda_events: bool = False,
) -> tuple[list, SimProfile | None]:
    """Run ``W`` ring loops (virtual ranks) in one process; returns their results (and a profile).

    Messages go through per-(sender, receiver, tag) mailboxes, cloned as a real transfer would copy
    them (copied into the receiver's tensors for a ``Post`` with ``into``), outside every rank's
    timed work. Profiling times each rank's work between communication points: by default on the host
    clock, with ``sync`` (e.g. ``torch.cuda.synchronize``) before each reading, so host launch time
    counts; with ``cuda_events`` by CUDA events on the current stream and no sync, so segments are
    GPU time while the host runs ahead, as it does on a real rank.
    """
    world = len(loops)
    boxes: dict[tuple[int, int, int], deque] = defaultdict(deque)
    targets: dict[tuple[int, int, int], deque] = defaultdict(deque)  # ``into`` tensors per mailbox
    pending: list[object] = [None] * world
    started = [False] * world
    done = [False] * world
    results: list = [None] * world
    segments: list[list[float]] = [[] for _ in range(world)]
    # after[r][i]: the message segment i of rank r starts by receiving; len(after[r]) is the
    # number of segments rank r has run (the last one ends with its pending request).
    after: list[list[tuple[int, int] | None]] = [[] for _ in range(world)]

    def clock():
        if sync is not None:
            sync()
        return time.perf_counter()

    events: list[list] = [[] for _ in range(world)]

    def advance(r: int, value, dep: tuple[int, int] | None = None) -> None:
        after[r].append(dep)
        if profile and cuda_events:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = clock() if profile and not cuda_events else 0.0
        try:
            req = next(loops[r]) if not started[r] else loops[r].send(value)
            started[r] = True
        except StopIteration as stop:
            done[r], results[r], req = True, stop.value, None
        if profile and cuda_events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            events[r].append((start, end))
        elif profile:
            segments[r].append(clock() - t0)
        pending[r] = req

    for r in range(world):
        advance(r, None)
    while not all(done):
        progressed = False
        for r in range(world):
            while not done[r]:
                req = pending[r]
                dep = None
                if isinstance(req, Post):
                    dst, src = (r + req.shift) % world, (r - req.source_shift) % world
                    posted_at = (r, len(after[r]) - 1)  # the segment that ends with this Post
                    if req.tensors:
                        boxes[(r, dst, req.tag)].append(([t.clone() for t in req.tensors], posted_at))
                    value = (src, r, req.tag) if req.receives else None
                    if value is not None:
                        targets[value].append(req.recv if req.into else None)
                elif isinstance(req, Wait) and req.handle is None:  # a post that received nothing
                    value = []
                elif isinstance(req, Wait):
                    box = boxes[req.handle]
                    if not box:
                        break
                    value, dep = box.popleft()
                    into = targets[req.handle].popleft()
                    if into is not None:
                        for t, got in zip(into, value, strict=True):
                            t.copy_(got)
                        value = list(into)
                else:
                    raise TypeError(f"unknown ring request {req!r}")
                advance(r, value, dep)
                progressed = True
        if not progressed and not all(done):
            raise RuntimeError("simulated ring deadlocked: every rank waits for a message never sent")
    if profile and cuda_events:
        torch.cuda.synchronize()
        segments = [[a.elapsed_time(b) / 1e3 for a, b in evs] for evs in events]
    return results, (SimProfile(segments, after) if profile else None)
