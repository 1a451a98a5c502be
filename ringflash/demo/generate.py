"""The demo's generation check: prefill with ring attention, decode with the sharded KV cache.

The prompt is sharded contiguously (rank r holds tokens ``[r*L, (r+1)*L)``), which is exactly the
layout ``ShardedKVCache.from_prefill`` takes: each layer's local K/V shard from the ring prefill
becomes that rank's piece of the cache, and new tokens go to the last rank. Every step's logits
and the greedy tokens are compared with one process that recomputes the whole sequence with plain
attention (no cache).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..parallel import ring_flash_attn_func, shard, unshard
from ..parallel.sharded_decode import ShardedKVCache
from .model import synthetic_sequence
from .train import reference_attention, sync_device


@torch.no_grad()
def generate_check(cfg, model, group, device, progress) -> dict:
    """Greedy-generate ``cfg.gen_tokens`` tokens sharded and in one process; compare them."""
    model.eval()
    n = cfg.seq_len
    prompt = synthetic_sequence(n, cfg.vocab, seed=1)[None].to(device)
    pos = torch.arange(n + cfg.gen_tokens, device=device)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prefill_attn(layer, q, k, v):
        kv[layer] = (k, v)
        return ring_flash_attn_func(q, k, v, causal=True, group=group)

    sync_device(device)
    t0 = time.perf_counter()
    tok_l = shard(prompt, group, dim=1, layout="contiguous")
    pos_l = shard(pos[:n], group, dim=0, layout="contiguous")
    logits = unshard(model(tok_l, pos_l, prefill_attn), group, dim=1, layout="contiguous")
    caches = [
        ShardedKVCache.from_prefill(*kv[i], max_new_tokens=cfg.gen_tokens, group=group)
        for i in range(len(model.blocks))
    ]

    def step_attn(layer, q, k, v):
        return caches[layer].step(q, k, v, causal=True)

    step_logits = [logits[0, -1].float()]
    tokens = [int(step_logits[-1].argmax())]
    sync_device(device)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(cfg.gen_tokens - 1):
        x = torch.tensor([[tokens[-1]]], device=device)
        step_logits.append(model(x, pos[n + i : n + i + 1], step_attn)[0, -1].float())
        tokens.append(int(step_logits[-1].argmax()))
        progress(i + 2, cfg.gen_tokens, f"generate token {i + 2}/{cfg.gen_tokens}")
    sync_device(device)
    t_decode = time.perf_counter() - t0

    ref_attn = reference_attention(cfg.reference_scale_error)
    seq = prompt
    ref_tokens, logit_err = [], 0.0
    for i in range(cfg.gen_tokens):
        ref_logits = model(seq, pos[: seq.shape[1]], ref_attn)[0, -1].float()
        logit_err = max(logit_err, (ref_logits - step_logits[i]).abs().max().item())
        ref_tokens.append(int(ref_logits.argmax()))
        # Follow the sharded run's own tokens so that one early difference is not counted twice.
        seq = torch.cat([seq, torch.tensor([[tokens[i]]], device=device)], 1)
    model.train()
    world = dist.get_world_size(group) if group is not None else 1
    return {
        "tokens": tokens,
        "ref_tokens": ref_tokens,
        "tokens_match": tokens == ref_tokens,
        "gen_logit_err": logit_err,
        "prefill_tokens_per_s": n / max(t_prefill, 1e-9),
        "decode_tokens_per_s": (cfg.gen_tokens - 1) / max(t_decode, 1e-9),
        "world": world,
    }
