"""Long child processes of the suite (interpreter scripts, torchrun runs), run one after another on
a background thread while the other tests run, so that they take the second core.

A test module names its command at import (``job``) and marks the tests that read it
``@pytest.mark.background(name)``. After collection, ``conftest.py`` moves those tests to the end
of the run and starts their jobs (``start``); a test then reads its job's result (``result``),
waiting if the job is still running. A job no run started (its test run alone, or ``--co``) runs
when its result is first asked for, in the foreground.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field


@dataclass
class _Job:
    argv: list[str]
    cwd: str
    env: dict
    timeout: float
    out_dir: str | None = None  # a fresh directory, "{out}" in the command and its cwd
    done: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = None
    result: subprocess.CompletedProcess | None = None


_JOBS: dict[str, _Job] = {}
_started: list[str] = []
_stopping = threading.Event()


def job(name: str, argv: list[str], *, cwd: str, env: dict | None = None, timeout: float = 600) -> str:
    """Name the command ``argv``, run in ``cwd``, as job ``name`` (``"{out}"`` in either becomes a
    fresh directory); the job's children run with one intra-op thread each. Returns ``name`` (for
    the marker)."""
    env = dict(os.environ if env is None else env)
    env["OMP_NUM_THREADS"] = "1"
    _JOBS[name] = _Job(list(argv), cwd, env, timeout)
    return name


def _run(j: _Job) -> None:
    try:
        if "{out}" in " ".join([*j.argv, j.cwd]):
            j.out_dir = tempfile.mkdtemp(prefix="ringflash-job-")
        argv = [a.replace("{out}", j.out_dir) if j.out_dir else a for a in j.argv]
        cwd = j.cwd.replace("{out}", j.out_dir) if j.out_dir else j.cwd
        # Files, not pipes: a chatty child would block on a full pipe nobody reads until it ends.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            j.proc = subprocess.Popen(argv, cwd=cwd, env=j.env, stdout=out, stderr=err, text=True)
            try:
                code = j.proc.wait(timeout=j.timeout)
            except subprocess.TimeoutExpired:
                j.proc.kill()
                code = j.proc.wait()
                err.write(f"\n[background job killed after {j.timeout} s]\n")
            out.seek(0), err.seek(0)
            j.result = subprocess.CompletedProcess(argv, code, out.read(), err.read())
    except Exception as e:  # reported to the test that reads the job
        j.result = subprocess.CompletedProcess(j.argv, -1, "", f"background job failed to run: {e!r}")
    finally:
        j.done.set()


def _chain(names: list[str]) -> None:
    for name in names:
        if _stopping.is_set():
            j = _JOBS[name]
            j.result = subprocess.CompletedProcess(j.argv, -1, "", "the run stopped before this job")
            j.done.set()
        else:
            _run(_JOBS[name])


def start(names) -> None:
    """Run the jobs ``names`` one after another on a background thread (each once)."""
    todo = [n for n in dict.fromkeys(names) if n in _JOBS and n not in _started]
    _started.extend(todo)
    if todo:
        threading.Thread(target=_chain, args=(todo,), daemon=True, name="ringflash-test-jobs").start()


def result(name: str) -> tuple[subprocess.CompletedProcess, str | None]:
    """The finished job's ``(CompletedProcess, out_dir)``: waits for a started job, runs one that
    was not started."""
    j = _JOBS[name]
    if name not in _started:
        _started.append(name)
        _run(j)
    j.done.wait()
    return j.result, j.out_dir


def stop() -> None:
    """At the end of a run: kill the job running now (a run that ends early: ``-x``, an interrupt),
    start no other, and remove the jobs' directories."""
    _stopping.set()
    for j in _JOBS.values():
        if j.proc is not None and j.proc.poll() is None:
            j.proc.kill()
            j.proc.wait()
        if j.out_dir is not None:
            shutil.rmtree(j.out_dir, ignore_errors=True)
