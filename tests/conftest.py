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
