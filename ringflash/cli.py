"""The ``ringflash`` command.

- ``ringflash demo``: train and generate with a sequence sharded over whatever hardware is there,
  checked against one process (see ``ringflash.demo.run``).
- ``ringflash bench [NAME ...] [--out DIR] [--tiny]``: runs the benchmark suite of a source
  checkout (``benchmarks/bench_NAME.py``, see ``BENCHES``), printing their tables and writing
  their CSV and PNG files into one folder.
- ``ringflash env``: versions, devices, distributed backends and the backend each device uses.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
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


@dataclasses.dataclass(frozen=True)
class Bench:
    """One script of the suite: ``benchmarks/bench_{name}.py``.

    Attributes:
        what: what it measures (``ringflash bench --list``).
        cuda: needs a CUDA GPU (it compares with SDPA's CUDA backends).
        gpus: launched under torchrun with one process per GPU, on at least this many GPUs
            (0: one process). Without CUDA such a script runs only ``--tiny``, on 2 gloo processes.
    """

    what: str
    cuda: bool = False
    gpus: int = 0


BENCHES = {
    "attention": Bench("forward/backward TFLOP/s vs SDPA FA2 and cuDNN; AttnConfig variants", cuda=True),
    "decode": Bench("decoding: graph, eager and host time per call vs SDPA cuDNN and FA2", cuda=True),
    "ring": Bench("ring attention simulated on one device: efficiency per layout and world size"),
    "packed": Bench("packed documents on simulated ranks: ring and all-gather vs one varlen call"),
    "cpu": Bench("the blockwise backend vs SDPA on CPU: time and peak memory"),
    "ring_nccl": Bench("ring attention across GPUs (NCCL) vs one GPU's kernel", gpus=2),
    "decode_sharded_nccl": Bench("decoding with the KV cache sharded over GPUs vs one GPU", gpus=2),
    "max_seqlen": Bench("the longest trainable sequence of one layer per GPU count vs SDPA", gpus=1),
    "train": Bench("a whole Llama per method: longest sequence, tokens/s vs ALST, context_parallel", gpus=1),
}


def default_benches(cuda: bool) -> list[str]:
    """What ``ringflash bench`` runs with no names: the one-process benchmarks of this machine."""
    return ["attention", "decode", "ring", "packed"] if cuda else ["cpu", "ring", "packed"]


def bench_command(name: str, out: Path, tiny: bool, scripts: Path, nproc: int) -> list[str]:
    """The command line of benchmark ``name`` writing into ``out`` (torchrun with ``nproc``
    processes for the multi-process ones)."""
    cmd = [str(scripts / f"bench_{name}.py"), "--out", str(out)] + (["--tiny"] if tiny else [])
    if BENCHES[name].gpus:
        run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        return [sys.executable, *run, *cmd]
    return [sys.executable, *cmd]


def bench_refusal(name: str, tiny: bool, cuda_gpus: int, nproc: int | None) -> str | None:
    """Why benchmark ``name`` cannot run here (None: it can), for ``cuda_gpus`` visible GPUs."""
    b = BENCHES[name]
    if b.cuda and not cuda_gpus:
        return f"{name} needs a CUDA GPU (it compares with SDPA's FlashAttention-2 and cuDNN backends)"
    if b.gpus and cuda_gpus and (nproc or cuda_gpus) < b.gpus:
        return f"{name} needs {b.gpus} GPUs (one process each under torchrun); {cuda_gpus} visible"
    if b.gpus and cuda_gpus and nproc and nproc > cuda_gpus:
        return f"{name}: --nproc {nproc} but only {cuda_gpus} GPU(s) visible"
    if b.gpus and not cuda_gpus and not tiny:
        return f"{name} needs CUDA GPUs (without them, --tiny runs its smoke form on 2 gloo processes)"
    return None


_ERROR_LINE = re.compile(r"^\s*([\w.]*(Error|Exception|Exit|Interrupt)\b.*)$")


def child_error(lines) -> str:
    """The error a failed child reported: its last exception line (not torchrun's own wrapper), or
    its last line of stderr."""
    lines = [ln.rstrip() for ln in lines if ln.strip()]
    for ln in reversed(lines):
        m = _ERROR_LINE.match(ln)
        if m and "ChildFailedError" not in ln and not ln.lstrip().startswith("raise "):
            return m.group(1)
    return lines[-1].strip() if lines else "no output on stderr"


def run_child(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd`` with its stdout and stderr passed through as they come; ``(exit code, the
    child's error line)`` (empty when it succeeded)."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line)
    rc = proc.wait()
    return rc, child_error(tail) if rc else ""


def run_benches(names, out: Path, tiny: bool, scripts: Path, nproc: int) -> int:
    """Run each benchmark in turn into ``out``; a failure is reported with the child's own error
    and the rest still run. Returns 0 if all succeeded, else 1."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(scripts.parent), os.environ.get("PYTHONPATH")) if p)
    failed = []
    for name in names:
        print(f"== ringflash bench {name}", flush=True)
        rc, err = run_child(bench_command(name, out, tiny, scripts, nproc), env)
        if rc:
            failed.append(name)
            print(f"ringflash bench: {name} failed (exit {rc}): {err}", file=sys.stderr, flush=True)
    written = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    print(f"results written to {out}/: " + (", ".join(written) or "nothing"))
    if failed:
        print(f"ringflash bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if args.list:
        width = max(map(len, BENCHES))
        for name, b in BENCHES.items():
            needs = (
                "CUDA GPU" if b.cuda else f"torchrun, {b.gpus}+ GPU(s) or --tiny on CPU" if b.gpus else "any"
            )
            print(f"{name:<{width}}  {b.what} [{needs}]")
        return 0
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
    if args.nproc is not None and args.nproc < 1:
        print(f"ringflash bench: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = args.which or default_benches(gpus > 0)
    refusals = [r for r in (bench_refusal(n, args.tiny, gpus, args.nproc) for n in names) if r]
    if refusals:
        for r in refusals:
            print(f"ringflash bench: {r}", file=sys.stderr)
        if not gpus:
            print(f"on CPU run `ringflash bench {' '.join(default_benches(False))}`", file=sys.stderr)
        return 2
    out = Path(args.out or f"ringflash-bench-{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"ringflash bench: cannot write the results to {out}: {e.strerror}", file=sys.stderr)
        return 2
    return run_benches(names, out, args.tiny, scripts, args.nproc or gpus or 2)


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
        metavar="NAME",
        help=f"of {', '.join(BENCHES)} (default: {' '.join(default_benches(True))} on a GPU, "
        f"{' '.join(default_benches(False))} on CPU)",
    )
    p_bench.add_argument("--out", default=None, help="folder for the results (default: a new dated folder)")
    p_bench.add_argument("--tiny", action="store_true", help="each benchmark's smallest run (a smoke test)")
    p_bench.add_argument(
        "--nproc", type=int, default=None, help="processes of torchrun benchmarks (default: GPUs)"
    )
    p_bench.add_argument("--list", action="store_true", help="list the benchmarks and what they need")
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
