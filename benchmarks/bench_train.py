# ruff: noqa: N803 (S: the sequence length, as in the docstrings)
"""Training a whole Llama on long sequences, per method: the longest sequence that trains and the
tokens per second per GPU, for every sequence-parallel attention in the same run.

    torchrun --nproc_per_node 8 benchmarks/bench_train.py --layers 4 --out train     # Llama-3-8B arch
    torchrun --nproc_per_node 8 benchmarks/bench_train.py --lengths 65536 262144 --offload
    torchrun --nproc_per_node 2 benchmarks/bench_train.py --tiny       # a smoke run (CPU/gloo too)

Methods (the same model, sharding and memory tricks; only the attention differs):

    ring              ringflash's transformers backend, ``method="ring"`` (contiguous shards)
    hybrid            ringflash, ``method="hybrid"``: Ulysses over gcd(Hq, W) ranks x the ring (Ulysses
                      when the heads divide by W)
    alst-sdpa         DeepSpeed's ALST (``UlyssesSPAttentionHF``) with PyTorch SDPA as its core
                      (needs Hq % W == 0 and Hk % W == 0 or W % Hk == 0); on one GPU, where ALST
                      registers nothing, its core alone with the same tiling and offloads
    alst-ringflash    ALST with ringflash's local kernels as its core (same limits)
    context-parallel  ``torch.distributed.tensor.experimental.context_parallel`` around the model's SDPA
                      (its load-balanced shards; CUDA SDPA kernels only)

The model is a ``LlamaForCausalLM`` built from a config (default: Llama-3-8B's architecture), bf16
compute with float32 master weights, float32 AdamW state and float32 gradient reduction, sharded by
FSDP2 (``fully_shard`` per decoder layer and the root) over the W GPUs (``--offload``: parameters,
gradients and optimizer state on the CPU), activation checkpointing per decoder layer, and
DeepSpeed's TiledMLP and TiledFusedLogitsLoss (``--no-tiled``: the plain MLP and full logits);
``--offload-activations`` keeps each layer's checkpointed input in pinned host memory
(``training.decoder_hidden_states(offload=True)``), so GPU memory no longer grows with the depth;
``--lean-norms`` makes the RMSNorms keep only their input (``training.lean_rmsnorms``). One
row of S tokens per step, sharded over the W ranks (``S / W`` tokens each); one step = forward,
backward and AdamW step.

Longest sequence: S doubles from ``--start`` until a step fails (out of memory, caught on every rank)
or takes over ``--max-step-s``, then bisection to ``--resolution``; the row says what limited it:
for an out-of-memory step, the allocation that failed and where, and the largest live block then.
Throughput: at each of ``--lengths``, the median of ``--steps`` timed steps after ``--warmup``;
tokens/s per GPU = S / step time / W, with the peak memory (the slowest / largest rank's).

``--layers N`` below the model's depth D runs N layers, then every throughput length again at N/2:
per-layer time and memory = their difference / (N - N/2), and the figures printed for D layers are
that extrapolation (marked ``~``). The longest length is then searched at N layers; for D layers it is
predicted from a linear fit of the peak in S at both depths (memory grows linearly in S here: no
method keeps an S x S tensor) against the GPU's memory less ``--reserve`` GiB.

CUDA runs with PyTorch's expandable segments unless ``PYTORCH_CUDA_ALLOC_CONF`` is set.
A probe where only some ranks run out of memory can leave the others in a collective: the process
group's timeout (``--timeout-s``) then ends the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from bench_timing import write_csv
from train_measure import _free, extrapolate, longest, throughput

METHODS = ("ring", "hybrid", "alst-sdpa", "alst-ringflash", "context-parallel")


@dataclass(frozen=True)
class Arch:
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 128256


TINY = Arch(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=256)


def not_applicable(method: str, arch: Arch, world: int, device) -> str | None:
    """Why ``method`` cannot run here, or None."""
    if method.startswith("alst") and importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed"
    if method.startswith("alst") and (
        arch.heads % world or not (arch.kv_heads % world == 0 or world % arch.kv_heads == 0)
    ):
        return f"ALST needs q heads ({arch.heads}) % W == 0 and KV heads ({arch.kv_heads}) % W or W % KV == 0"
    if method == "context-parallel" and device.type != "cuda":
        return "context_parallel shards only CUDA SDPA kernels"
    return None


def plan(method: str, arch: Arch, world: int) -> str:
    """How the attention is split over the W ranks."""
    if method == "hybrid":
        from ringflash.parallel.hybrid import usp_degrees

        u, r = usp_degrees(arch.heads, world)
        return f"ulysses {u} x ring {r}"
    if method.startswith("alst"):  # ALST registers nothing for one rank: its core attention runs alone
        return f"ulysses {world}" if world > 1 else "one GPU: its core alone"
    return f"ring {world}" if method == "ring" else f"ring {world} (load-balanced)"


class LossModel(torch.nn.Module):
    """The Llama and its loss (``ringflash.integrations.training``), as FSDP2 wraps it."""

    def __init__(self, lm, group, tiled: bool, offload: bool):
        super().__init__()
        self.lm, self.group, self.tiled, self.offload = lm, group, tiled, offload

    def forward(self, ids, pos, shift):
        from ringflash.integrations import training

        kw = dict(input_ids=ids, position_ids=pos, use_cache=False)
        h = training.decoder_hidden_states(self.lm, self.offload, **kw)
        if self.tiled:
            return training.tiled_causal_lm_loss(self.lm.lm_head, h, shift, self.group, grad_average=True)
        return training.sequence_parallel_loss(self.lm.lm_head(h), shift, self.group, grad_average=True)


class Trainer:
    """One method's model at one depth: ``step(S)`` runs one optimizer step on a row of S tokens."""

    def __init__(self, method: str, arch: Arch, depth: int, args, world: int, device, dtype):
        from transformers import LlamaConfig, LlamaForCausalLM

        from ringflash.integrations import training
        from ringflash.integrations import transformers as rt

        self.method, self.world, self.device, self.restore = method, world, device, None
        self.backend = args.backend if method in ("ring", "hybrid", "alst-ringflash") else None
        group = dist.group.WORLD
        if method in ("ring", "hybrid"):
            name = rt.register(group, layout="contiguous", method=method)
        elif method == "alst-ringflash":
            name = rt.register(method="local", name="sp_local_bench")
        else:
            name = "sdpa"
        cfg = LlamaConfig(
            vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
            num_hidden_layers=depth, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
            max_position_embeddings=1 << 22, rope_theta=500000.0, attention_dropout=0.0,
            tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        with torch.device(device):  # whole on each GPU for a moment; fully_shard keeps 1/W of it
            lm = LlamaForCausalLM._from_config(cfg, attn_implementation=name, dtype=torch.float32)
        if method.startswith("alst") and world > 1:
            self.restore = _register_alst(lm, name, world)
        training.checkpoint_layers(lm)
        if args.tiled:
            training.tile_mlps(lm)
        if args.lean_norms:
            training.lean_rmsnorms(lm)
        self.model = LossModel(lm, group, args.tiled, args.offload_activations)
        # FSDP2 at any W (at one rank it only sets the precision and the offload)
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
        if args.offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        for layer in lm.model.layers:
            fully_shard(layer, **kw)
        fully_shard(self.model, **kw)
        fused = device.type == "cuda" and not args.offload
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=fused or None)
        if method == "context-parallel":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (world,))

    def _batch(self, S: int):
        """``[input_ids, position_ids, shift_labels]``: this rank's shards (ALST's contiguous sharding),
        or for context_parallel the whole row, which it shards itself (load-balanced)."""
        from torch.nn import functional

        from ringflash.integrations import training

        g = torch.Generator().manual_seed(S)
        ids = torch.randint(0, self.model.lm.config.vocab_size, (1, S), generator=g)
        pos = torch.arange(S)[None]
        if self.method == "context-parallel":
            out = dict(
                input_ids=ids, position_ids=pos, shift_labels=functional.pad(ids, (0, 1), value=-100)[:, 1:]
            )
        else:
            out = training.shard_batch(dict(input_ids=ids, position_ids=pos, labels=ids), dist.group.WORLD)
        return [out[k].contiguous().to(self.device) for k in ("input_ids", "position_ids", "shift_labels")]

    def step(self, S: int) -> tuple[float, int]:
        """One step on S tokens: ``(seconds, peak bytes)``, the slowest / largest rank's."""
        batch = self._batch(S)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        t0 = time.perf_counter()
        ctx = contextlib.nullcontext()
        if self.method == "context-parallel":
            from torch.distributed.tensor.experimental import context_parallel

            ctx = context_parallel(self.mesh, buffers=batch, buffer_seq_dims=[1, 1, 1])
        local = contextlib.nullcontext()
        if self.backend:
            from ringflash import use_backend

            local = use_backend(self.backend)
        with ctx, local:
            self.model(*batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        t = torch.tensor(
            [time.perf_counter() - t0, torch.cuda.max_memory_allocated() if cuda else 0],
            dtype=torch.float64, device=self.device,
        )  # fmt: skip
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item(), int(t[1].item())

    def recover(self) -> None:
        """After a failed step: drop partial gradients and gathered weights."""
        self.opt.zero_grad(set_to_none=True)
        for m in self.model.modules():
            if hasattr(m, "reshard"):
                m.reshard()

    def close(self) -> None:
        if self.restore:
            self.restore()
        del self.model, self.opt
        _free(self.device)


def _register_alst(lm, core: str, world: int):
    """ALST's ``register_with_transformers`` with ``core`` as its core attention; returns an undo.
    ALST keeps one sequence-parallel group per process and replaces ``core`` in transformers'
    registry for every model of the process, so the benchmark releases both after the method."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    UlyssesSPAttentionHF.register_with_transformers(
        lm, core_attn_implementation=core, sequence_parallel_size=world, micro_batch_size=1,
        seq_length_is_variable=True,
    )  # fmt: skip

    def undo():
        del ALL_ATTENTION_FUNCTIONS[core]
        parallel_state_sp._release_sequence_parallel_groups()

    return undo


def run_method(method: str, arch: Arch, args, world: int, device, dtype, gran: int) -> dict:
    """Everything measured for one method (at ``args.layers`` and, when fewer than the model's, half)."""
    res = dict(method=method, plan=plan(method, arch, world))
    depth, half = args.layers, max(1, args.layers // 2)
    t = Trainer(method, arch, depth, args, world, device, dtype)
    try:
        res["tp"] = throughput(t, args.lengths, args)
        res["max"], res["limit"], res["peaks"] = longest(t, args, gran) if args.search else (0, "", {})
    except (RuntimeError, NotImplementedError, ValueError) as e:  # e.g. an unsupported SDPA call
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        t.close()
    if "error" in res or depth >= arch.layers or half == depth:
        return res
    t = Trainer(method, arch, half, args, world, device, dtype)
    try:
        res["tp_half"] = throughput(t, args.lengths, args)
    finally:
        t.close()
    return res


def parameter_count(arch: Arch) -> int:
    """The Llama's parameters: untied embedding and head, per layer four projections (grouped K/V),
    the gated MLP and two norms, and the final norm."""
    head_dim = arch.hidden // arch.heads
    attn = 2 * arch.hidden * arch.hidden + 2 * arch.hidden * arch.kv_heads * head_dim
    layer = attn + 3 * arch.hidden * arch.intermediate + 2 * arch.hidden
    return 2 * arch.vocab * arch.hidden + arch.layers * layer + arch.hidden


def host_bound(arch: Arch, args, dtype) -> tuple[int, int, int] | None:
    """``(fixed bytes, bytes per token of the row, the node's memory)`` that the offloads keep in
    host memory (all ranks of the node together; one node), or None without offloads: the float32
    weights, gradients and AdamW state with ``--offload``, each layer's checkpointed input with
    ``--offload-activations``."""
    if not (args.offload or args.offload_activations):
        return None
    fixed = 16 * parameter_count(arch) if args.offload else 0
    per_token = arch.layers * arch.hidden * torch.finfo(dtype).bits // 8 if args.offload_activations else 0
    return fixed, per_token, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def report(results: list[dict], arch: Arch, args, world: int, device, dtype, devname: str) -> list[dict]:
    import transformers

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "not installed"
    depth = f"{arch.layers} layers" + (
        f" (ran {args.layers}; '~' = extrapolated from {args.layers} and {max(1, args.layers // 2)} layers)"
        if args.layers < arch.layers
        else ""
    )
    tricks = "tiled MLP + tiled logits loss" if args.tiled else "plain MLP + full logits"
    print(
        f"# bench_train | {world} x {devname} | torch {torch.__version__} | transformers "
        f"{transformers.__version__} | deepspeed {ds} | {datetime.date.today()}\n"
        f"# Llama: hidden {arch.hidden}, {depth}, {arch.heads} q / {arch.kv_heads} KV heads, intermediate "
        f"{arch.intermediate}, vocab {arch.vocab}\n"
        f"# {dtype} compute, float32 master weights + AdamW + gradient reduction, FSDP2 over {world} "
        f"rank(s), optimizer offload {'on (CPUOffloadPolicy)' if args.offload else 'off'}, activation "
        f"checkpointing{' (inputs offloaded to host memory)' if args.offload_activations else ''}, "
        f"{tricks}{', lean RMSNorms' if args.lean_norms else ''}; one row of S tokens; "
        f"ringflash's local backend: {args.backend or 'default'}"
    )
    host = host_bound(arch, args, dtype)
    if host is not None:  # what the offloads keep in the node's memory
        fixed, per_token, total = host
        longest = int((0.9 * total - fixed) // per_token) if per_token else None
        print(
            f"# host memory of the node, {total / 2**30:.0f} GiB: optimizer offload {fixed / 2**30:.1f} "
            f"GiB (16 bytes a parameter), offloaded checkpoints {per_token * 1024 / 2**30:.3f} GiB per "
            f"1k tokens at {arch.layers} layers; longest row in 90% of it: "
            + (f"{max(0, longest):,}" if longest is not None else "no limit from the length")
        )
    rows = []

    def row(r, kind, S=None, tps=None, peak=None, extrapolated=False, note=""):
        gib = peak / 2**30 if peak else None
        rows.append(dict(method=r["method"], plan=r.get("plan", ""), kind=kind, S=S, tokens_per_s_per_gpu=tps,
                         peak_gib=gib, extrapolated=extrapolated, note=note))  # fmt: skip

    for r in results:
        name = f"{r['method']} [{r['plan']}]" if "plan" in r else r["method"]
        if "skip" in r or "error" in r:
            print(f"{name:40s} n/a: {r.get('skip') or r['error']}")
            row(r, "n/a", note=r.get("skip") or r["error"])
            continue
        if args.search:
            pred, pk = r.get("predicted_max"), r["peaks"].get(r["max"], 0)
            pred_s = f"; predicted at {arch.layers} layers: {pred:,}" if pred else ""
            pk_s = f", peak {pk / 2**30:.2f} GiB" if pk else ""
            print(f"{name:40s} longest S that trains: {r['max']:,}{pk_s} (stopped by {r['limit']}){pred_s}")
            row(r, f"longest at {args.layers} layers", r["max"], peak=pk, note=r["limit"])
            if pred:
                row(r, f"longest at {arch.layers} layers", pred, extrapolated=True, note="predicted")
        for S, v in r["full"].items():
            if isinstance(v, str):
                print(f"{name:40s} S={S:>9,}  {v}")
                row(r, "throughput", S, note=v)
                continue
            secs, peak, ex = v
            tps, mark = S / secs / world, "~" if ex else " "
            mem = f"{peak / 2**30:7.2f} GiB" if peak else "      -"
            rate = f"{mark}{tps:>10,.0f} tokens/s/GPU  {mark}{mem}  {mark}{secs:8.3f} s/step"
            print(f"{name:40s} S={S:>9,}  {rate}")
            row(r, "throughput", S, tps, peak, ex, note=r.get("measured", {}).get(S, ""))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    for f in Arch.__dataclass_fields__:  # the model's architecture (default: Llama-3-8B's)
        flag = "--num-layers" if f == "layers" else f"--{f.replace('_', '-')}"
        p.add_argument(flag, dest=f"arch_{f}", type=int, default=None, help=f"default {getattr(Arch(), f)}")
    p.add_argument(
        "--layers", type=int, default=None, help="layers to run (default: all; fewer: extrapolate)"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="S for tokens/s")
    p.add_argument("--no-search", dest="search", action="store_false", help="skip the longest-length search")
    p.add_argument("--start", type=int, default=65536, help="first S of the search")
    p.add_argument("--search-max", type=int, default=1 << 24)
    p.add_argument("--resolution", type=float, default=0.05, help="bisection stops within this fraction")
    p.add_argument("--max-step-s", type=float, default=600.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--offload", action="store_true", help="FSDP2 CPU offload (params, grads, optimizer)")
    p.add_argument(
        "--offload-activations", action="store_true",
        help="keep each layer's checkpointed input in pinned host memory (training.decoder_hidden_states)",
    )  # fmt: skip
    p.add_argument(
        "--lean-norms", action="store_true",
        help="RMSNorms that keep only their input for the backward (training.lean_rmsnorms)",
    )  # fmt: skip
    p.add_argument(
        "--backend",
        default=None,
        help="ringflash's local kernels for its methods (use_backend; default triton)",
    )
    p.add_argument("--no-tiled", dest="tiled", action="store_false")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB kept free in the full-depth prediction")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--out", default=None, help="folder for train_W{W}.csv")
    p.add_argument("--tiny", action="store_true", help="tiny model, a few tokens, one step per method")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Steps of hundreds of thousands of tokens allocate and free GiB-sized blocks of changing sizes;
    # without expandable segments the cache fragments and a step that fits fails.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    from ringflash.comm import init_distributed

    info = init_distributed(timeout=datetime.timedelta(seconds=args.timeout_s))
    if not dist.is_initialized():
        print("bench_train: run under torchrun (one rank per GPU; one rank: no sequence parallelism)")
        return 2
    if args.tiled and importlib.util.find_spec("deepspeed") is None:
        print("bench_train: the tiled MLP and loss are DeepSpeed's: install deepspeed or pass --no-tiled")
        return 2
    rank, world = info.rank, info.world_size
    cuda = info.backend == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    devname = torch.cuda.get_device_name() if cuda else "cpu"
    base = TINY if args.tiny else Arch()
    arch = Arch(**{f: getattr(args, f"arch_{f}") or getattr(base, f) for f in Arch.__dataclass_fields__})
    gran = 2 * world * (1 if args.tiny else 128)  # context_parallel's load balancing cuts 2W chunks
    if args.tiny:
        args.layers = args.layers or 2
        args.lengths, args.start, args.search_max = [16 * world], 16 * world, 32 * world
        args.steps, args.warmup = 1, 0
    args.layers = min(args.layers or arch.layers, arch.layers)
    args.lengths = [max(gran, S // gran * gran) for S in args.lengths]
    args.start = max(gran, args.start // gran * gran)
    if any(m.startswith("alst") for m in args.methods):
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.backend)
    capacity = 0
    if cuda:
        capacity = torch.cuda.get_device_properties(device).total_memory - int(args.reserve * 2**30)
    results = []
    for method in args.methods:
        why = not_applicable(method, arch, world, device)
        if why:
            results.append(dict(method=method, skip=why))
            continue
        r = run_method(method, arch, args, world, device, dtype, gran)
        results.append(extrapolate(r, arch, args, capacity) if "error" not in r else r)
    if rank == 0:
        rows = report(results, arch, args, world, device, dtype, devname)
        if args.out:
            write_csv(os.path.join(args.out, f"train_W{world}.csv"), rows)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
