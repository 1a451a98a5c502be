"""The demo's training check: a TinyLM with its sequence sharded by ring attention, step by step
against the same model on the whole sequence in one process.

The sharded model's loss is ``sum over ranks of (local token losses) / S``, equal to the
whole-sequence mean; its weights are replicated, so gradients are summed over ranks.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch.nn import functional

from ..parallel import ring_flash_attn_func, shard, stripe_flash_attn_func, zigzag_ring_flash_attn_func
from ..reference import attention_ref
from .model import TinyLM, synthetic_sequence

RING_FUNCS = {
    "contiguous": ring_flash_attn_func,
    "zigzag": zigzag_ring_flash_attn_func,
    "stripe": stripe_flash_attn_func,
}


def reference_attention(scale_error: float = 1.0):
    """Plain attention on the whole sequence; ``scale_error != 1`` deliberately breaks it (tests)."""

    def attn(layer, q, k, v):
        return attention_ref(q, k, v, softmax_scale=scale_error * q.shape[-1] ** -0.5, causal=True)[0]

    return attn


def train_check(cfg, group, device, progress) -> dict:
    """Train ``cfg.steps`` steps sharded and unsharded; return timing and the worst disagreement."""
    world = dist.get_world_size(group) if group is not None else 1
    torch.manual_seed(0)
    model = TinyLM(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.kv_heads).to(device)
    ref_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=3e-3)
    seq = synthetic_sequence(cfg.seq_len + 1, cfg.vocab).to(device)
    tokens, targets = seq[None, :-1], seq[None, 1:]
    pos = torch.arange(cfg.seq_len, device=device)
    tok_l = shard(tokens, group, dim=1, layout=cfg.layout)
    tgt_l = shard(targets, group, dim=1, layout=cfg.layout)
    pos_l = shard(pos, group, dim=0, layout=cfg.layout)
    ring = RING_FUNCS[cfg.layout]
    ref_attn = reference_attention(cfg.reference_scale_error)

    def attn(layer, q, k, v):
        return ring(q, k, v, causal=True, group=group)

    worst_loss, worst_grad, sharded_time, losses = 0.0, 0.0, 0.0, []
    for step in range(cfg.steps):
        sync_device(device)
        t0 = time.perf_counter()
        logits = model(tok_l, pos_l, attn)
        loss_l = functional.cross_entropy(logits.flatten(0, 1).float(), tgt_l.flatten(), reduction="sum")
        loss_l = loss_l / cfg.seq_len
        opt.zero_grad()
        loss_l.backward()
        loss = loss_l.detach().clone()
        if world > 1:
            dist.all_reduce(loss, group=group)
            for prm in model.parameters():
                dist.all_reduce(prm.grad, group=group)
        sync_device(device)
        sharded_time += time.perf_counter() - t0

        ref_logits = ref_model(tokens, pos, ref_attn)
        ref_loss = functional.cross_entropy(ref_logits.flatten(0, 1).float(), targets.flatten())
        ref_opt.zero_grad()
        ref_loss.backward()
        worst_loss = max(worst_loss, abs(loss.item() - ref_loss.item()))
        for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
            rel = ((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12)).item()
            worst_grad = max(worst_grad, rel)
        losses.append(loss.item())
        opt.step()
        ref_opt.step()
        progress(step + 1, cfg.steps, f"train step {step + 1}/{cfg.steps}, loss {loss.item():.4f}")
    return {
        "losses": losses,
        "loss_err": worst_loss,
        "grad_err": worst_grad,
        "train_tokens_per_s": cfg.steps * cfg.seq_len / max(sharded_time, 1e-9),
        "model": model,
    }


def sync_device(device: torch.device) -> None:
    """Wait for the device, so that host clocks time its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
