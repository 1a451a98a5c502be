"""DeepSpeed's Arctic Long Sequence Training (ALST) with ringflash, on real gloo processes: a tiny Llama
(built from a config) with its sequence sharded over the ranks matches the model run in one process
(logits, the loss, every parameter gradient), one sequence and packed documents.

- ringflash's local attention as ALST's core (``UlyssesSPAttentionHF.register_with_transformers``):
  DeepSpeed's Ulysses all-to-alls, ringflash's kernels, documents found from the gathered positions;
- ringflash's own sequence parallelism fed by ALST's ``UlyssesSPDataLoaderAdapter``: ``method="hybrid"``
  and ``method="ring"`` at a degree (4) beyond the KV heads (2), the hybrid as Ulysses (4 q heads) and
  as a 2 x 2 grid (6 q heads), and bad inputs that raise on every rank.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_utils import spawn

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from ringflash.integrations import training  # noqa: E402
from ringflash.integrations import transformers as rt  # noqa: E402
from ringflash.parallel.hybrid import usp_positions_for  # noqa: E402

VOCAB = 61


def _tiny_llama(attn: str, heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8 * heads,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).float()


def _sample(seed: int, S: int, docs: list[int] | None = None) -> dict:
    """One row of ``S`` tokens with labels (HF convention: unshifted); with ``docs`` (lengths) a packed
    row: position ids restart per document and no document predicts the next one's first token."""
    ids = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    if docs is None:
        pos = torch.arange(S)[None]
    else:
        assert sum(docs) == S
        pos = torch.cat([torch.arange(n) for n in docs])[None]
        labels[0, list(itertools.accumulate([0, *docs[:-1]]))] = -100
    return dict(input_ids=ids, position_ids=pos, labels=labels)


def _reference(ref, sample: dict, docs: list[int] | None):
    """One process: logits of the whole row (each packed document alone) and the mean loss."""
    from torch.nn import functional

    ids = sample["input_ids"]
    bounds = list(itertools.accumulate([0, *(docs or [ids.shape[1]])]))
    logits = torch.cat(
        [ref(input_ids=ids[:, a:b], use_cache=False).logits for a, b in itertools.pairwise(bounds)], 1
    )
    shift = functional.pad(sample["labels"], (0, 1), value=-100)[:, 1:]
    loss = functional.cross_entropy(logits[0], shift[0])  # mean over the valid labels
    loss.backward()
    return logits, loss


def _compare(tag, rank, world, model, ref, logits, term, group, sample, docs):
    """Sum the ranks' gradients and loss terms; compare them, and this rank's logits, with one process."""
    import torch.distributed as dist

    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
    total = training.loss_value(term, group)
    ref_logits, ref_loss = _reference(ref, sample, docs)
    n = ref_logits.shape[1] // world
    err = (logits - ref_logits[:, rank * n : (rank + 1) * n]).abs().max().item()
    assert err < 1e-4, f"{tag} rank {rank}: logits differ by {err:.3g}"
    assert abs(total - ref_loss.item()) < 1e-5, f"{tag} rank {rank}: loss {total} vs {ref_loss.item()}"
    for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        gerr = (p.grad - pr.grad).abs().max().item()
        scale = pr.grad.abs().max().item() + 1e-6
        assert gerr <= 1e-4 * scale + 1e-6, f"{tag} rank {rank}: grad of {name} differs by {gerr:.3g}"
    model.zero_grad()
    ref.zero_grad()


def _step(model, batch, group):
    from ringflash.backends import use_backend

    with use_backend("torch"):
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        term = training.sequence_parallel_loss(logits, batch["shift_labels"], group)
        term.backward()
    return logits.detach(), term


PACKED = [5, 9, 1, 13, 4]  # 32 tokens: documents cross the shard boundaries of 2 and 4 ranks


