"""transformers attention backend: a tiny Llama (built from a config, no download) with its sequence
sharded over 2 and 4 gloo ranks matches the unsharded model: logits shard by shard, the
cross-entropy loss (labels shifted globally, summed over ranks) and every parameter gradient."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from dist_utils import refreshed_untracked, spawn

transformers = pytest.importorskip("transformers")

from ringflash.integrations import transformers as rt  # noqa: E402


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).float()


def _worker(rank, world, layout, method):
    import torch.distributed as dist
    from torch.nn import functional

    from ringflash.backends import use_backend
    from ringflash.parallel import shard

    name = rt.register(dist.group.WORLD, layout=layout, method=method)
    assert "flash" not in name
    model, ref = _tiny_llama(name), _tiny_llama("eager")
    ref.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == name, model.config._attn_implementation
    S = 12 * world
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, S), generator=g)
    # Data side: labels shifted on the GLOBAL sequence (-100 at the end), then sharded like the ids.
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    pos = torch.arange(S)[None].expand(2, S)
    sh = lambda x: shard(x, dim=1, layout=layout)  # noqa: E731
    with use_backend("torch"):
        logits = model(input_ids=sh(ids), position_ids=sh(pos), use_cache=False).logits
        n_valid = (labels != -100).sum()
        loss = functional.cross_entropy(logits.flatten(0, 1), sh(labels).flatten(), reduction="sum") / n_valid
        loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    for p in model.parameters():
        dist.all_reduce(p.grad)
    ref_logits = ref(input_ids=ids, use_cache=False).logits
    ref_loss = functional.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())  # mean over valid
    ref_loss.backward()
    tag = f"rank {rank}/{world} {method} {layout}"
    err = (logits - sh(ref_logits)).abs().max().item()
    assert err < 1e-4, f"{tag}: logits differ by {err:.3g}"
    assert abs(total.item() - ref_loss.item()) < 1e-5, f"{tag}: loss {total.item()} vs {ref_loss.item()}"
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        gerr = (p.grad - pr.grad).abs().max().item()
        scale = pr.grad.abs().max().item() + 1e-6
        assert gerr <= 1e-4 * scale + 1e-6, f"{tag}: grad of {n} differs by {gerr:.3g} (scale {scale:.3g})"
    return name


@pytest.mark.parametrize(
    "world,layout,method", [(2, "contiguous", "ring"), (4, "zigzag", "ring"), (2, "contiguous", "ulysses")]
)
def test_llama_sharded_matches_full(world, layout, method):
    names = spawn(_worker, world, layout, method, timeout=240)
    assert names == [f"sp_{method}_{layout}_g1"] * world


DOCS = [0, 5, 14, 15, 28]  # documents of 5, 9, 1 and 13 tokens: 28 = 2 ranks x 14


def _packed_worker(rank, world, layout, method, marks):
    """Packed documents in one row, sharded per document; every document must match the model run
    on it alone (logits, the summed loss, every gradient)."""
    import torch.distributed as dist
    from torch.nn import functional

    from ringflash.backends import use_backend
    from ringflash.parallel import doc_positions, shard

    name = rt.register(dist.group.WORLD, layout=layout, method=method)
    model, ref = _tiny_llama(name), _tiny_llama("eager")
    ref.load_state_dict(model.state_dict())
    cu = torch.tensor(DOCS, dtype=torch.int32)
    T = DOCS[-1]
    ids = torch.randint(0, 61, (1, T), generator=torch.Generator().manual_seed(5))
    pos = torch.cat([torch.arange(b - a) for a, b in zip(DOCS[:-1], DOCS[1:], strict=True)])[None]
    labels = ids.roll(-1, 1)
    labels[0, cu[1:].long() - 1] = -100  # no document predicts the next one's first token
    sh = lambda x: shard(x, dim=1, layout=layout, cu_seqlens=cu)  # noqa: E731
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu) if marks == "cu" else {}
    with use_backend("torch"):
        logits = model(input_ids=sh(ids), position_ids=sh(pos), use_cache=False, **kw).logits
        n_valid = (labels != -100).sum()
        loss = functional.cross_entropy(logits[0], sh(labels)[0], reduction="sum") / n_valid
        loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)
    ref_logits = torch.cat(
        [
            ref(input_ids=ids[:, a:b], use_cache=False).logits
            for a, b in zip(DOCS[:-1], DOCS[1:], strict=True)
        ],
        1,
    )
    ref_loss = functional.cross_entropy(ref_logits[0], labels[0], reduction="sum") / n_valid
    ref_loss.backward()
    tag = f"rank {rank} {layout}/{method}/{marks}"
    mine = doc_positions(layout, tuple(DOCS), rank, world)
    err = (logits[0] - ref_logits[0, mine]).abs().max().item()
    assert err < 1e-4, f"{tag}: logits differ by {err:.3g}"
    assert abs(total.item() - ref_loss.item()) < 1e-5, f"{tag}: loss {total.item()} vs {ref_loss.item()}"
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        gerr = (p.grad - pr.grad).abs().max().item()
        assert gerr <= 1e-4 * (pr.grad.abs().max().item() + 1e-6) + 1e-6, (
            f"{tag}: grad of {n} differs by {gerr:.3g}"
        )


@pytest.mark.parametrize(
    "layout,method,marks",
    [
        ("zigzag", "ring", "cu"),
        ("zigzag", "allgather", "cu"),
        ("balanced", "ring", "cu"),
        ("contiguous", "ring", "position_ids"),
        ("stripe", "ring", "position_ids"),
        ("contiguous", "ulysses", "position_ids"),
    ],
)
def test_llama_packed_documents_match_each_document_alone(layout, method, marks):
    spawn(_packed_worker, 2, layout, method, marks, timeout=240)


def _reused_positions_worker(rank, world):
    """Two batches whose documents differ; rank 1 passes one position-id tensor refreshed in place
    where torch keeps no version (as a collective into a reused buffer writes), rank 0 new tensors:
    the second batch's logits must follow its own documents (no stale documents, no rank gathering
    alone)."""
    import torch.distributed as dist

    from ringflash.backends import use_backend
    from ringflash.parallel import doc_positions, shard

    model = _tiny_llama(rt.register(dist.group.WORLD, layout="contiguous"))
    ref = _tiny_llama("eager")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (1, 28), generator=torch.Generator().manual_seed(6))
    reused = None
    for docs in ([0, 5, 17, 28], [0, 11, 14, 28]):
        pos = torch.cat([torch.arange(b - a) for a, b in zip(docs[:-1], docs[1:], strict=True)])[None]
        mine = shard(pos, dim=1, layout="contiguous")
        if rank == 1:
            reused = mine = refreshed_untracked(reused, mine)
        with torch.no_grad(), use_backend("torch"):
            logits = model(
                input_ids=shard(ids, dim=1, layout="contiguous"), position_ids=mine, use_cache=False
            ).logits
            want = torch.cat(
                [
                    ref(input_ids=ids[:, a:b], use_cache=False).logits
                    for a, b in zip(docs[:-1], docs[1:], strict=True)
                ],
                1,
            )
        rows = doc_positions("contiguous", tuple(docs), rank, world)
        err = (logits[0] - want[0, rows]).abs().max().item()
        assert err < 1e-4, f"rank {rank}, documents {docs}: logits differ by {err:.3g}"


def test_global_documents_are_read_once_per_forward_onto_the_cpu():
    """``cu_seq_lens_q`` is read on the first layer (``refresh``) and copied to the CPU, where the
    parallel calls read it without a device sync; later layers get that copy for the same tensor,
    and a write torch tracks (a version bump) or the next forward's first layer reads it again."""
    from ringflash.integrations.packing import global_cu_seqlens

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    first = global_cu_seqlens(None, 0, 2, "zigzag", cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), refresh=True)
    assert first.device.type == "cpu" and first.tolist() == [0, 3, 8]
    cu.data[1] = 4  # a write torch keeps no version of: later layers keep the first layer's copy
    assert global_cu_seqlens(None, 0, 2, "zigzag", cu_seq_lens_q=cu) is first
    assert global_cu_seqlens(None, 0, 2, "zigzag", cu_seq_lens_q=cu, refresh=True).tolist() == [0, 4, 8]
    cu[1] = 5  # tracked
    assert global_cu_seqlens(None, 0, 2, "zigzag", cu_seq_lens_q=cu).tolist() == [0, 5, 8]
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        global_cu_seqlens(None, 0, 2, "zigzag", cu_seq_lens_q=cu, cu_seq_lens_k=cu.flip(0), refresh=True)


