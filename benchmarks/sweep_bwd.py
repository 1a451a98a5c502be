"""Config sweep of the backward kernels (dK/dV and dQ), each kernel timed alone.

Rows are bench_attention's: bf16, batch * seqlen = 16k tokens, 2048 / headdim heads, ``[B, S, H, D]``,
seqlen 1k/4k/16k, causal and not. Per row, in one run on one GPU:

- ``base``: FA2's and cuDNN's whole backward (torch SDPA), our whole backward as shipped (autotuned)
  eagerly and as a CUDA-graph replay (the difference is host time), the host time of one eager call,
  the delta kernel alone, and the configs the autotuner chose;
- ``sweep``: every tile config of the dK/dV kernel and of the dQ kernel alone: BLOCK_M x BLOCK_N in
  {32, 64, 128}^2, 4/8 warps, 2-5 stages, with registers, spills and shared memory from the compiler
  and each config's gradients checked against FA2's (relative L2 error);
- ``combo``: the best three configs per kernel re-timed longer, then delta + best dK/dV + best dQ as
  one backward, back to back and with dQ on a second stream.

All times are ``triton.testing.do_bench`` medians (L2 flushed between calls). FLOPs as in
bench_attention: bwd = 2.5 * 4 * b * h * s * s * d, halved for causal; ratios are FA2 time / ours.

Configs are first compiled in parallel processes (Triton's disk cache; a config that does not fit is
recorded, not timed). Timing runs one process per (kernel, causal), so a config that faults the
context (one raised "misaligned address" before) ends only its process: the parent records it and
restarts the rest. A deadline keeps the whole run inside ``--budget`` seconds; what was measured is
written as it comes.

Usage: ``PYTHONPATH=. python benchmarks/sweep_bwd.py --out DIR [--dims 128] [--base-dims 64,128]``.
Writes ``DIR/sweep_bwd.jsonl`` (every measurement) and ``DIR/sweep_bwd_table.txt`` (the summary).
``--smoke`` runs the same flow on CPU under ``TRITON_INTERPRET=1`` at toy sizes (a test of the
script, no timing meaning). ``--aot`` needs no GPU: it compiles every config for sm_90 with the
installed Triton and writes registers, stack (spill) bytes and shared memory per config to
``DIR/sweep_bwd_aot.txt`` (use the GPU machines' Triton version for numbers that match them).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time

TAG = "@@ "


def _configs(smoke):
    if smoke:
        return [(16, 32, 4, 2), (32, 16, 4, 2)]
    blocks, warps, stages = (32, 64, 128), (4, 8), (2, 3, 4, 5)
    return [(m, n, w, s) for m, n in itertools.product(blocks, blocks) for w in warps for s in stages]


def _emit(**rec):
    print(TAG + json.dumps(rec), flush=True)


# ----------------------------------------------------------------------------------------------
# Worker side (imports torch/triton; one process per task)


def _setup(smoke):
    import torch

    from ringflash.kernels import bwd

    dev = "cpu" if smoke else "cuda"
    shape = dict(tokens=128, hidden=256) if smoke else dict(tokens=16384, hidden=2048)
    return torch, bwd, dev, shape


class _Capture:
    """Stands in for a kernel launcher: records the arguments instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.calls.append((a, kw))


