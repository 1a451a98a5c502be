import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_blocks():
    """Make the blockwise backend use tiny tiles so small tests cross many tile edges."""
    from ringflash.backends import use_config
    from ringflash.blockwise import BlockwiseConfig

    with use_config(BlockwiseConfig(block_q=16, block_k=8, score_budget=0)):
        yield


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
