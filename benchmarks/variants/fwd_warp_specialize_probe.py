"""Probe: does Triton's automatic warp specialization (tl.range(..., warp_specialize=True)) speed up a
plain non-causal attention forward on this GPU? Minimal kernel, TMA descriptors, hd 128, bf16."""
import sys, time
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend


@triton.jit
def fwd(dq, dk, dv, do, S, H, scale, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
        STAGES: tl.constexpr, CAUSAL: tl.constexpr):
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * S
    q = dq.load([row0 + pm * BM, 0])
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    qs = scale * 1.4426950408889634
    hi = S
    if CAUSAL:
        hi = (pm + 1) * BM
    for j in tl.range(0, hi, BN, warp_specialize=WS, num_stages=STAGES):
        k = dk.load([row0 + j, 0])
        s = tl.dot(q, k.T) * qs
        if CAUSAL:
            offs_m = pm * BM + tl.arange(0, BM)
            offs_n = j + tl.arange(0, BN)
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        mn = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - mn[:, None])
        a = tl.exp2(m - mn)
        l = l * a + tl.sum(p, 1)
        acc = acc * a[:, None]
        v = dv.load([row0 + j, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m = mn
    acc = acc / l[:, None]
    do.store([row0 + pm * BM, 0], acc.to(tl.bfloat16))


def run(q, k, v, BM, BN, W, ST, WS, causal):
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    f = lambda t, b: TensorDescriptor(t.view(-1, D), shape=[B * H * S, D], strides=[D, 1], block_shape=[b, D])
    fwd[(S // BM, B * H)](f(q, BM), f(k, BN), f(v, BN), f(o, BM), S, H, D ** -0.5, BM, BN, D, WS, ST, causal,
                          num_warps=W, num_stages=ST)
    return o


torch.manual_seed(0)
for S, causal in ((4096, False), (16384, False), (16384, True)):
    B, H, D = max(1, 32768 // S), 32, 128
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        t = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), rep=200)
    print(f"S={S} causal={causal} cudnn {t*1e3:.0f} us {flops/t/1e9:.0f} TF", flush=True)
    for BM, BN, W, ST in ((128, 128, 8, 2), (128, 128, 4, 2), (128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 3), (256, 128, 8, 2), (256, 64, 8, 2)):
        for WS in (False, True):
            try:
                o = run(q, k, v, BM, BN, W, ST, WS, causal)
                err = (o.float() - ref.float()).abs().max().item()
                t2 = triton.testing.do_bench(lambda: run(q, k, v, BM, BN, W, ST, WS, causal), rep=200)
                print(f"  BM{BM} BN{BN} w{W} st{ST} ws={int(WS)}: {t2*1e3:.0f} us {flops/t2/1e9:.0f} TF x{t/t2:.3f} err {err:.1e}", flush=True)
            except Exception as e:
                print(f"  BM{BM} BN{BN} w{W} st{ST} ws={int(WS)}: FAIL {type(e).__name__} {str(e)[:150]}", flush=True)