def test_position_ids_refreshed_in_place_on_one_rank_give_the_new_documents():
    spawn(_reused_positions_worker, 2, timeout=120, pg_timeout=30)


def _packed_without_cu(rank, world, layout):
    import torch.distributed as dist

    from ringflash.parallel import shard

    model = _tiny_llama(rt.register(dist.group.WORLD, layout=layout))
    cu = torch.tensor(DOCS, dtype=torch.int32)
    pos = torch.cat([torch.arange(b - a) for a, b in zip(DOCS[:-1], DOCS[1:], strict=True)])[None]
    sh = lambda x: shard(x, dim=1, layout=layout, cu_seqlens=cu)  # noqa: E731
    try:
        model(input_ids=sh(torch.zeros(1, 28, dtype=torch.long)), position_ids=sh(pos), use_cache=False)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("layout", ["zigzag", "balanced"])
def test_packed_zigzag_without_cu_seqlens_says_how(layout):
    for msg in spawn(_packed_without_cu, 2, layout, timeout=120):
        assert "need the global cu_seqlens: pass cu_seq_lens_q" in msg, msg


def test_local_backend_and_errors(monkeypatch):
    """No process group: the backend is local flash attention; bad names and versions raise clearly."""
    name = rt.register()
    assert name == "sp_ring_contiguous"
    model, ref = _tiny_llama(name), _tiny_llama("eager")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 61, (1, 19))
    err = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert err < 1e-4, f"local backend logits differ by {err:.3g}"
    # One process, packed documents marked by position ids: each document attends only to itself.
    pos = torch.cat([torch.arange(b - a) for a, b in zip(DOCS[:-1], DOCS[1:], strict=True)])[None]
    ids = torch.randint(0, 61, (1, DOCS[-1]))
    got = model(input_ids=ids, position_ids=pos).logits
    want = torch.cat([ref(input_ids=ids[:, a:b]).logits for a, b in zip(DOCS[:-1], DOCS[1:], strict=True)], 1)
    assert (got - want).abs().max().item() < 1e-4
    # A mask without padding is no mask. A padding mask reaches the attention (transformers would
    # drop it for a name without a mask builder): one process attends each row's tokens alone.
    ids = torch.randint(0, 61, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    full = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, full)
    mask[1, :5] = 0  # left padding
    got, want = (m(input_ids=ids, attention_mask=mask).logits for m in (model, ref))
    assert (got - want)[mask.bool()].abs().max().item() < 1e-4
    assert (got[1, 5:] - full[1, 5:]).abs().max().item() > 1e-2  # the padded tokens were not read
    fn = rt.make_attention()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="pack the batch instead"):  # a 4-D mask: a model's own pattern
        fn(torch.nn.Module(), q, q, q, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="2-D attention_mask must be"):
        fn(torch.nn.Module(), q, q, q, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="flash"):
        rt.register(name="ringflash_ring")
    with pytest.raises(ValueError, match="layout"):
        rt.register(layout="diagonal")
    with pytest.raises(ValueError, match="contiguous"):
        rt.register(layout="zigzag", method="ulysses")
    fake = types.ModuleType("transformers")
    fake.__version__ = "4.40.0"
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(ImportError, match="AttentionInterface"):
        rt.register()


