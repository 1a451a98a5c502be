"""Bad input gets a ValueError or TypeError that says what was expected."""

import pytest
import torch

import ringflash as rf


def qkv(B=1, S=8, H=2, D=16, dtype=torch.float32):
    return [torch.randn(B, S, H, D, dtype=dtype) for _ in range(3)]


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims \[batch, seqlen, nheads, headdim\]"):
        rf.flash_attn_func(q[0], k, v)
    with pytest.raises(ValueError, match=r"must have 3 dims \[total_tokens"):
        cu = torch.tensor([0, 8], dtype=torch.int32)
        rf.flash_attn_varlen_func(q, k[0], v[0], cu, cu, 8, 8)


def test_head_dims_differ():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same head dim"):
        rf.flash_attn_func(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        rf.flash_attn_func(q, k, v[..., :8])


def test_heads_not_divisible():
    q, k, v = qkv(H=3)
    with pytest.raises(ValueError, match=r"nheads of q \(3\) must be a multiple of nheads of k/v \(2\)"):
        rf.flash_attn_func(q, k[:, :, :2], v[:, :, :2])


def test_mixed_and_unsupported_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share one dtype"):
        rf.flash_attn_func(q, k.half(), v.half())
    with pytest.raises(TypeError, match="supported dtypes are float16, bfloat16, float32"):
        rf.flash_attn_func(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        rf.flash_attn_func(q.tolist(), k, v)


def test_head_dim_too_large():
    q, k, v = qkv(D=320)
    with pytest.raises(ValueError, match=r"head dim must be in 1..256, got 320"):
        rf.flash_attn_func(q, k, v)


def test_batch_mismatch():
    q, k, v = qkv(B=2)
    with pytest.raises(ValueError, match="same batch size"):
        rf.flash_attn_func(q, k[:1], v[:1])


def test_unsupported_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout is not supported"):
        rf.flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="alibi_slopes is not supported"):
        rf.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="window_size entries must be >= -1"):
        rf.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size must be a pair"):
        rf.flash_attn_func(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="softcap must be a finite float >= 0"):
        rf.flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite float"):
        rf.flash_attn_func(q, k, v, softmax_scale=-0.1)


def _packed(T=10, H=2, D=16):
    return [torch.randn(T, H, D) for _ in range(3)]


@pytest.mark.parametrize(
    "cu, err, match",
    [
        (torch.tensor([0, 4, 10], dtype=torch.int64), TypeError, "cu_seqlens_q must be int32"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, "must start at 0"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, "non-decreasing"),
        (
            torch.tensor([0, 4, 9], dtype=torch.int32),
            ValueError,
            "ends at 9 but the packed tensor has 10 tokens",
        ),
        (torch.tensor([[0, 4, 10]], dtype=torch.int32), ValueError, "must be 1-D"),
    ],
    ids=["int64", "nonzero-start", "not-monotone", "wrong-total", "2d"],
)
def test_bad_cu_seqlens(cu, err, match):
    q, k, v = _packed()
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(err, match=match):
        rf.flash_attn_varlen_func(q, k, v, cu, good, 6, 6)


def test_varlen_max_seqlen_too_small_and_count_mismatch():
    q, k, v = _packed()
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is smaller than the longest sequence \(6\)"):
        rf.flash_attn_varlen_func(q, k, v, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="same number of sequences"):
        rf.flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 10], dtype=torch.int32), 6, 10)


def test_packed_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"kv must be \[B, S, 2, H, D\]"):
        rf.flash_attn_kvpacked_func(q, torch.stack([k, v, v], dim=2))
    with pytest.raises(ValueError, match=r"qkv must be \[B, S, 3, H, D\]"):
        rf.flash_attn_qkvpacked_func(q)
