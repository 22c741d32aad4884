import pytest

from offline_tiktoken import SHARED_TIKTOKEN


@pytest.fixture(autouse=True)
def offline_tiktoken(monkeypatch):
    """Every test reads tiktoken's files from ../shared/tiktoken, never from the network."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))


@pytest.fixture
def process_group():
    """DeepSpeed's MoE layers need a process group: tests that build a MoE model in this plain
    process set up the one-rank group, as any program running a model without a launcher does."""
    from marjara.distributed import ensure_process_group

    ensure_process_group()