def test_local_generate_with_padding_and_a_static_cache_matches_eager():
    """Greedy generation through the local backend equals transformers' eager attention: a left-padded
    batch, and a static cache, whose unfilled slots (keys past the mask) must not be read."""
    model, ref = _tiny_llama(rt.register()), _tiny_llama("eager")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    for cache in (None, "static"):
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
        for args in ((ids, mask), (ids[:1], None)):
            got, want = (m.generate(args[0], attention_mask=args[1], **kw) for m in (model, ref))
            assert torch.equal(got, want), (cache, got[:, 9:].tolist(), want[:, 9:].tolist())


def _tiny_gpt_oss(attn: str):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = GptOssForCausalLM._from_config(cfg, attn_implementation=attn).float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    return model


def _sinks_worker(rank, world, method):
    """gpt-oss's learnable sinks (``s_aux``) through the sequence-parallel backend: logits and the
    sinks' gradients equal the eager model's."""
    import torch.distributed as dist

    from ringflash.backends import use_backend
    from ringflash.parallel import shard

    group = dist.group.WORLD if world > 1 else None
    model, ref = _tiny_gpt_oss(rt.register(group, method=method)), _tiny_gpt_oss("eager")
    ref.load_state_dict(model.state_dict())
    S = 8 * world
    ids = torch.randint(0, 61, (1, S), generator=torch.Generator().manual_seed(4))
    sh = (lambda x: shard(x, dim=1, layout="contiguous")) if world > 1 else (lambda x: x)  # noqa: E731
    with use_backend("torch"):
        logits = model(input_ids=sh(ids), position_ids=sh(torch.arange(S)[None]), use_cache=False).logits
        logits.square().sum().backward()
    ref_logits = ref(input_ids=ids, use_cache=False).logits
    sh(ref_logits).square().sum().backward()  # this rank's share of the same loss
    err = (logits - sh(ref_logits)).abs().max().item()
    assert err < 1e-4, f"rank {rank} {method}: logits differ by {err:.3g}"
    for layer, ref_layer in zip(model.model.layers, ref.model.layers, strict=True):
        got, want = layer.self_attn.sinks.grad.clone(), ref_layer.self_attn.sinks.grad.clone()
        if world > 1:
            dist.all_reduce(got)
            dist.all_reduce(want)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item() + 1e-6, (got, want)
    return True


@pytest.mark.parametrize("world,method", [(1, "ring"), (2, "ring"), (2, "ulysses")])
def test_gpt_oss_sinks_match_eager(world, method):
    if world == 1:
        assert _sinks_worker(0, 1, method)
    else:
        assert spawn(_sinks_worker, world, method, timeout=240) == [True] * world
