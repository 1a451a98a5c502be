"""The ``ringflash`` command.

- ``ringflash demo``: train and generate with a sequence sharded over whatever hardware is there,
  checked against one process (see ``ringflash.demo.run``).
- ``ringflash bench [attention|decode|ring|cpu]``: runs the benchmark scripts of a source
  checkout, printing their tables and writing CSV and PNG files into a folder it names.
- ``ringflash env``: versions, devices, distributed backends and the backend each device uses.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> list[tuple[str, str]]:
    """Versions, devices, attention backends and distributed backends, as (name, value) rows."""
    import torch
    import torch.distributed as dist

    from .backends import backend_name, triton_available

    rows = [
        ("ringflash", _version("ringflash")),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("deepspeed", _version("deepspeed")),
        ("transformers", _version("transformers")),
        ("mpi4py", _version("mpi4py")),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
    else:
        rows.append(("cuda", "not available"))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    dists = [
        n
        for n, ok in (
            ("nccl", dist.is_nccl_available()),
            ("gloo", dist.is_gloo_available()),
            ("mpi", dist.is_mpi_available()),
        )
        if ok
    ]
    rows.append(("torch.distributed", ", ".join(dists) if dist.is_available() else "not available"))
    rows.append(("triton importable", "yes" if triton_available() else "no"))
    from .comm.copy_engine import copy_engine_available

    ce = "available (CUDA and PyTorch symmetric memory)" if copy_engine_available() else "not available"
    rows.append(('use_ring_transport("copy_engine")', ce))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        be = backend_name(torch.device(dev))
        local = "Triton kernels" if be == "triton" else "blockwise PyTorch"
        decode = "Triton split-KV" if be == "triton" else "blockwise PyTorch"
        comm = "nccl" if dev == "cuda" else "gloo"
        rows.append((f"backend on {dev}", be))
        rows.append((f"  flash_attn_* ({dev})", local))
        rows.append((f"  flash_attn_with_kvcache ({dev})", decode))
        rows.append((f"  ring / ulysses / sharded ({dev})", f"{local} + {comm}"))
    return rows


def _cmd_env(args: argparse.Namespace) -> int:
    rows = env_report()
    width = max(len(n) for n, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .comm.init import init_distributed, launcher
    from .demo.run import DemoError, plan, run, table, verdicts

    rank = 0
    if launcher() != "none":  # torchrun / deepspeed / mpirun: this process is one of the ranks
        info = init_distributed()
        rank, args.world_size = info.rank, info.world_size
        if args.device == "auto":
            args.device = "cuda" if info.backend == "nccl" else "cpu"
    try:
        cfg = plan(
            args.world_size,
            args.seq_len,
            args.layout,
            args.device,
            args.steps,
            gen_tokens=args.gen_tokens,
            reference_scale_error=args.break_reference,
            quiet=rank != 0,
        )
    except DemoError as e:
        if rank == 0:
            print(f"ringflash demo: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        where = f"{cfg.world_size} {'GPU' if cfg.device == 'cuda' else 'CPU process'}(es)"
        print(
            f"ringflash demo: {where}, {cfg.seq_len} tokens, layout {cfg.layout}, {cfg.steps} steps",
            flush=True,
        )
    results = run(cfg)
    if rank == 0:
        print(table(cfg, results))
    if launcher() != "none" and cfg.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0 if all(verdicts(results).values()) else 1


BENCHES = ("attention", "decode", "ring", "cpu")
_GPU_ONLY = ("attention", "decode")  # they compare with SDPA's flash and cuDNN backends: CUDA only


def bench_commands(names, out: Path, tiny: bool, scripts: Path) -> list[list[str]]:
    """The command line of each benchmark script, writing into ``out``."""
    extra = {
        "attention": ["--quick"] if tiny else [],
        "decode": ["--quick"] if tiny else [],
        "ring": ["--no-write"] + (["--tiny"] if tiny else []),
        "cpu": ["--seqlen", "512", "--memory-seqlens", "512", "1024", "--repeats", "2"] if tiny else [],
    }
    return [[sys.executable, str(scripts / f"bench_{n}.py"), "--out", str(out), *extra[n]] for n in names]


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    scripts = Path(__file__).resolve().parent.parent / "benchmarks"
    if not scripts.is_dir():
        print(
            "ringflash bench: the benchmark scripts come with a source checkout (benchmarks/ next to "
            "the ringflash package); install with `pip install -e .` from one",
            file=sys.stderr,
        )
        return 2
    unknown = [n for n in args.which if n not in BENCHES]
    if unknown:
        print(
            f"ringflash bench: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}",
            file=sys.stderr,
        )
        return 2
    cuda = torch.cuda.is_available()
    names = args.which or (["attention", "decode", "ring"] if cuda else ["cpu", "ring"])
    if not cuda and any(n in _GPU_ONLY for n in names):
        bad = ", ".join(n for n in names if n in _GPU_ONLY)
        print(
            f"ringflash bench: {bad} needs a CUDA GPU (it compares with SDPA's flash and cuDNN backends); "
            "on CPU run `ringflash bench cpu ring`",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out or f"ringflash-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(scripts.parent), os.environ.get("PYTHONPATH", "")])
    )
    for name, cmd in zip(names, bench_commands(names, out, args.tiny, scripts), strict=True):
        print(f"== ringflash bench {name}", flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            print(f"ringflash bench: {name} failed (exit {rc})", file=sys.stderr)
            return rc
    print(f"results written to {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``ringflash`` command line: ``demo``, ``bench`` and ``env`` subcommands."""
    parser = argparse.ArgumentParser(prog="ringflash", description="Exact attention for long sequences.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser(
        "demo", help="train and generate with a sharded sequence, checked against one process"
    )
    p_demo.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs, or 4 on CPU)")
    p_demo.add_argument("--seq-len", type=int, default=1024, help="global sequence length")
    p_demo.add_argument("--layout", default="zigzag", help="contiguous, zigzag or stripe")
    p_demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p_demo.add_argument("--steps", type=int, default=3, help="training steps")
    p_demo.add_argument("--gen-tokens", type=int, default=8, help="tokens to generate")
    # A deliberately wrong reference (softmax scale times this factor) shows that the checks can fail.
    p_demo.add_argument("--break-reference", type=float, default=1.0, help=argparse.SUPPRESS)
    p_demo.set_defaults(func=_cmd_demo)
    p_bench = sub.add_parser("bench", help="run the benchmarks; tables to stdout, CSV and PNG to a folder")
    p_bench.add_argument(
        "which",
        nargs="*",
        metavar="{attention,decode,ring,cpu}",
        help="default: attention decode ring on a GPU, cpu ring on CPU",
    )
    p_bench.add_argument("--out", default=None, help="folder for the results (default: a new dated folder)")
    p_bench.add_argument("--tiny", action="store_true", help="a short sweep (smoke test)")
    p_bench.set_defaults(func=_cmd_bench)
    p_env = sub.add_parser("env", help="versions, devices and the backend each function uses")
    p_env.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ringflash`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