def _capture(bwd, dout, q, k, v, out, lse, causal, fake_delta=False):
    """The dK/dV and dQ launch arguments ``attn_bwd`` builds (delta computed for real, unless
    ``fake_delta``: ``--aot`` builds GPU arguments from CPU tensors and launches nothing)."""
    names = ("_dkdv_tuned", "_dq_tuned", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    names += ("attn_bwd_delta",) if fake_delta else ()
    saved = {n: getattr(bwd, n) for n in names}
    c_kv, c_q = _Capture(), _Capture()
    for n in names[:4]:
        setattr(bwd, n, c_kv if "dkdv" in n else c_q)
    if fake_delta:
        bwd.attn_bwd_delta = lambda dout, out, packed=False: lse.new_empty(lse.shape)
    try:
        bwd.attn_bwd(dout, q, k, v, out, lse, softmax_scale=q.shape[-1] ** -0.5, causal=causal)
    finally:
        for n, f in saved.items():
            setattr(bwd, n, f)
    strip = ("BLOCK_M", "BLOCK_N")
    caps = {
        name: (c.calls[0][0], {k: x for k, x in c.calls[0][1].items() if k not in strip})
        for name, c in (("dkdv", c_kv), ("dq", c_q))
    }
    if fake_delta:  # the interpreter's float32 dot operands are no part of the GPU kernel
        for _, kw in caps.values():
            kw["DOT_F32"] = False
    return caps


def _kernel(name):
    from ringflash.kernels.bwd_dkdv import _attn_bwd_dkdv_kernel
    from ringflash.kernels.bwd_dq import _attn_bwd_dq_kernel

    return _attn_bwd_dkdv_kernel if name == "dkdv" else _attn_bwd_dq_kernel


def _launcher(name, cap, cfg, b, s, h):
    import triton

    m, n, w, st = cfg
    args, kw = cap[name]
    grid = (triton.cdiv(s, n if name == "dkdv" else m), b * h)
    fn = _kernel(name)

    def launch():
        fn[grid](*args, **kw, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)

    return launch


class _Row:
    """Inputs of one bench row, FA2's out/LSE (for our backward) and FA2's gradients (the check)."""

    def __init__(self, torch, bwd, dev, shape, d, causal, s):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch.manual_seed(0)
        self.b, self.h, self.s, self.d, self.causal = shape["tokens"] // s, shape["hidden"] // d, s, d, causal
        self.q, self.k, self.v, self.dout = (
            torch.randn(self.b, s, self.h, d, device=dev, dtype=torch.bfloat16) for _ in range(4)
        )
        scale = d**-0.5
        if dev == "cuda":
            fa2 = torch.ops.aten._scaled_dot_product_flash_attention(
                *(x.transpose(1, 2) for x in (self.q, self.k, self.v)), 0.0, causal, scale=scale
            )
            self.out, self.lse = fa2[0].transpose(1, 2).contiguous(), fa2[1].contiguous()
        else:
            from ringflash import kernels

            self.out, self.lse = kernels.attn_fwd(self.q, self.k, self.v, softmax_scale=scale, causal=causal)
        self.ref = self.sdpa_bwd(torch, SDPBackend.FLASH_ATTENTION if dev == "cuda" else None, sdpa_kernel)()
        self.flops = 2.5 * 4 * self.b * self.h * s * s * d / (2 if causal else 1)  # bwd 2.5x fwd 4bhssd

    def sdpa_bwd(self, torch, backend, sdpa_kernel):
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (self.q, self.k, self.v))
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=self.causal)
        do = self.dout.transpose(1, 2)

        def run():
            g = torch.autograd.grad(o, (qt, kt, vt), do, retain_graph=True)
            return tuple(x.transpose(1, 2) for x in g)

        return run

    def err(self, got, which):
        idx = {"dq": 0, "dk": 1, "dv": 2}
        errs = []
        for name, g in zip(which, got, strict=True):
            r = self.ref[idx[name]].float()
            errs.append(((g.float() - r).norm() / r.norm()).item())
        return max(errs)


def _bench(torch, dev, fn, rep=40):
    if dev == "cpu":  # smoke: one timed call, no meaning
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


_SMEM_SM90 = 232448  # bytes of shared memory one block may use on an H100 (sm_90)


class _Sm90Driver:
    """Stand-in driver for ``--aot``: Triton compiles for sm_90 on a machine without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _cubin_usage(ck):
    """Registers and stack frame (spill space) of a compiled kernel, read by Triton's cuobjdump."""
    import re
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2))) if m else {}


