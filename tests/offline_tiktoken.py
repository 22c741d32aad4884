"""The GPT-2 BPE files tests use offline (../shared/tiktoken); tests never download them."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = ROOT.parent / "shared" / "tiktoken"
GPT2_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
requires_gpt2 = pytest.mark.skipif(
    not all((SHARED_TIKTOKEN / name).is_file() for name in GPT2_FILES),
    reason=f"GPT-2 BPE files not found in {SHARED_TIKTOKEN}; tests never download them",
)