def _alst_core_worker(rank, world):
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the process group dist_utils made
    name = rt.register(method="local")
    model, ref = _tiny_llama(name), _tiny_llama("eager")
    ref.load_state_dict(model.state_dict())
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=name, sequence_parallel_size=world, micro_batch_size=1,
        seq_length_is_variable=True,
    )  # fmt: skip
    group = mpu.get_sequence_parallel_group()
    for docs in (None, PACKED):
        sample = _sample(11, 32, docs)
        batch = training.shard_batch(sample, group)
        logits, term = _step(model, batch, group)
        _compare(f"ALST core, docs {docs}", rank, world, model, ref, logits, term, group, sample, docs)
    return name


def test_ringflash_as_alst_core_attention():
    """DeepSpeed's Ulysses (ALST) with ringflash's local attention as its core: 4 q / 2 KV heads over
    2 ranks, one sequence and packed documents (found from the position ids ALST gathers)."""
    names = spawn(_alst_core_worker, 2, timeout=240)
    assert names == ["sp_local_contiguous"] * 2


SAMPLES = [(21, None), (22, None), (23, None), (24, PACKED)]  # (seed, documents) of rank r's sample
MODELS = [("hybrid", 4, 2), ("ring", 4, 2), ("hybrid", 6, 2), ("hybrid", 6, 2)]  # micro batch j's model


