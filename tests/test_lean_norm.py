"""``training.lean_rmsnorms``: transformers' Llama RMSNorm with only its input saved. The same
outputs bit for bit, the same loss and gradients through a whole model (float64; chunks smaller than
the sequence), no float32 copy kept for the backward, and clear errors for norms of another formula.
``training.decoder_hidden_states`` with its saved tensors offloaded: the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from ringflash.integrations import training  # noqa: E402


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
    )  # fmt: skip
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)


def test_lean_norms_give_the_models_loss_and_gradients():
    model, ref = _llama(torch.float64), _llama(torch.float64)
    assert training.lean_rmsnorms(model, chunk_tokens=7) == 5  # 2 per layer and the final norm
    ids = torch.randint(0, 53, (2, 30), generator=torch.Generator().manual_seed(1))
    losses = [m(input_ids=ids, labels=ids, use_cache=False).loss for m in (model, ref)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-12, [x.item() for x in losses]
    for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        err = ((p.grad - pr.grad).abs().max() / pr.grad.abs().max()).item()
        assert err < 1e-12, f"grad of {name} differs by {err:.3g} (relative)"


def test_lean_norm_in_bf16_equals_the_norm_and_keeps_no_float32_copy():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm, ref = LlamaRMSNorm(64).to(torch.bfloat16), LlamaRMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(norm.weight)
    training.lean_rmsnorms(norm, chunk_tokens=5)
    x = torch.randn(3, 11, 64, dtype=torch.bfloat16)
    saved = {}

    def run(m):
        xi = x.clone().requires_grad_()
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: found.append(t) or t, lambda t: t):
            y = m(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
        saved[m] = found
        return y, xi.grad, m.weight.grad

    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run(norm), run(ref)
    assert torch.equal(y, y_ref), "the forward differs"
    assert (dx.float() - dx_ref.float()).abs().max().item() <= 2**-6 * dx_ref.float().abs().max().item()
    assert (dw.float() - dw_ref.float()).abs().max().item() <= 2**-6 * dw_ref.float().abs().max().item()
    assert not any(t.dtype == torch.float32 for t in saved[norm]), [t.dtype for t in saved[norm]]
    assert sum(t.numel() for t in saved[norm]) == x.numel() + 64  # the input and the weight
    assert any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved[ref])


def test_lean_norm_without_gradients_for_the_input_or_the_weight():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16).double()
    training.lean_rmsnorms(norm, chunk_tokens=3)
    norm.weight.requires_grad_(False)
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    norm.weight.requires_grad_(True)
    norm(x.detach()).sum().backward()
    assert norm.weight.grad is not None


class GemmaStyleRMSNorm(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def test_lean_norms_refuse_another_formula_and_bad_arguments():
    with pytest.raises(ValueError, match="GemmaStyleRMSNorm is not Llama's RMSNorm formula"):
        training.lean_rmsnorms(torch.nn.Sequential(GemmaStyleRMSNorm(8)))
    with pytest.raises(ValueError, match="no module whose class name ends in 'RMSNorm'"):
        training.lean_rmsnorms(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        training.lean_rmsnorms(_llama(torch.float32), chunk_tokens=0)


def test_offloaded_decoder_states_give_the_same_loss_and_gradients():
    """``decoder_hidden_states(offload=True)``: the stack's saved tensors wait in host memory (a
    no-op move on CPU, but the hooks run); the loss and every gradient equal the plain call's."""
    model, ref = _llama(torch.float32), _llama(torch.float32)
    for m in (model, ref):
        training.checkpoint_layers(m)
    ids = torch.randint(0, 53, (1, 24), generator=torch.Generator().manual_seed(2))
    losses = []
    for m, offload in ((model, True), (ref, False)):
        h = training.decoder_hidden_states(m, offload, input_ids=ids, use_cache=False)
        loss = torch.nn.functional.cross_entropy(m.lm_head(h)[0, :-1], ids[0, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p.grad, pr.grad), name