def worker_compile(a):
    """Compile (no launch) every job of this shard; report registers, stack, shared memory."""
    torch, bwd, dev, shape = _setup(a.smoke)
    if a.aot:
        from triton.runtime.driver import driver

        driver.set_active(_Sm90Driver())
        dev = "cpu"
    jobs = json.loads(a.jobs)
    caps = {}
    for kname, d, causal, cfg in jobs:
        key = (d, causal)
        if key not in caps:
            x = [torch.randn(1, 256, 2048 // d, d, device=dev, dtype=torch.bfloat16) for _ in range(5)]
            lse = torch.randn(1, 2048 // d, 256, device=dev)
            caps[key] = _capture(bwd, x[0], x[1], x[2], x[3], x[4], lse, causal, fake_delta=a.aot)
        args, kw = caps[key][kname]
        m, n, w, st = cfg
        t0 = time.time()
        rec = dict(kind="compile", kernel=kname, d=d, causal=causal, cfg=cfg)
        try:
            ck = _kernel(kname).warmup(
                *args, grid=(1,), **kw, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st
            )
            rec.update(smem=ck.metadata.shared, wgmma="wgmma" in ck.asm.get("ptx", ""), **_cubin_usage(ck))
            if a.aot and ck.metadata.shared > _SMEM_SM90:
                raise RuntimeError(f"OutOfResources: shared memory {ck.metadata.shared} > {_SMEM_SM90}")
            if not a.aot:
                ck._init_handles()  # raises OutOfResources when the shared memory does not fit
            rec["ok"] = True
        except Exception as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
        rec["secs"] = round(time.time() - t0, 1)
        _emit(**rec)


def worker_base(a):
    """Whole backward: FA2, cuDNN, ours (eager, graph, host), delta alone, autotuner's choice."""
    torch, bwd, dev, shape = _setup(a.smoke)
    for d, causal, s in json.loads(a.jobs):
        _emit(**_base_row(torch, bwd, dev, _Row(torch, bwd, dev, shape, d, causal, s)))
        if dev == "cuda":
            torch.cuda.empty_cache()


def _base_row(torch, bwd, dev, r):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rec = dict(kind="base", d=r.d, causal=r.causal, s=r.s, b=r.b, h=r.h, flops=r.flops)
    rec["fa2"] = _bench(torch, dev, r.sdpa_bwd(torch, SDPBackend.FLASH_ATTENTION, sdpa_kernel), 100)
    try:
        rec["cudnn"] = _bench(torch, dev, r.sdpa_bwd(torch, SDPBackend.CUDNN_ATTENTION, sdpa_kernel), 100)
    except Exception as e:  # a backend missing on this build: report, keep going
        rec["cudnn"], rec["cudnn_error"] = float("nan"), str(e)[:200]

    def ours():
        return bwd.attn_bwd(r.dout, r.q, r.k, r.v, r.out, r.lse, softmax_scale=r.d**-0.5, causal=r.causal)

    rec["err"] = r.err(ours(), ("dq", "dk", "dv"))
    rec["ours"] = _bench(torch, dev, ours, 100)
    rec["delta"] = _bench(torch, dev, lambda: bwd.attn_bwd_delta(r.dout, r.out), 100)
    if dev != "cuda":
        return rec
    for name, tuner in (("dkdv_cfgs", bwd._dkdv_tuned), ("dq_cfgs", bwd._dq_tuned)):
        rec[name] = {str(k): str(c) for k, c in tuner.cache.items()}  # every key tuned so far
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        ours()
    rec["host_us"] = (time.perf_counter() - t0) / 20 * 1e6  # launch cost: the queue does not fill
    torch.cuda.synchronize()
    from bench_timing import capture  # benchmarks/ is on the path: this file runs as a script

    rec["ours_graph"] = _bench(torch, dev, capture(ours)[0], 100)
    return rec


def worker_time(a):
    """Time the given (seqlen, config) items of one kernel alone, in order."""
    torch, bwd, dev, shape = _setup(a.smoke)
    row = None
    for s, cfg in json.loads(a.jobs):
        if row is None or row.s != s:
            row = None
            if dev == "cuda":
                torch.cuda.empty_cache()
            row = _Row(torch, bwd, dev, shape, a.d, a.causal, s)
            cap = _capture(bwd, row.dout, row.q, row.k, row.v, row.out, row.lse, a.causal)
        _emit(kind="start", kernel=a.kernel, d=a.d, causal=a.causal, s=s, cfg=cfg)
        fn = _launcher(a.kernel, cap, cfg, row.b, s, row.h)
        outs = cap["dkdv"][0][6:8] if a.kernel == "dkdv" else cap["dq"][0][6:7]
        for o in outs:
            o.fill_(float("nan"))  # poison: every element must be written
        try:
            fn()
            err = row.err(outs, ("dk", "dv") if a.kernel == "dkdv" else ("dq",))
            ms = _bench(torch, dev, fn, a.rep)
        except Exception as e:  # compile/launch error: record; a CUDA error poisons the context
            msg = f"{type(e).__name__}: {str(e)[:200]}"
            _emit(kind="error", kernel=a.kernel, d=a.d, causal=a.causal, s=s, cfg=cfg, error=msg)
            if "CUDA" in msg or "cuda" in msg:
                sys.exit(3)
            continue
        _emit(kind="time", kernel=a.kernel, d=a.d, causal=a.causal, s=s, cfg=cfg, ms=ms, err=err)


def worker_combo(a):
    """Re-time each kernel's top configs longer, then delta + best dK/dV + best dQ as one backward:
    back to back, and with dQ on a second stream (the two kernels are independent)."""
    torch, bwd, dev, shape = _setup(a.smoke)
    for d, causal, s, kv_top, q_top in json.loads(a.jobs):
        best = _combo_row(torch, bwd, dev, _Row(torch, bwd, dev, shape, d, causal, s), kv_top, q_top)
        if dev == "cuda":
            torch.cuda.empty_cache()
        # Tail probe: twice the batch. With t = work + tail, tail = 2 * t(1x) - t(2x).
        r = _Row(torch, bwd, dev, dict(shape, tokens=2 * shape["tokens"]), d, causal, s)
        cap = _capture(bwd, r.dout, r.q, r.k, r.v, r.out, r.lse, causal)
        rec = dict(kind="tail", d=d, causal=causal, s=s)
        for kernel, (cfg, ms) in best.items():
            rec[kernel] = dict(
                cfg=cfg, ms_1x=ms, ms_2x=_bench(torch, dev, _launcher(kernel, cap, cfg, r.b, s, r.h), 100)
            )
        _emit(**rec)
        del r, cap
        if dev == "cuda":
            torch.cuda.empty_cache()


def _combo_row(torch, bwd, dev, r, kv_top, q_top):
    cap = _capture(bwd, r.dout, r.q, r.k, r.v, r.out, r.lse, r.causal)
    key = dict(d=r.d, causal=r.causal, s=r.s)
    best = {}
    for kernel, top in (("dkdv", kv_top), ("dq", q_top)):
        for cfg in top:
            ms = _bench(torch, dev, _launcher(kernel, cap, cfg, r.b, r.s, r.h), 100)
            _emit(kind="retime", kernel=kernel, **key, cfg=cfg, ms=ms)
            if kernel not in best or ms < best[kernel][1]:
                best[kernel] = (cfg, ms)
    kv = _launcher("dkdv", cap, best["dkdv"][0], r.b, r.s, r.h)
    dq = _launcher("dq", cap, best["dq"][0], r.b, r.s, r.h)

    def seq():
        bwd.attn_bwd_delta(r.dout, r.out)
        kv()
        dq()

    rec = dict(kind="combo", **key, dkdv=best["dkdv"][0], dq=best["dq"][0])
    rec["seq"] = _bench(torch, dev, seq, 100)
    if dev == "cuda":
        side = torch.cuda.Stream()

        def two_streams():
            bwd.attn_bwd_delta(r.dout, r.out)
            side.wait_stream(torch.cuda.current_stream())
            kv()
            with torch.cuda.stream(side):
                dq()
            torch.cuda.current_stream().wait_stream(side)

        rec["two_streams"] = _bench(torch, dev, two_streams, 100)
    _emit(**rec)
    return best


# ----------------------------------------------------------------------------------------------
# Parent side (no torch import: it only schedules workers and writes the results)


class Runner:
    def __init__(self, a):
        self.a, self.t0, self.records = a, time.time(), []
        os.makedirs(a.out, exist_ok=True)
        self.log = open(os.path.join(a.out, "sweep_bwd.jsonl"), "a")

    def left(self):
        return self.a.budget - (time.time() - self.t0)

    def _cmd(self, mode, jobs, **extra):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--jobs", json.dumps(jobs)]
        for k, v in extra.items():
            cmd += [f"--{k}", str(v)]
        return cmd + (["--smoke"] if self.a.smoke else []) + (["--aot"] if self.a.aot else [])

    def _env(self):
        env = dict(os.environ)
        if self.a.smoke:
            env["TRITON_INTERPRET"] = "1"
        return env

    def _keep(self, line):
        if line.startswith(TAG):
            rec = json.loads(line[len(TAG) :])
            self.records.append(rec)
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
            return rec
        if line.strip():
            print("   |", line.rstrip()[:300], flush=True)
        return None

    def run(self, mode, jobs, reserve=0.0, **extra):
        """One worker; returns (records, exit code). Killed when the budget (minus reserve) is out."""
        p = subprocess.Popen(
            self._cmd(mode, jobs, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._env(),
        )
        got = []
        for line in p.stdout:
            rec = self._keep(line)
            if rec is not None:
                got.append(rec)
                if rec["kind"] != "start":
                    print(f"[{time.time() - self.t0:5.0f}s] {mode}: {_short(rec)}", flush=True)
            if self.left() < reserve:
                p.kill()
                print(f"[{time.time() - self.t0:5.0f}s] {mode}: stopped at the deadline", flush=True)
                break
        return got, p.wait()

    def compile_all(self, jobs, n_proc, reserve):
        shards = [jobs[i::n_proc] for i in range(n_proc)]
        procs = [
            subprocess.Popen(
                self._cmd("compile", sh),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self._env(),
            )
            for sh in shards
            if sh
        ]
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(self.left() - reserve, 1))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            outs.append(out)
        recs = [r for out in outs for r in map(self._keep, out.splitlines()) if r is not None]
        ok = sum(r["ok"] for r in recs)
        print(f"[{time.time() - self.t0:5.0f}s] compiled {ok} ok, {len(recs) - ok} failed, of {len(jobs)}")
        return recs

    def time_kernel(self, kernel, d, causal, items, reserve):
        """Time items [(s, cfg)]; a crashed worker loses only the item it was on."""
        todo = list(items)
        for _ in range(8):
            if not todo or self.left() < reserve:
                break
            got, rc = self.run("time", todo, reserve, kernel=kernel, d=d, causal=int(causal), rep=self.a.rep)
            done = {(r["s"], tuple(r["cfg"])) for r in got if r["kind"] == "time"}
            started = [(r["s"], tuple(r["cfg"])) for r in got if r["kind"] == "start"]
            if rc != 0 and started and started[-1] not in done:
                s, cfg = started[-1]
                rec = dict(kind="fault", kernel=kernel, d=d, causal=causal, s=s, cfg=list(cfg), rc=rc)
                self._keep(TAG + json.dumps(rec))
                print(f"[{time.time() - self.t0:5.0f}s] fault: {_short(rec)}", flush=True)
                done |= {(x, cfg) for x, c in todo if tuple(c) == cfg}  # nor at other lengths
            todo = [(s, c) for s, c in todo if (s, tuple(c)) not in done]
            if rc == 0:
                break


def _short(rec):
    keep = ("kernel", "d", "causal", "s", "cfg", "ms", "err", "fa2", "ours", "seq", "two_streams", "ok")
    return " ".join(f"{k}={_fmt(rec[k])}" for k in keep if k in rec)


def _fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _summary(recs, dims, seqlens):
    """The table: per row FA2, cuDNN, ours as shipped, and the best config of each kernel."""
    base = {(r["d"], r["causal"], r["s"]): r for r in recs if r["kind"] == "base"}
    times = {}  # the sweep's times, replaced by the longer re-time where there is one
    bad = {
        (r["kernel"], r["d"], r["causal"], r["s"], tuple(r["cfg"]))
        for r in recs
        if r["kind"] == "time" and not r["err"] < 2e-2
    }
    for r in recs:
        key = (r.get("kernel"), r.get("d"), r.get("causal"), r.get("s"))
        if r["kind"] in ("time", "retime") and (*key, tuple(r["cfg"])) not in bad:
            times.setdefault(key, {})[tuple(r["cfg"])] = r
    times = {k: list(v.values()) for k, v in times.items()}
    combo = {(r["d"], r["causal"], r["s"]): r for r in recs if r["kind"] == "combo"}
    lines = [
        "ms per backward (do_bench medians); x = FA2 time / ours (>= 1.0 is the goal)",
        f"{'D':>4} {'causal':>6} {'S':>6} | {'fa2':>6} {'cudnn':>6} {'ours':>6} {'graph':>6} {'host':>5}"
        f" {'x':>5} | {'delta':>6} {'best dkdv (M,N,w,s)':>23} {'best dq (M,N,w,s)':>23} | "
        f"{'sum':>6} {'x':>5} {'2strm':>6} {'x':>5}",
    ]
    lines.append("-" * len(lines[-1]))
    for key in sorted(base, key=lambda k: (-k[0], k[1], k[2])):
        b = base[key]
        cells = f"{b['fa2']:6.3f} {b['cudnn']:6.3f} {b['ours']:6.3f} {b.get('ours_graph', float('nan')):6.3f}"
        cells += f" {b.get('host_us', float('nan')):5.0f} {b['fa2'] / b['ours']:5.2f} | {b['delta']:6.3f}"
        best = []
        for kernel in ("dkdv", "dq"):
            ts = times.get((kernel, *key), [])
            if ts:
                t = min(ts, key=lambda r: r["ms"])
                best.append(t["ms"])
                cells += f" {str(tuple(t['cfg'])):>16} {t['ms']:6.3f}"
            else:
                cells += f" {'-':>23}"
        c = combo.get(key)
        if c:
            cells += f" | {c['seq']:6.3f} {b['fa2'] / c['seq']:5.2f}"
            if "two_streams" in c:
                cells += f" {c['two_streams']:6.3f} {b['fa2'] / c['two_streams']:5.2f}"
        elif len(best) == 2:
            t = b["delta"] + sum(best)
            cells += f" | {t:6.3f} {b['fa2'] / t:5.2f} (sum of kernels)"
        lines.append(f"{key[0]:>4} {key[1]!s:>6} {key[2]:>6} | " + cells)
    tails = [r for r in recs if r["kind"] == "tail"]
    if tails:
        lines += ["", "tail probe (2x batch): tail = 2*t(1x) - t(2x), as a share of t(1x)"]
        for r in tails:
            cells = [
                f"{k} {tuple(r[k]['cfg'])} {r[k]['ms_1x']:.3f}/{r[k]['ms_2x']:.3f} ms "
                f"tail {(2 * r[k]['ms_1x'] - r[k]['ms_2x']) / r[k]['ms_1x']:+.1%}"
                for k in ("dkdv", "dq")
                if k in r
            ]
            lines.append(f"{r['d']:>4} {r['causal']!s:>6} {r['s']:>6} | " + " | ".join(cells))
    lines += ["", "cost model per config over the 6 rows: ms = a + b*full + c*masked iterations"]
    for d in sorted({r["d"] for r in recs if r["kind"] == "time"}):
        for kernel in ("dkdv", "dq"):
            best = {}  # config -> summed ms over the rows where it ran
            for r in recs:
                if r["kind"] == "time" and (r["kernel"], r["d"]) == (kernel, d) and r["err"] < 2e-2:
                    best.setdefault(tuple(r["cfg"]), []).append(r["ms"])
            full = [c for c, v in best.items() if len(v) == max(map(len, best.values()))]
            for cfg in sorted(full, key=lambda c: sum(best[c]))[:3]:
                fit = _cost_model(recs, kernel, d, cfg)
                if fit:
                    a, b, c = fit
                    lines.append(
                        f"{d:>4} {kernel:>5} {str(cfg):>16}: a {a:.3f} ms, b {b * 1e6:.2f} ns/iter, "
                        f"masked/full {c / b:.2f}"
                    )
    return "\n".join(lines)


def _iters(kernel, cfg, s, causal):
    """(full, masked) loop iterations of one (sequence, head) for a tile config: the launcher's
    ``_block_ranges`` runs, counted on the host (causal = diagonal 0, no window)."""
    m, n = cfg[0], cfg[1]
    rows, cols = (n, m) if kernel == "dkdv" else (m, n)  # resident block, streamed block
    full = masked = 0
    for r0 in range(0, s, rows):
        if kernel == "dkdv":  # key block r0 sees queries i >= j: a masked head, then mask-free
            start = r0 // cols * cols if causal else 0
            f0 = -(-(r0 + rows - 1) // cols) * cols if causal else 0
            f1 = end = s
        else:  # query block r0 sees keys j <= i: mask-free, then a masked tail
            start = f0 = 0
            end = min(r0 + rows, s) if causal else s
            f1 = min(r0 + 1, s) // cols * cols if causal else s // cols * cols
        f0, f1 = min(max(f0, start), end), min(max(f1, f0), end)
        full += (f1 - f0) // cols
        masked += -(-(f0 - start) // cols) + -(-(end - f1) // cols)
    return full, masked


def _cost_model(recs, kernel, d, cfg):
    """Least squares over the rows of one config: ms = a + b * full + c * masked (iterations over
    all heads). c / b is what a causal (masked) iteration costs in mask-free iterations, with every
    causal-only cost (diagonal masks, shorter loops, load imbalance) folded in."""
    import numpy as np

    pts = []
    for r in recs:
        if r["kind"] == "time" and (r["kernel"], r["d"], tuple(r["cfg"])) == (kernel, d, tuple(cfg)):
            f, mk = _iters(kernel, cfg, r["s"], r["causal"])
            bh = (16384 // r["s"]) * (2048 // d)
            pts.append((1.0, f * bh, mk * bh, r["ms"]))
    if len(pts) < 4 or not any(p[2] for p in pts):
        return None
    x = np.array(pts)
    (a, b, c), *_ = np.linalg.lstsq(x[:, :3], x[:, 3], rcond=None)
    return a, b, c


def _aot_table(comp):
    """Per kernel and config: registers / stack bytes (non-causal, causal), shared memory, MMA kind."""
    by = {}
    for r in comp:
        by.setdefault((r["kernel"], r["d"], tuple(r["cfg"])), {})[r["causal"]] = r
    lines = ["kernel D (BLOCK_M, BLOCK_N, warps, stages): regs/stack bytes non-causal, causal; smem; mma"]
    for (k, d, cfg), v in sorted(by.items()):
        cells = [
            f"{v[c]['regs']:3}/{v[c]['stack']:4}" if "regs" in v.get(c, {}) else "   -    " for c in (0, 1)
        ]
        smem = max(x.get("smem", 0) for x in v.values())
        fits = "" if all(x["ok"] for x in v.values()) else "  does not fit / failed"
        mma = "wgmma" if any(x.get("wgmma") for x in v.values()) else "mma"
        lines.append(f"{k:>4} {d:>3} {str(cfg):>16}: {cells[0]} {cells[1]}  {smem // 1024:3}K {mma}{fits}")
    return "\n".join(lines)


def _top(recs, kernel, d, causal, s, n):
    ts = [
        r
        for r in recs
        if r["kind"] == "time"
        and (r["kernel"], r["d"], r["causal"], r["s"]) == (kernel, d, causal, s)
        and r["err"] < 2e-2
    ]
    return [r["cfg"] for r in sorted(ts, key=lambda r: r["ms"])[:n]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="sweep_out")
    ap.add_argument("--dims", default="128", help="head dims to sweep")
    ap.add_argument("--base-dims", default="128,64", help="head dims of the base rows (whole backward)")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run")
    ap.add_argument("--procs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="compile processes")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms) in the sweep")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, toy sizes: tests the script")
    ap.add_argument("--aot", action="store_true", help="no GPU: compile for sm_90, report regs/stack/smem")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--kernel", default="dkdv", help=argparse.SUPPRESS)
    ap.add_argument("--d", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--causal", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.causal = bool(a.causal)
        return {"compile": worker_compile, "base": worker_base, "time": worker_time, "combo": worker_combo}[
            a.worker
        ](a)
    if a.smoke:
        a.seqlens, a.dims, a.base_dims = "64", "128", "128"
    dims = [int(x) for x in a.dims.split(",")]
    base_dims = [int(x) for x in a.base_dims.split(",")]
    seqlens = [int(x) for x in a.seqlens.split(",")]
    R = Runner(a)
    print(f"sweep_bwd: dims {dims}, seqlens {seqlens}, budget {a.budget:.0f}s, {a.procs} compile processes")
    cfgs = _configs(a.smoke)
    # Compile: the sweep grid, plus the shipped autotune configs at the other base dims.
    jobs = [(k, d, c, cfg) for c in (True, False) for d in dims for k in ("dkdv", "dq") for cfg in cfgs]
    if not (a.smoke or a.aot):
        from ringflash.kernels import bwd

        for d in sorted(set(base_dims) - set(dims)):
            for k, tuner, tiles in (
                ("dkdv", bwd._dkdv_tuned, bwd._DKDV_TILES),
                ("dq", bwd._dq_tuned, bwd._DQ_TILES),
            ):
                kept = bwd._prune(tiles)(tuner.configs, {"D_PAD": d, "DV_PAD": d})
                for c in kept:
                    jobs += [(k, d, causal, bwd._shape(c)) for causal in (True, False)]
    # Heavy register tiles last in every shard, so a compile deadline only drops those.
    jobs.sort(key=lambda j: (2 if j[0] == "dkdv" else 1) * j[3][1 if j[0] == "dkdv" else 0] * j[1] / j[3][2])
    if a.aot:
        comp = R.compile_all(jobs, a.procs, reserve=0.0)
        table = _aot_table(comp)
        with open(os.path.join(a.out, "sweep_bwd_aot.txt"), "w") as fh:
            fh.write(table + "\n")
        print(table)
        return
    if a.smoke:  # the interpreter compiles nothing ahead
        ok = {(k, d, c, tuple(cfg)) for k, d, c, cfg in jobs}
    else:
        comp = R.compile_all(jobs, a.procs, reserve=0.55 * a.budget)
        # Skip what does not fit or compile (or did not compile in time); time the rest.
        skip = ("OutOfResources", "CompilationError", "PTXASError", "CompileTimeAssertion")
        ok = {
            (r["kernel"], r["d"], r["causal"], tuple(r["cfg"]))
            for r in comp
            if r["ok"] or not any(x in r["error"] for x in skip)
        }
    R.run(
        "base",
        [(d, c, s) for d in base_dims for c in (True, False) for s in seqlens],
        reserve=0.45 * a.budget,
    )
    for causal in (True, False):
        for d in dims:
            for kernel in ("dkdv", "dq"):
                items = [(s, list(cfg)) for s in seqlens for cfg in cfgs if (kernel, d, causal, cfg) in ok]
                R.time_kernel(kernel, d, causal, items, reserve=0.07 * a.budget)
    # Re-time the best three per kernel and row longer, then the best pair as one backward.
    combo = [
        (d, c, s, _top(R.records, "dkdv", d, c, s, 3), _top(R.records, "dq", d, c, s, 3))
        for d in dims
        for c in (True, False)
        for s in seqlens
    ]
    combo = [j for j in combo if j[3] and j[4]]
    if combo:
        R.run("combo", combo, reserve=0.0)
    table = _summary(R.records, dims, seqlens)
    with open(os.path.join(a.out, "sweep_bwd_table.txt"), "w") as fh:
        fh.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
