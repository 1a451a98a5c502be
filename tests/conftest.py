import os

import background
import pytest
import torch
from dist_utils import one_config_from_env


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "background(name): reads the result of background job `name` (tests/background.py)"
    )
    one_config_from_env()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Tests that read a background job run last, and their jobs start now (after deselection),
    so that they run beside the others."""
    items.sort(key=lambda it: it.get_closest_marker("background") is not None)  # stable: order kept
    marks = (it.get_closest_marker("background") for it in items)
    if not config.option.collectonly:
        background.start([m.args[0] for m in marks if m is not None])


def pytest_unconfigure(config):
    background.stop()


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
