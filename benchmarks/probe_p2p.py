"""Probe: how fast one ring step's K/V (32 MiB) reaches the next GPU while attention runs.

Two ways, each alone and while the sender and the receiver run a forward attention kernel (the
ring's compute) on their default streams:

- ``nccl``: ``batch_isend_irecv`` on NCCL's own stream (what ``RingComm`` does); NCCL's kernel
  needs SMs, which the attention kernel holds;
- ``copy engine``: a copy into the peer's symmetric-memory buffer (``torch.distributed.
  _symmetric_memory``; a peer-to-peer DMA copy, no SMs) on a side stream, then a signal the
  receiver waits for.

Prints the transfer's time (CUDA events on the transfer's stream, receiver side for NCCL, sender
side for the copy) and GB/s, medians over ``--reps``.

    torchrun --nproc_per_node 2 benchmarks/probe_p2p.py
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

from ringflash import kernels


def _attention_load(device):
    q = torch.randn(1, 8192, 32, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8192, 8, 128, device=device, dtype=torch.bfloat16)

    def run(n=3):
        for _ in range(n):
            kernels.attn_fwd(q, k, k, softmax_scale=128**-0.5, causal=False)

    run(1)
    return run


def _timed(stream, fn):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        a.record()
        fn()
        b.record()
    return a, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--mib", type=int, default=32)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    n = args.mib * 2**20 // 2
    send = torch.full((n,), float(rank + 1), device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    load = _attention_load(device)
    side = torch.cuda.Stream(device, priority=-1)
    results = {}

    def nccl_once():
        ops = [dist.P2POp(dist.irecv, recv, prv), dist.P2POp(dist.isend, send, nxt)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(n, dtype=torch.bfloat16, device=device)
        hdl = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
        peer = hdl.get_buffer(nxt, (n,), torch.bfloat16)

        pad = hdl.get_signal_pad(nxt, (world,), torch.uint32)  # next rank's pad, channel 0

        def ce_copy():
            peer.copy_(send)

        def ce_once():
            # The copy by DMA, then a flag written into the next rank's signal pad by the stream
            # itself (cuStreamWriteValue32): neither needs an SM. The receiver's wait is a kernel
            # on its own stream, timed outside this segment.
            peer.copy_(send)
            symm_mem._SymmetricMemory.stream_write_value32(pad, rank, 1)

        def ce_wait():
            hdl.wait_signal(prv, 0)

        ce_once()
        ce_wait()
        torch.cuda.synchronize()
        assert torch.all(buf == prv + 1), "the copy did not arrive"
        dist.barrier()
    except Exception as e:  # report and keep the NCCL rows
        print(f"rank {rank}: symmetric memory unavailable: {type(e).__name__}: {e}", flush=True)
        ce_once = ce_copy = ce_wait = None

    nccl_once()
    torch.cuda.synchronize()
    attn: dict[str, list] = {}
    for _ in range(args.reps):  # the attention alone, for the slowdown a transfer causes
        attn.setdefault("none", []).append(_timed(torch.cuda.current_stream(), lambda: load(3)))
    torch.cuda.synchronize()
    for name, fn in (("nccl", nccl_once), ("copy engine", ce_once), ("copy only", ce_copy)):
        if fn is None:
            continue
        for loaded in (False, True):
            times = []
            for _ in range(args.reps):
                dist.barrier()
                torch.cuda.synchronize()
                if loaded:
                    load(1)  # the compute stream is busy before the transfer starts
                if not loaded:
                    side.wait_stream(torch.cuda.current_stream())
                if name == "nccl":
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record(side)
                    side.wait_event(a)
                    with torch.cuda.stream(side):
                        fn()
                    b.record(side)
                else:
                    a, b = _timed(side, fn)
                if loaded:
                    c0, c1 = _timed(torch.cuda.current_stream(), lambda: load(3))
                    attn.setdefault(name, []).append((c0, c1))
                if name == "copy engine":
                    ce_wait()  # consume the flag (on the compute stream, after its work)
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            results[(name, loaded)] = statistics.median(times)
    attn_ms = {n: statistics.median(a.elapsed_time(b) for a, b in evs) for n, evs in attn.items()}
    if rank == 0:
        print(
            f"# {torch.cuda.get_device_name()} x{world}, torch {torch.__version__}, {args.mib} MiB a transfer"
        )
        for (name, loaded), t in results.items():
            gbs = args.mib * 2**20 / (t * 1e-3) / 1e9
            when = "under attention" if loaded else "alone"
            print(f"{name:>11} {when:>16}: {t * 1e3:7.1f} us {gbs:6.1f} GB/s")
        print("attention (3 calls) ms: " + ", ".join(f"{n} {t:.3f}" for n, t in attn_ms.items()))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
