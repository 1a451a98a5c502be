"""Sequence-parallel attention: layouts, sharding, the ring and its single-process simulator,
Ulysses and the hybrid (Ulysses x ring)."""

from .doc_layouts import build_doc_plan, doc_positions
from .hybrid import usp_attn_func, usp_positions, usp_shard, usp_unshard
from .layouts import LAYOUTS, build_plan, positions
from .options import use_ring_prefetch, use_ring_transport
from .ring_funcs import (
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
    stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func,
    stripe_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
)
from .sharding import shard, shard_for, unshard, unshard_from
from .simulate import simulate_ring_attn, simulate_ring_attn_backward
from .ulysses import ulysses_attn_func, ulysses_attn_varlen_func

__all__ = [
    "LAYOUTS",
    "build_plan",
    "build_doc_plan",
    "doc_positions",
    "positions",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "shard",
    "shard_for",
    "simulate_ring_attn",
    "simulate_ring_attn_backward",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "ulysses_attn_func",
    "ulysses_attn_varlen_func",
    "unshard",
    "unshard_from",
    "use_ring_prefetch",
    "use_ring_transport",
    "usp_attn_func",
    "usp_positions",
    "usp_shard",
    "usp_unshard",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
]
