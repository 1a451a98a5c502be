"""What chooses a backend and its tunables inside a block: the stacks of ``use_backend`` and
``use_config`` blocks in force, and whether Triton is there to be chosen."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

# Plain lists (innermost choice last) rather than ContextVars: torch.compile can read and guard
# on a module-level list, not on ContextVar.get.
_forced: list[str] = []
_configs: list[object] = []


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_interpreter() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``; Triton reads it once,
    when it is imported, and so does this)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def pushed(stack: list, value):
    """``value`` on top of ``stack`` inside the block (the ``use_*`` context managers nest: the
    innermost block wins)."""
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()


def current_config(kind: type):
    """The innermost ``use_config`` object of type ``kind``, or ``kind()`` (its defaults)."""
    for c in reversed(_configs):
        if isinstance(c, kind):
            return c
    return kind()
