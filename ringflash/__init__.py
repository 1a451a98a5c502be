"""ringflash: exact attention for sequences too long for one device.

Local flash attention (Triton kernels on GPU, a blockwise PyTorch backend elsewhere) returning
the output and its log-sum-exp, exact LSE merging of partial results, and ring attention for
sequence-parallel training (contiguous, zigzag and stripe layouts, packed documents), Ulysses and
a 2-D Ulysses x ring hybrid, and flash
decoding with a KV cache on one device or sharded over ranks.
"""

from .backends import use_backend, use_tma
from .checks import skip_value_checks
from .comm import build_usp_groups, init_distributed
from .decode import flash_attn_with_kvcache
from .device_errors import check_device_errors, use_value_checks
from .forms import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .merge import combine_attn_partials, merge_attn_states, merge_sink
from .ops import flash_attn_func, flash_attn_varlen_func
from .parallel import (
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_varlen_qkvpacked_func,
    shard,
    stripe_flash_attn_func,
    stripe_flash_attn_kvpacked_func,
    stripe_flash_attn_qkvpacked_func,
    ulysses_attn_func,
    ulysses_attn_varlen_func,
    unshard,
    use_ring_prefetch,
    use_ring_transport,
    usp_attn_func,
    usp_positions,
    usp_shard,
    usp_unshard,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_kvpacked_func,
    zigzag_ring_flash_attn_qkvpacked_func,
)
from .parallel.sharded_decode import ShardedKVCache, sharded_flash_attn_with_kvcache

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "merge_attn_states",
    "merge_sink",
    "combine_attn_partials",
    "use_backend",
    "use_ring_prefetch",
    "use_ring_transport",
    "use_tma",
    "skip_value_checks",
    "use_value_checks",
    "check_device_errors",
    "ring_flash_attn_func",
    "ring_flash_attn_kvpacked_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_kvpacked_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "zigzag_ring_flash_attn_func",
    "zigzag_ring_flash_attn_kvpacked_func",
    "zigzag_ring_flash_attn_qkvpacked_func",
    "stripe_flash_attn_func",
    "stripe_flash_attn_kvpacked_func",
    "stripe_flash_attn_qkvpacked_func",
    "shard",
    "unshard",
    "flash_attn_with_kvcache",
    "sharded_flash_attn_with_kvcache",
    "ShardedKVCache",
    "ulysses_attn_func",
    "ulysses_attn_varlen_func",
    "usp_attn_func",
    "usp_shard",
    "usp_unshard",
    "usp_positions",
    "build_usp_groups",
    "init_distributed",
]
