"""Train a small causal transformer LM on one long synthetic sequence sharded over the ranks.

Every rank holds ``S / W`` tokens of the sequence in the chosen layout (zigzag by default) and
its attention layers run ring attention over the default process group; the model's weights are
replicated, so the gradients are summed over the ranks after each backward. Every rank also runs
the same model on the whole sequence in one process (plain PyTorch attention) and checks that
the loss and every gradient agree, then both take the same optimizer steps.

    torchrun --nproc_per_node 4 launch/train_ring_lm.py          # CPU: gloo, GPU: NCCL
    mpirun -n 4 python launch/train_ring_lm.py                   # mpi4py gives rank/size
    python launch/train_ring_lm.py                               # one process (local fallback)

Exits non-zero when the sharded model disagrees with the single-process one.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
import torch.distributed as dist
from torch.nn import functional

import ringflash.parallel as rp
from ringflash.comm import init_distributed
from ringflash.demo.model import TinyLM, synthetic_sequence
from ringflash.reference import attention_ref

RING_FUNCS = {
    "contiguous": rp.ring_flash_attn_func,
    "zigzag": rp.zigzag_ring_flash_attn_func,
    "stripe": rp.stripe_flash_attn_func,
}


def local_attention(layer, q, k, v):
    """Plain attention over the whole sequence (the single-process reference)."""
    return attention_ref(q, k, v, causal=True)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=512, help="global sequence length")
    p.add_argument("--layout", choices=list(RING_FUNCS), default="zigzag")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-check", action="store_true", help="skip the single-process comparison")
    args = p.parse_args()

    info = init_distributed()
    rank, world = info.rank, info.world_size
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if info.backend == "nccl" else "cpu")
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.layers, args.heads, args.kv_heads).to(device)
    ref_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=args.lr)

    seq = synthetic_sequence(args.seq_len + 1, args.vocab).to(device)
    tokens, targets = seq[None, :-1], seq[None, 1:]
    pos = torch.arange(args.seq_len, device=device)
    # This rank's shard: tokens, next-token targets and global positions in the same layout.
    tok_l = rp.shard(tokens, dim=1, layout=args.layout)
    tgt_l = rp.shard(targets, dim=1, layout=args.layout)
    pos_l = rp.shard(pos, dim=0, layout=args.layout)
    ring = RING_FUNCS[args.layout]

    def attn(layer, q, k, v):
        return ring(q, k, v, causal=True)

    ok = True
    for step in range(args.steps):
        logits = model(tok_l, pos_l, attn)
        # Mean over the whole sequence = sum of the local sums / S, summed over ranks.
        loss_l = (
            functional.cross_entropy(logits.flatten(0, 1).float(), tgt_l.flatten(), reduction="sum")
            / args.seq_len
        )
        opt.zero_grad()
        loss_l.backward()
        loss = loss_l.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            for prm in model.parameters():
                dist.all_reduce(prm.grad)
        line = f"step {step}: loss {loss.item():.5f}"
        if not args.no_check:
            ref_logits = ref_model(tokens, pos, local_attention)
            ref_loss = functional.cross_entropy(ref_logits.flatten(0, 1).float(), targets.flatten())
            ref_opt.zero_grad()
            ref_loss.backward()
            worst = max(
                ((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12)).item()
                for a, b in zip(model.parameters(), ref_model.parameters(), strict=True)
            )
            dloss = abs(loss.item() - ref_loss.item())
            line += (
                f" (one process {ref_loss.item():.5f}, |dloss| {dloss:.1e}, worst rel grad diff {worst:.1e})"
            )
            if not (dloss < 1e-4 and worst < 1e-3) or math.isnan(loss.item()):
                ok = False
            ref_opt.step()
        opt.step()
        if rank == 0:
            print(line, flush=True)
    if rank == 0:
        print(f"{'OK' if ok else 'MISMATCH'}: {world} rank(s), layout {args.layout}, {args.seq_len} tokens")
    if world > 1:
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag)
        ok = flag.item() == 0
        dist.barrier()  # nobody tears down while a peer still talks to it
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
