"""Train the tiny LM of ``train_ring_lm.py`` with DeepSpeed (ZeRO) and ringflash sequence parallelism.

Every rank of the sequence-parallel group holds ``S / W`` consecutive tokens of one long sequence
(DeepSpeed-Ulysses' contiguous sharding); each attention layer runs
``ringflash.integrations.deepspeed.DistributedAttention``, which picks Ulysses when the heads divide
by ``W`` and the hybrid / ring beyond that (so ``W`` may exceed the head count). ZeRO shards the
optimizer state over the same ranks. The first step's loss is checked against the same model run
on the whole sequence in one process.

GPU (NCCL), the deepspeed launcher:
    deepspeed --num_gpus 8 launch/deepspeed_train_lm.py --deepspeed_config launch/ds_config_zero.json
CPU (gloo), e.g. for CI: the deepspeed launcher wants GPUs (``--num_gpus``), so start the ranks with
torchrun; ``deepspeed.init_distributed`` picks up torchrun's environment:
    torchrun --standalone --nproc_per_node 2 launch/deepspeed_train_lm.py \\
        --deepspeed_config launch/ds_config_zero.json --steps 3
(``launch/deepspeed_run_cpu.sh`` does this.) Exits non-zero when the first loss disagrees or the
loss does not fall.

Loss scaling: DeepSpeed averages gradients over its data-parallel ranks, which here are the
sequence-parallel ranks holding parts of ONE sequence; each rank's loss is
``sum of its token losses / S * W`` so that the average is the gradient of the mean over all S tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.nn import functional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_ring_lm import TinyLM, local_attention, synthetic_sequence  # noqa: E402

import ringflash.parallel as rp  # noqa: E402
from ringflash.comm import init_from_deepspeed  # noqa: E402
from ringflash.integrations.deepspeed import DistributedAttention  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--deepspeed_config", default=os.path.join(os.path.dirname(__file__), "ds_config_zero.json")
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2, help="q heads (fewer than ranks exercises the hybrid)")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()

    import deepspeed

    info = init_from_deepspeed()
    rank, world = info.rank, info.world_size
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if info.backend == "nccl" else "cpu")
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.layers, args.heads, args.kv_heads).to(device)
    ref_model = TinyLM(args.vocab, args.dim, args.layers, args.heads, args.kv_heads).to(device)
    ref_model.load_state_dict(model.state_dict())
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    seq = synthetic_sequence(args.seq_len + 1, args.vocab).to(device)
    tokens, targets = seq[None, :-1], seq[None, 1:]
    pos = torch.arange(args.seq_len, device=device)
    group = dist.group.WORLD if world > 1 else None
    tok_l, tgt_l = (rp.shard(x, group, dim=1, layout="contiguous") for x in (tokens, targets))
    pos_l = rp.shard(pos, group, dim=0, layout="contiguous")
    sp_attn = DistributedAttention(None, group)
    plan = sp_attn.plan(args.heads)

    def attn(layer, q, k, v):  # [B, S/W, H, D] -> [B, S/W, H, D]
        return sp_attn(q, k, v, 0, causal=True)

    losses = []
    for step in range(args.steps):
        logits = engine(tok_l, pos_l, attn)
        loss_l = functional.cross_entropy(logits.flatten(0, 1).float(), tgt_l.flatten(), reduction="sum")
        loss_l = loss_l / args.seq_len * world
        engine.backward(loss_l)
        engine.step()
        loss = loss_l.detach() / world
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step}: loss {loss.item():.5f}", flush=True)
    with torch.no_grad():
        ref = functional.cross_entropy(
            ref_model(tokens, pos, local_attention).flatten(0, 1).float(), targets.flatten()
        )
    ok = abs(losses[0] - ref.item()) < 1e-4 and losses[-1] < losses[0] and not any(map(math.isnan, losses))
    if rank == 0:
        print(
            f"{'OK' if ok else 'MISMATCH'}: {world} rank(s), {plan[0]} (ulysses {plan[1]} x ring {plan[2]}), "
            f"ZeRO stage {config.get('zero_optimization', {}).get('stage', 0)}, first loss {losses[0]:.5f} "
            f"vs one process {ref.item():.5f}, last {losses[-1]:.5f}"
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
