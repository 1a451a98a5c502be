"""Ring transfers by the GPUs' copy engines: K/V pushed into the next rank's symmetric memory.

NCCL's send/recv runs as a kernel, which needs SMs: posted while the attention kernel of a ring
step holds every SM, it starts only when that kernel's last thread blocks are issued, so the next
block arrives after the step's compute instead of during it (measured: a 32 MiB transfer that
takes 0.2 ms alone takes 2.1 ms under attention; docs/performance.md). Here the transfer
is a peer-to-peer DMA copy into the next rank's buffer (PyTorch symmetric memory, one node) and
its completion a flag that the copy's stream writes into the receiver's signal pad
(``cuStreamWriteValue32``): neither uses an SM, and the copy runs alongside the attention kernel
(0.13 ms under attention in the same probe).

Protocol, per message stream (one per tag and tensor shapes), sender ``r`` to receiver ``r + 1``,
``SLOTS`` receive slots on the receiver, message ``i`` in slot ``i % SLOTS``:

- sender, at ``post``: if the slot holds an earlier message, wait (on the current stream) for the
  receiver's "free" flag of that slot; then, on its copy stream after the current stream's work,
  copy the tensors into the slot and write the slot's "filled" flag;
- receiver, at ``wait``: mark the message it received before as free (on its copy stream, after
  the current stream's work: the step that read it and the copy that passed it on), then wait (on
  the current stream) for the slot's "filled" flag and return views of the slot;
- at the end of a ring (``finish``) the last message received is marked free the same way.

Flags are cleared by the waiting side (``wait_signal``), so each is written and consumed once.
The returned views are valid until the ring's next-but-``SLOTS - 1`` message: the ring loop reads
them during one step and passes them on (or adds them into its own buffer), and copies the one it
keeps at the end.
"""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist

SLOTS = 3
_ALIGN = 256  # bytes: every tensor of a message starts aligned in its slot
_transports: dict[tuple[str, int], CopyEngineRing] = {}


def copy_engine_available() -> bool:
    """True when PyTorch's symmetric memory (the CUDA peer-to-peer buffers this transport uses)
    can be imported."""
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class _Stream:
    """One message stream's buffers: this rank's slots (received into) and the next rank's."""

    def __init__(self, group: dist.ProcessGroup, shapes, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        offsets, total = [], 0
        for shape, dtype in shapes:
            offsets.append(total)
            n = dtype.itemsize * math.prod(shape)
            total += -(-n // _ALIGN) * _ALIGN
        self.buf = symm_mem.empty(SLOTS * total, dtype=torch.uint8, device=device)  # the slots' memory
        self.handle = symm_mem.rendezvous(self.buf, group.group_name)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.next, self.prev = (rank + 1) % world, (rank - 1) % world
        self.rank = rank

        def views(of_rank):
            return [
                [
                    self.handle.get_buffer(of_rank, tuple(shape), dtype, (s * total + off) // dtype.itemsize)
                    for (shape, dtype), off in zip(shapes, offsets, strict=True)
                ]
                for s in range(SLOTS)
            ]

        self.mine, self.theirs = views(rank), views(self.next)
        # The next rank's signal pad: flags this rank writes there ("filled", channels 0..SLOTS-1).
        # Channel c of sender s is word c * world + s.
        self.world = world
        self.next_pad = self.handle.get_signal_pad(self.next, (2 * SLOTS * world,), torch.uint32)
        self.prev_pad = self.handle.get_signal_pad(self.prev, (2 * SLOTS * world,), torch.uint32)
        self.sent = 0  # messages sent to the next rank (its slot = sent % SLOTS)
        self.received = 0  # messages received from the previous rank
        self.occupied = [False] * SLOTS  # the next rank's slot holds a message not yet freed
        self.sources: list[list[torch.Tensor]] = [[] for _ in range(SLOTS)]
        self.unfreed: int | None = None  # slot of the last message received, not yet freed


class _CopyTransfer:
    """A posted message: ``wait`` answers the tensors the previous rank sent in the same round."""

    def __init__(self, ring: CopyEngineRing, stream: _Stream):
        self.ring, self.stream = ring, stream

    def wait(self) -> list[torch.Tensor]:
        return self.ring.receive(self.stream)


class CopyEngineRing:
    """Messages to the next rank of ``group`` by copy engine (see the module docstring).

    One instance per (group, device), reused by every ring call, so its counters and flags carry
    on from call to call. All ranks of the group must post the same sequence of tensor shapes
    (the ring loop does): the first post of new shapes allocates buffers collectively.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout: datetime.timedelta):
        self.group, self.device = group, device
        self.timeout_ms = max(1, int(timeout.total_seconds() * 1000))
        self.copy_stream = torch.cuda.Stream(device, priority=-1)
        self.streams: dict[tuple, _Stream] = {}

    @classmethod
    def for_group(cls, group: dist.ProcessGroup, device: torch.device, timeout=None) -> CopyEngineRing:
        """The transport of ``group`` on ``device`` (made on first use)."""
        if device is None or device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (group.group_name, device.index)
        ring = _transports.get(key)
        if ring is None:
            timeout = timeout or datetime.timedelta(minutes=10)
            ring = _transports[key] = cls(group, device, timeout)
        return ring

    def _stream(self, tag: int, tensors) -> _Stream:
        shapes = tuple((tuple(t.shape), t.dtype) for t in tensors)
        key = (tag, shapes)
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = _Stream(self.group, shapes, self.device)
        return st

    def post(self, tensors, tag: int = 0) -> _CopyTransfer:
        """Send ``tensors`` (contiguous, on this device) to the next rank."""
        st = self._stream(tag, tensors)
        slot = st.sent % SLOTS
        cur = torch.cuda.current_stream(self.device)
        if st.occupied[slot]:
            st.handle.wait_signal(st.next, SLOTS + slot, self.timeout_ms)
        self.copy_stream.wait_stream(cur)
        with torch.cuda.stream(self.copy_stream):
            for dst, src in zip(st.theirs[slot], tensors, strict=True):
                dst.copy_(src)
            _write_flag(st.next_pad, slot * st.world + st.rank)
        # The sources stay referenced until the slot is reused, which waits for the receiver's
        # "free" flag, written after this copy: the allocator cannot hand their memory out while
        # the copy stream still reads it.
        st.sources[slot] = list(tensors)
        st.occupied[slot] = True
        st.sent += 1
        return _CopyTransfer(self, st)

    def _free_last(self, st: _Stream) -> None:
        if st.unfreed is None:
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            _write_flag(st.prev_pad, (SLOTS + st.unfreed) * st.world + st.rank)
        st.unfreed = None

    def receive(self, st: _Stream) -> list[torch.Tensor]:
        """The next message from the previous rank (views of this rank's slot)."""
        self._free_last(st)
        slot = st.received % SLOTS
        st.handle.wait_signal(st.prev, slot, self.timeout_ms)
        st.received += 1
        st.unfreed = slot
        return list(st.mine[slot])

    def finish(self) -> None:
        """End of a ring call: free the last message received on every stream."""
        for st in self.streams.values():
            self._free_last(st)


def _write_flag(pad: torch.Tensor, word: int) -> None:
    """Set word ``word`` of a signal pad to 1 from the current stream, without a kernel."""
    import torch.distributed._symmetric_memory as symm_mem

    symm_mem._SymmetricMemory.stream_write_value32(pad, word, 1)


def drop(group: dist.ProcessGroup) -> None:
    """Forget ``group``'s transports (after an error inside a ring: their flags are out of step)."""
    for key in [k for k in _transports if k[0] == group.group_name]:
        del _transports[key]
