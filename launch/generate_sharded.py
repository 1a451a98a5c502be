"""Long-context inference with the sequence sharded over the ranks.

Prefills a prompt with ring attention (rank r holds tokens [r*L, (r+1)*L)), keeps each layer's
K/V shard in a ``ShardedKVCache``, then decodes greedily: every step attends to the whole cache
with one small all-gather of partials. Every rank checks each generated token (and the logits)
against one process that recomputes the whole sequence with plain attention.

    torchrun --nproc_per_node 4 launch/generate_sharded.py --prompt-len 4096 --new-tokens 32
    mpirun -n 4 python launch/generate_sharded.py
    python launch/generate_sharded.py                          # one process (local fallback)

Exits non-zero when a token differs from the single-process run.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from ringflash.comm import init_distributed
from ringflash.demo.generate import generate_check
from ringflash.demo.model import TinyLM
from ringflash.demo.run import DemoError, plan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=1024, help="global prompt length")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    args = p.parse_args()
    info = init_distributed()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if info.backend == "nccl" else "cpu")
    try:
        cfg = plan(
            info.world_size,
            args.prompt_len,
            "contiguous",
            device.type,
            1,
            gen_tokens=args.new_tokens,
            dim=args.dim,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
        )
    except DemoError as e:
        print(f"generate_sharded: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = TinyLM(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.kv_heads).to(device)
    group = dist.group.WORLD if info.world_size > 1 else None
    res = generate_check(cfg, model, group, device, lambda *a: None)
    ok = res["tokens_match"]
    if info.rank == 0:
        print(f"tokens (sharded):        {res['tokens']}")
        print(f"tokens (one process):    {res['ref_tokens']}")
        print(f"max |logit difference|:  {res['gen_logit_err']:.2e}")
        rates = res["prefill_tokens_per_s"], res["decode_tokens_per_s"]
        print(f"prefill {rates[0]:,.0f} tokens/s, decode {rates[1]:,.1f} tokens/s")
        verdict = "OK" if ok else "MISMATCH"
        print(f"{verdict}: {info.world_size} rank(s), prompt {cfg.seq_len}, {cfg.gen_tokens} new tokens")
    if info.world_size > 1:
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag)
        ok = flag.item() == 0
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
