import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_blocks(monkeypatch):
    """Make the blockwise backend use tiny tiles so small tests cross many tile edges."""
    from ringflash import blockwise

    monkeypatch.setattr(blockwise, "BLOCK_Q", 16)
    monkeypatch.setattr(blockwise, "BLOCK_K", 8)
    monkeypatch.setattr(blockwise, "SCORE_BUDGET", 0)


@pytest.fixture(autouse=True)
def _backend_from_env():
    """``RINGFLASH_TEST_BACKEND=triton`` runs every test's local attention calls on that backend
    (with ``TRITON_INTERPRET=1`` on CPU: the local suite through the Triton kernels)."""
    name = os.environ.get("RINGFLASH_TEST_BACKEND")
    if not name:
        yield
        return
    from ringflash import use_backend

    with use_backend(name):
        yield