def _adapter_worker(rank, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    from torch.utils.data import DataLoader

    deepspeed.init_distributed(dist_backend="gloo")
    group = dist.group.WORLD
    samples = [_sample(seed, 32, docs) for seed, docs in SAMPLES]
    # Each rank's loader yields its own sample; the adapter gathers one per rank, and micro batch j
    # (the same on every rank) is rank j's sample, sharded contiguously with shift_labels.
    loader = DataLoader([{k: v[0] for k, v in samples[rank].items()}], batch_size=1)
    adapter = UlyssesSPDataLoaderAdapter(loader, rank, group, world, torch.device("cpu"))
    plans = []
    for j, ((method, hq, hk), batch) in enumerate(zip(MODELS, adapter, strict=True)):
        mine = training.shard_batch(samples[j], group)
        assert sorted(mine) == sorted(batch), (sorted(mine), sorted(batch))
        for key in mine:
            assert torch.equal(mine[key], batch[key]), f"shard_batch's {key} differs from ALST's adapter"
        name = rt.register(group, layout="contiguous", method=method)
        model, ref = _tiny_llama(name, hq, hk), _tiny_llama("eager", hq, hk)
        ref.load_state_dict(model.state_dict())
        logits, term = _step(model, batch, group)
        docs = SAMPLES[j][1]
        _compare(
            f"{method} {hq}:{hk} docs {docs}", rank, world, model, ref, logits, term, group, samples[j], docs
        )
        plans.append(name)
    plans.append(_bad_inputs(rank, group))
    return plans


def _bad_inputs(rank, group):
    """Inputs that are bad on ONE rank raise on every rank of the 2 x 2 hybrid, before data moves."""
    fn = rt.make_attention(group, "contiguous", "hybrid")
    module = torch.nn.Module()
    module.is_causal = True

    def call(hq=6, S=4, mask=None):
        q, k = torch.randn(2, hq, S, 8), torch.randn(2, 2, S, 8)
        try:
            fn(module, q, k, k, mask)
        except ValueError as e:
            return str(e)
        return "no error"

    return [
        call(mask=torch.ones(2, 1, 4, 4) if rank == 1 else None),  # a padding mask on rank 1
        call(S=5 if rank == 3 else 4),  # rank 3's shard is longer
        call(hq=4 if rank == 2 else 6),  # 4 heads: rank 2 plans Ulysses, the others a 2 x 2 grid
    ]


def test_hybrid_and_ring_fed_by_alst_data_loader_beyond_kv_heads():
    """4 ranks, 2 KV heads: ringflash's hybrid (Ulysses 4 with KV heads repeated, and a 2 x 2 grid
    with 6 q heads), the ring, and a packed batch under the hybrid (the ring over the group), each on
    a micro batch of ALST's data loader adapter, against one process; bad inputs raise everywhere."""
    res = spawn(_adapter_worker, 4, timeout=300)
    for r, plans in enumerate(res):
        names, errors = plans[:-1], plans[-1]
        assert names == ["sp_hybrid_contiguous_g1", "sp_ring_contiguous_g2"] + ["sp_hybrid_contiguous_g1"] * 2
        assert "pack the batch instead" in errors[0], (r, errors)
        assert all("disagree" in e and "rank 3: [(2, 5" in e for e in errors[1:2]), (r, errors)
        assert "disagree" in errors[2] and "rank 2" in errors[2], (r, errors)


def test_hybrid_contiguous_is_plain_contiguous_sharding():
    """The hybrid's contiguous layout is ALST's sharding: grid rank (ring i, ulysses u) = rank i*U + u
    holds tokens [(i*U + u) * n, (i*U + u + 1) * n)."""
    n = 3
    for U, R in ((1, 4), (2, 2), (4, 1), (2, 3)):
        for i, u in itertools.product(range(R), range(U)):
            g = i * U + u
            got = usp_positions_for(u, i, U, R, n, "contiguous")
            assert torch.equal(got, torch.arange(g * n, (g + 1) * n)), (U, R, i, u, got)
    with pytest.raises(ValueError, match="contiguous"):
        rt.register(layout="zigzag", method="hybrid")


def test_shard_batch_without_a_group():
    """No process group: shard_batch shifts the labels (and makes position ids) and keeps every token."""
    sample = _sample(1, 6, [2, 4])
    out = training.shard_batch({k: v for k, v in sample.items() if k != "position_ids"})
    assert torch.equal(out["position_ids"], torch.arange(6)[None])
    assert out["shift_labels"].tolist() == [[*sample["labels"][0, 1:].tolist(), -100]]
    with pytest.raises(ValueError, match=r"shift_labels has shape \(1, 5\): expected \[B, 6"):
        training.shard_batch({"input_ids": sample["input_ids"], "labels": sample["labels"][:, :5]})
    with pytest.raises(ValueError, match=r"input_ids must be a tensor \[B, S\], got \(6,\)"):
        training.shard_batch({"input_ids": sample["input_ids"][0], "labels": sample["labels"]})
    with pytest.raises(ValueError, match=r"labels must be a tensor \[B, S\], got list"):
        training.shard_batch({"input_ids": sample["input_ids"], "labels": [1, 2]})


def test_tiled_mlp_and_tiled_loss_match_the_plain_model():
    """DeepSpeed's TiledMLP (patched into this model's MLPs only) and TiledFusedLogitsLoss through
    ``training``: the loss and every gradient equal the plain model's, one process."""
    model, ref = _tiny_llama("sdpa"), _tiny_llama("sdpa")
    batch = training.shard_batch(_sample(3, 40, [17, 23]))
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    want = training.sequence_parallel_loss(ref(**kw).logits, batch["shift_labels"])
    want.backward()
    assert training.tile_mlps(model, shards=3) == 2
    hidden = model.model(**kw)[0]
    got = training.tiled_causal_lm_loss(model.lm_head, hidden, batch["shift_labels"], shards=4)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-6, (got.item(), want.item())
    for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        err = (p.grad - pr.grad).abs().max().item()
        assert err < 1e-6, f"grad of {name} differs by {err:.3g}"
    out = ref.model.layers[0].mlp(hidden.detach())  # the reference's MLP class is untouched
    assert not hasattr(ref.model.layers[0].mlp, "_untiled_forward") and out.shape == hidden.shape
    with pytest.raises(ValueError, match="tiled already"):
        training.tile_mlps(model)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="shards must be a positive int"):
            training.tile_mlps(ref, shards=bad)
        with pytest.raises(ValueError, match="shards must be a positive int"):
            training.tiled_causal_lm_loss(model.lm_head, hidden, batch["shift_labels"], shards=bad)
    with pytest.raises(ValueError, match="lean already"):
        training.lean_rmsnorms(ref)
        training.lean_rmsnorms(ref)
