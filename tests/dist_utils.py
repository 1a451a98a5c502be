"""Spawning real distributed workers for tests: gloo (or NCCL), a ``file://`` rendezvous in a temp dir.

``spawn(fn, world, *args)`` starts ``world`` processes (torch.multiprocessing, forkserver context:
a server that imported torch and ringflash once forks every worker, so a worker does not import
them anew), each of which joins a gloo process group and calls ``fn(rank, world, *args)``. It
returns the ranks' return values in rank order; when any rank raises, the parent raises
``AssertionError`` carrying every failing rank's traceback, so assertion failures inside workers
fail the calling test.
``fn`` must be a module-level function (it is pickled by name).
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What the fork server imports before it forks the workers. A worker still imports its test module
# (``fn`` is pickled by name), which finds these loaded.
_PRELOAD = ("torch", "torch.distributed", "numpy", "ringflash", "ringflash.parallel", "transformers")


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([m for m in _PRELOAD if importlib.util.find_spec(m.split(".")[0])])
    return ctx


def _worker(fn, rank, world, init_file, pg_timeout, results, args, backend):
    torch.set_num_threads(1)
    status, payload = "ok", None
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            one_config_from_env()
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        # Every rank finishes joining before any runs: a rank that returns (or fails) at once and
        # exits would otherwise close its connections while a peer is still setting up the mesh.
        dist.barrier()
        payload = fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        status, payload = "error", traceback.format_exc()
    results.put((rank, status, payload))
    results.close()
    results.join_thread()
    # Skip process-group teardown: after a failed ring a peer may be gone and teardown could block.
    os._exit(0)


def spawn(
    fn, world: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0, expect_dead=(), backend="gloo"
):
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return the results in rank order.

    ``backend``: ``"gloo"`` (CPU), or ``"nccl"`` with rank ``r`` on GPU ``r``.

    ``expect_dead``: ranks that are meant to die without reporting (their result is None).
    """
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world, init_file, pg_timeout, results, args, backend),
                daemon=True,
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        got: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout
        want = world - len(expect_dead)
        while len(got) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                r, status, payload = results.get(timeout=min(left, 1.0))
                got[r] = (status, payload)
            except queue.Empty:
                alive = [
                    p for i, p in enumerate(procs) if i not in got and i not in expect_dead and p.is_alive()
                ]
                if not alive and len(got) < want:
                    time.sleep(0.5)  # a result may still be in flight
                    while True:
                        try:
                            r, status, payload = results.get_nowait()
                            got[r] = (status, payload)
                        except queue.Empty:
                            break
                    break
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [
        f"--- rank {r} ---\n{payload}" for r, (status, payload) in sorted(got.items()) if status == "error"
    ]
    missing = [r for r in range(world) if r not in got and r not in expect_dead]
    if errors or missing:
        msg = "\n".join(errors)
        if missing:
            msg += f"\nranks {missing} reported nothing within {timeout:.0f} s (crash or hang)"
        raise AssertionError(f"distributed test failed on {world} ranks:\n{msg}")
    return [got[r][1] if r in got else None for r in range(world)]


def _fresh_tuners():
    """The attention kernels' autotuners; the launches kept per signature are dropped, so that the
    next launch of every signature goes through its autotuner's (new) configs."""
    from ringflash.kernels import bwd, fwd

    fwd._FWD_LAUNCHES.clear()
    bwd._BWD_LAUNCHES.clear()
    return fwd._attn_fwd_tuned, bwd._dkdv_tuned, bwd._dq_tuned


def refreshed_untracked(buf, values):
    """``values`` as a caller that reuses one tensor passes them: a copy the first time (``buf``
    None), after that written into ``buf`` where torch keeps no version, as a collective into a
    reused buffer writes. Returns the tensor to pass (and keep as ``buf``)."""
    if buf is None:
        return values.clone()
    buf.data.copy_(values)  # no version bump
    return buf


# Tiles (forward, dK/dV, dQ) that Triton 3.6's ptxas compiles at small head dims (16, 32) in float32,
# float16 and bfloat16: the pinned head-dim-256 forward tile of ``RINGFLASH_TEST_CONFIGS=one``
# (64 x 32 keys, 2 stages) crashes it there (float32 at head dim 16, float16 at 32).
SMALL_HEAD_TILES = ((64, 64, 4, 2), (32, 64, 4, 4), (64, 32, 4, 3))


def one_triton_config(picks=(0, 0, 0), tiles=None) -> list:
    """In this process, give each autotuned Triton attention kernel (forward, dK/dV, dQ) one tile
    config, the one at index ``picks[i]`` of its list (the first by default), or with ``tiles`` the
    given ``(BLOCK_M, BLOCK_N, warps, stages)`` per kernel; returns the previous lists, for
    ``restore_triton_configs``.

    For GPU tests: with one config a kernel variant compiles once and is never benchmarked, where
    autotuning every mask/shape variant (on every rank) takes minutes.
    """
    import triton

    tuners = _fresh_tuners()
    saved = [t.configs for t in tuners]
    for n, tuner in enumerate(tuners):
        if tiles is None:
            tuner.configs = [tuner.configs[picks[n]]]
        else:
            m, bn, w, st = tiles[n]
            tuner.configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": bn}, num_warps=w, num_stages=st)]
        tuner.cache.clear()
    return saved


def all_triton_configs() -> list:
    """In this process, give each autotuned Triton attention kernel every config of its own list
    again (undoing ``RINGFLASH_TEST_CONFIGS=one``, for a test of the autotuned choice); returns the
    previous lists, for ``restore_triton_configs``."""
    from ringflash.kernels import bwd, fwd

    tuners = _fresh_tuners()
    saved = [t.configs for t in tuners]
    full = (fwd._fwd_configs(), bwd._configs(bwd._DKDV_TILES), bwd._configs(bwd._DQ_TILES))
    for tuner, configs in zip(tuners, full, strict=True):
        tuner.configs = configs
        tuner.cache.clear()
    return saved


def one_config_from_env() -> None:
    """``RINGFLASH_TEST_CONFIGS=one`` (on a GPU; ``benchmarks/run_one_gpu.sh`` sets it) pins each
    autotuned attention kernel to one tile config for the whole run: the forward's head-dim-256
    tile, which fits every case, and the first of the dK/dV and dQ lists. Each kernel variant then
    compiles once instead of autotuning every shape (about a minute per case); NCCL workers
    (``spawn``) pin theirs too. The other configs' numerics are covered by the backward tile sweep
    (docs/performance.md) and the benchmarks' error columns."""
    if os.environ.get("RINGFLASH_TEST_CONFIGS") != "one" or not torch.cuda.is_available():
        return
    one_triton_config(picks=(-1, 0, 0))


def restore_triton_configs(saved: list) -> None:
    """Undo ``one_triton_config``."""
    for tuner, configs in zip(_fresh_tuners(), saved, strict=True):
        tuner.configs = configs
        tuner.cache.clear()
