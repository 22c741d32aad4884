"""Launched on 1 or 2 CPU ranks by tests/test_plan_measured.py: for each case, builds the engine
train.py builds (ZeRO 0-3 from ds_configs/), takes one optimizer step and prints, from rank 0, the
model-state bytes the engine holds (marjara.planner.measure.model_state_bytes) as one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import marjara  # noqa: E402,F401
from marjara.distributed import ensure_process_group, exit_now, rank, shutdown, world_size  # noqa: E402
from marjara.model import MarjaraModel  # noqa: E402
from marjara.model.config import ModelConfig  # noqa: E402
from marjara.planner.measure import model_state_bytes  # noqa: E402
from marjara.train.config import TrainConfig  # noqa: E402
from marjara.train.engine import initialize_engine  # noqa: E402
from marjara.train.optim import build_adamw, parameter_groups  # noqa: E402

# (preset, vocab_size, precision): the built-in corpus's byte vocabulary and GPT-2's.
CASES = [("tiny", 320, "fp32"), ("tiny", 320, "bf16"), ("small", 50304, "fp32")]


def measure(preset: str, vocab: int, precision: str, stage: int) -> int:
    cfg = TrainConfig.from_flags({"deepspeed_config": str(ROOT / "ds_configs" / f"zero{stage}.json"), "lr": 1e-4,
                                  "batch_size": 1, "mixed_precision": precision}, has_gpu=False)
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset(preset, vocab_size=vocab))
    engine = initialize_engine(model=model, optimizer=build_adamw(parameter_groups(model, cfg.optim.weight_decay), cfg),
                               config=cfg.engine_config(world_size()))
    x = torch.randint(0, vocab, (1, 17))
    loss = engine(x[:, :-1], x[:, 1:]).loss
    engine.backward(loss)
    engine.step()
    held = model_state_bytes(engine)
    engine.destroy()
    return held


def main() -> None:
    ensure_process_group()
    for preset, vocab, precision in CASES:
        for stage in (0, 1, 2, 3):
            held = measure(preset, vocab, precision, stage)
            if rank() == 0:
                print(json.dumps({"preset": preset, "vocab_size": vocab, "precision": precision, "stage": stage,
                                  "world": world_size(), "held": held}), flush=True)
    shutdown()
    exit_now(0)


if __name__ == "__main__":
    main()
