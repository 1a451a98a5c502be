"""A small causal transformer LM whose attention is a pluggable function.

Each block calls ``attn(layer, q, k, v)`` with ``q [B, S, H, D]`` and ``k, v [B, S, Hk, D]`` after
rotary embedding at the given global positions, so the same weights run with ring attention on a
sequence shard, with plain attention on the whole sequence, or with a KV cache while decoding.
"""

from __future__ import annotations

import torch
from torch import nn


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [B, S, H, D]`` at global positions ``pos [S]``."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * freq[None, :]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class Block(nn.Module):
    """Pre-norm attention + MLP block with grouped-query attention."""

    def __init__(self, index: int, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.index, self.heads, self.kv_heads, self.hd = index, heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False)
        )

    def forward(self, x, pos, attn):
        b, s, _ = x.shape
        sizes = [self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd]
        q, k, v = self.qkv(self.norm1(x)).split(sizes, -1)
        q = rope(q.view(b, s, self.heads, self.hd), pos)
        k = rope(k.view(b, s, self.kv_heads, self.hd), pos)
        v = v.view(b, s, self.kv_heads, self.hd)
        x = x + self.proj(attn(self.index, q, k, v).reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """``forward(tokens [B, S], pos [S], attn) -> logits [B, S, vocab]``."""

    def __init__(self, vocab: int = 128, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(i, dim, heads, kv_heads) for i in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, pos, attn):
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, pos, attn)
        return self.head(self.norm(x))


def synthetic_sequence(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A learnable stream: ``x[t+1] = (5 x[t] + 3) mod vocab``, with 10% random tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dtype=torch.long)
    x[0] = 1
    for t in range(1, n):
        x[t] = (5 * x[t - 1] + 3) % vocab
    noise = torch.rand(n, generator=g) < 0.1
    x[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    return x
