import pytest

from offline_tiktoken import SHARED_TIKTOKEN


@pytest.fixture(autouse=True)
def offline_tiktoken(monkeypatch):
    """Every test reads tiktoken's files from ../shared/tiktoken, never from the network."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
