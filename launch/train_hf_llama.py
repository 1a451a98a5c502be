"""Train a Hugging Face Llama-architecture model (built from a config: no download) on sequences
sharded over the ranks, with ringflash's attention, and check the last step against one process.

Every rank holds ``S / W`` consecutive tokens of each row (ALST's sharding: ``shift_labels`` made on
the whole row, global ``position_ids``); the attention is

    --attn ring       ringflash's transformers backend, ring attention (any head count)
    --attn ulysses    ringflash's Ulysses (q heads divisible by W; KV heads repeated as needed)
    --attn hybrid     Ulysses over gcd(q heads, W) consecutive ranks x the ring across them
    --attn alst       DeepSpeed's Ulysses (ALST's UlyssesSPAttentionHF) with ringflash's local
                      kernels as its core attention, fed by ALST's UlyssesSPDataLoaderAdapter

with activation checkpointing (``--no-checkpointing`` to turn it off; ``--offload-activations`` keeps
each layer's checkpointed input in pinned host memory; ``--lean-norms``: RMSNorms that save only
their input), and either FSDP2
(``fully_shard`` per decoder layer and the root; ``--zero 0``, the default) or DeepSpeed ZeRO
(``--zero 1|2|3``, the config dict is built below; ``--offload`` keeps the optimizer state on the
CPU, with FSDP2 the parameters too). ``--tiled`` runs DeepSpeed's TiledMLP and TiledFusedLogitsLoss
(never a whole ``[S/W, intermediate]`` or ``[S/W, vocab]`` tensor); ``--packed`` packs documents of
random lengths into each row (position ids restart per document; each attends only to itself).

Before the last step rank 0 gathers the full weights into an unsharded copy and runs the same
batch through it in one process (SDPA, each packed document alone): the loss and the gradient norm
must agree (float32: 1e-4 / 1e-3 relative; bf16: 2e-2 / 5e-2). Prints PASS or FAIL; exits 1 on FAIL.

    torchrun --nproc_per_node 2 launch/train_hf_llama.py --attn ring             # CPU (gloo) or GPUs
    torchrun --nproc_per_node 2 launch/train_hf_llama.py --attn alst --zero 3 --tiled --packed
    deepspeed --num_gpus 8 launch/train_hf_llama.py --attn alst --zero 3 --offload \\
        --hidden 4096 --layers 32 --heads 32 --kv-heads 8 --intermediate 14336 --vocab 128256 \\
        --seq-len 131072 --steps 5 --no-check
    launch/train_hf_llama_cpu.sh 2 --attn alst --zero 3      # DeepSpeed on CPU: torchrun starts the ranks

Loss scaling: each rank's loss is its term of the mean over the whole row
(``ringflash.integrations.training``), multiplied by W because FSDP2 and DeepSpeed (given no mpu)
average the gradients over the ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import math
import sys
import time

import torch
import torch.distributed as dist
from torch.nn import functional

from ringflash.comm import init_distributed
from ringflash.comm.gather import all_gather_cat
from ringflash.demo.model import synthetic_sequence
from ringflash.integrations import training
from ringflash.integrations import transformers as rt
from ringflash.parallel.hybrid import usp_degrees


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", choices=("ring", "ulysses", "hybrid", "alst"), default="ring")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="0: FSDP2; 1-3: DeepSpeed ZeRO")
    p.add_argument("--offload", action="store_true", help="optimizer state on the CPU")
    p.add_argument("--tiled", action="store_true", help="DeepSpeed's TiledMLP and TiledFusedLogitsLoss")
    p.add_argument("--packed", action="store_true", help="documents of random lengths in each row")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    p.add_argument(
        "--lean-norms", action="store_true",
        help="RMSNorms that keep only their input for the backward (training.lean_rmsnorms)",
    )  # fmt: skip
    p.add_argument(
        "--offload-activations", action="store_true",
        help="keep each layer's checkpointed input in pinned host memory (training.decoder_hidden_states)",
    )  # fmt: skip
    p.add_argument("--no-check", action="store_true", help="skip the one-process check (large models)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (all ranks together)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bf16 on GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p.parse_args(argv)


def llama_config(args):
    """A fresh config (a model's config is its own: it records the attention implementation)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 2048),
        rope_theta=args.rope_theta,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )


def make_sample(i: int, args) -> dict:
    """Row ``i``: a learnable stream (``ringflash.demo``); packed: documents of random lengths, each
    restarting its positions, with no document predicting the next one's first token."""
    ids = synthetic_sequence(args.seq_len, args.vocab, seed=args.seed + i)
    labels = ids.clone()
    if not args.packed:
        return dict(input_ids=ids, position_ids=torch.arange(args.seq_len), labels=labels)
    g = torch.Generator().manual_seed(args.seed + 1000 + i)
    lens, left = [], args.seq_len
    while left:
        n = min(left, int(torch.randint(1, max(2, args.seq_len // 3), (1,), generator=g)))
        lens.append(n)
        left -= n
    starts = list(itertools.accumulate([0, *lens[:-1]]))
    labels[starts] = -100
    pos = torch.cat([torch.arange(n) for n in lens])
    return dict(input_ids=ids, position_ids=pos, labels=labels)


class CausalLMLoss(torch.nn.Module):
    """The model and its loss as one module (what FSDP2 and DeepSpeed wrap): ``forward(input_ids,
    position_ids, shift_labels)`` -> this rank's loss term (``ringflash.integrations.training``)."""

    def __init__(self, lm, group, tiled: bool, grad_average: bool, offload: bool = False):
        super().__init__()
        self.lm, self.group, self.tiled, self.grad_average = lm, group, tiled, grad_average
        self.offload = offload

    def forward(self, input_ids, position_ids, shift_labels):
        kw = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = training.decoder_hidden_states(self.lm, self.offload, **kw)
        if self.tiled:
            return training.tiled_causal_lm_loss(
                self.lm.lm_head, hidden, shift_labels, self.group, self.grad_average
            )
        logits = self.lm.lm_head(hidden)
        return training.sequence_parallel_loss(logits, shift_labels, self.group, self.grad_average)


def ds_config(args, dtype, device) -> dict:
    zero = {"stage": args.zero, "overlap_comm": False, "contiguous_gradients": args.zero > 1}
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,  # TiledFusedLogitsLoss needs the loss unscaled (see training.py)
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU runs; on GPUs DeepSpeed's fused (or, offloaded, CPU) Adam.
            "params": {
                "lr": args.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": 0.0,
                "torch_adam": device.type == "cpu",
            },
        },
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": device.type == "cuda",
        "bf16": {"enabled": dtype == torch.bfloat16},
        "gradient_clipping": 0.0,
        "wall_clock_breakdown": False,
    }


def full_state(module, args) -> dict | None:
    """The unsharded weights of the HF model on rank 0 (None elsewhere); collective."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.zero == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    elif args.zero == 0 and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = {n: t.float() for n, t in get_model_state_dict(module, options=opts).items()}
    else:
        state = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    return {n.removeprefix("lm."): t for n, t in state.items()} if rank == 0 else None


def one_process(ref, state: dict, batch: dict) -> tuple[float, float]:
    """(loss, gradient norm) of the full row through the unsharded copy: SDPA, each document alone."""
    ref.load_state_dict(state)
    ref.zero_grad()
    ids, pos, shift = batch["input_ids"], batch["position_ids"][0], batch["shift_labels"]
    starts = [0, *((pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1).tolist(), pos.numel()]
    logits = torch.cat(
        [ref(input_ids=ids[:, a:b], use_cache=False).logits for a, b in itertools.pairwise(starts)], 1
    )
    loss = functional.cross_entropy(logits[0].float(), shift[0])
    loss.backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def build_model(args, name: str, world: int, group, device, dtype):
    """The Llama with ringflash's attention ``name``; ``(model, group)``, the group ALST's for ``alst``."""
    from transformers import LlamaForCausalLM

    model_dtype = dtype if args.zero > 0 else torch.float32  # FSDP2 keeps float32 weights, computes in dtype
    build = contextlib.nullcontext()
    if args.zero == 3:  # every weight is partitioned as soon as its module is built: no rank holds the
        import deepspeed  # model (weights keep the modules' own init, not transformers' _init_weights)

        build = deepspeed.zero.Init(config_dict_or_path=ds_config(args, dtype, device))
    torch.manual_seed(args.seed)
    with build:
        lm = LlamaForCausalLM._from_config(llama_config(args), attn_implementation=name, dtype=model_dtype)
    if args.zero != 3:
        lm = lm.to(device)
    if args.attn == "alst":  # ALST takes over the name: its Ulysses wraps ringflash's local attention
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        mpu = UlyssesSPAttentionHF.register_with_transformers(
            lm, core_attn_implementation=name, sequence_parallel_size=world, micro_batch_size=1,
            seq_length_is_variable=True,
        )  # fmt: skip
        group = mpu.get_sequence_parallel_group()
    if not args.no_checkpointing:
        training.checkpoint_layers(lm)
    if args.tiled:
        training.tile_mlps(lm)
    if args.lean_norms:
        training.lean_rmsnorms(lm)
    return lm, group


def wrap(args, model: torch.nn.Module, world: int, device, dtype):
    """``(engine, optimizer)``: DeepSpeed's engine (its own optimizer), or FSDP2 and torch's AdamW."""
    if args.zero > 0:
        import deepspeed

        # No mpu: DeepSpeed then averages the gradients over all ranks at every ZeRO stage, as FSDP2
        # does (with ALST's mpu ZeRO-1/2 would sum them over the sequence-parallel ranks).
        cfg = ds_config(args, dtype, device)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine, None
    if world > 1:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
        if args.offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        for layer in model.lm.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return model, opt


def batches(args, rank: int, world: int, group, device):
    """This rank's shards of ``args.steps`` rows: ``input_ids``, ``position_ids``, ``shift_labels``."""
    samples = [make_sample(i, args) for i in range(args.steps)]
    if args.attn == "alst":  # ALST's own data path: each rank loads rows, the adapter shards them
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(samples, batch_size=1, sampler=sampler)
        it = UlyssesSPDataLoaderAdapter(loader, dist.get_rank(group), group, world, device)
    else:  # every rank loads the same rows and keeps its shard (ALST's sharding, no DeepSpeed)
        it = (training.shard_batch({k: v[None] for k, v in s.items()}, group) for s in samples)
    for batch in itertools.islice(it, args.steps):
        yield {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}


def train_step(args, engine, opt, batch: dict, group) -> tuple[float, float]:
    """One optimizer step; ``(loss over the whole row, gradient norm)``."""
    term = engine(batch["input_ids"], batch["position_ids"], batch["shift_labels"])
    if args.zero:
        engine.backward(term)
        engine.step()
        norm = float(engine.get_global_grad_norm())
    else:
        term.backward()
        norm = torch.nn.utils.clip_grad_norm_(engine.parameters(), float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        opt.step()
        opt.zero_grad()
    return training.loss_value(term, group, grad_average=True), norm


def describe(args, world: int, device, dtype) -> str:
    attn = args.attn
    if attn == "hybrid":
        attn += " (ulysses {} x ring {})".format(*usp_degrees(args.heads, world))
    shard = f"ZeRO-{args.zero}" if args.zero else "FSDP2" if world > 1 else "one process"
    extras = [
        x
        for x, on in (
            ("offload", args.offload),
            ("offloaded activations", args.offload_activations),
            ("lean norms", args.lean_norms),
            ("tiled", args.tiled),
            ("packed", args.packed),
        )
        if on
    ]
    return (
        f"{world} rank(s), {device.type}, {dtype}, attn {attn}, {' + '.join([shard, *extras])}, "
        f"{args.seq_len} tokens per row ({args.seq_len // world} per rank)"
    )


def train(args, info) -> bool:
    """Train ``args.steps`` steps on this rank; whether every rank finished them, finite and (with
    the check) equal to one process."""
    rank, world = info.rank, info.world_size
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if info.backend == "nccl" else "cpu")
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default
    if (args.zero > 0 or args.attn == "alst") and world == 1:
        print("train_hf_llama: DeepSpeed (--zero > 0, --attn alst) needs a launcher (torchrun, deepspeed)")
        raise SystemExit(2)
    if args.zero > 0 or args.attn == "alst":
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.backend)  # takes the group made above
    group = dist.group.WORLD if world > 1 else None
    ref = None  # the one-process copy (rank 0), SDPA attention, float32
    if rank == 0 and not args.no_check:
        from transformers import LlamaForCausalLM

        ref = LlamaForCausalLM._from_config(
            llama_config(args), attn_implementation="sdpa", dtype=torch.float32
        )
        ref = ref.to(device)
    if args.attn == "alst":  # plain local attention: ALST does the sequence parallelism
        name = rt.register(method="local")
    else:
        name = rt.register(group, layout="contiguous", method=args.attn)
    lm, group = build_model(args, name, world, group, device, dtype)
    # FSDP2 and DeepSpeed (given no mpu) average the gradients over the ranks: grad_average.
    # Checkpointing keeps one input per layer; offloading moves those to host memory, so the GPU
    # holds one layer's activations at a time whatever the depth (ALST's activation offload).
    offload = args.offload_activations and not args.no_checkpointing
    model = CausalLMLoss(lm, group, args.tiled, grad_average=True, offload=offload)
    engine, opt = wrap(args, model, world, device, dtype)
    if rank == 0:
        print(describe(args, world, device, dtype), flush=True)

    ok, check = True, None
    for step, batch in enumerate(batches(args, rank, world, group, device)):
        if step == args.steps - 1 and not args.no_check:  # the copy starts from this step's weights
            state = full_state(engine.module if args.zero else model, args)
            full = {k: all_gather_cat(v, world, group, 1) if world > 1 else v for k, v in batch.items()}
            if rank == 0:
                check = one_process(ref, {k: v.to(device) for k, v in state.items()}, full)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss, norm = train_step(args, engine, opt, batch, group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rank == 0:
            mem = (
                f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
            )
            rate = args.seq_len / dt / world
            print(f"step {step}: loss {loss:.5f}, grad norm {norm:.4f}, {rate:,.0f} tokens/s per rank{mem}")
        ok = ok and math.isfinite(loss)
    if check is not None:
        ref_loss, ref_norm = check
        tol_loss, tol_norm = (1e-4, 1e-3) if dtype == torch.float32 else (2e-2, 5e-2)
        dl, dn = abs(loss - ref_loss) / abs(ref_loss), abs(norm - ref_norm) / ref_norm
        ok = ok and dl <= tol_loss and dn <= tol_norm
        print(
            f"{'PASS' if ok else 'FAIL'}: last step loss {loss:.6f} vs one process {ref_loss:.6f} "
            f"(rel {dl:.1e}), grad norm {norm:.5f} vs {ref_norm:.5f} (rel {dn:.1e})",
            flush=True,
        )
    if world > 1:
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag)
        ok = flag.item() == 0
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    info = init_distributed()
    ok = train(args, info)
    if info.world_size > 1:
        # The models, optimizers and device meshes of ``train`` hold references to process groups;
        # freed before the groups are destroyed, no gloo worker thread outlives them into the
        # interpreter's teardown (where one can abort a run that succeeded).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
