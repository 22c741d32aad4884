"""The planner against this machine: model-state bytes an engine holds under ZeRO 0-3 on 1 and 2
CPU ranks (bench/train.py's method: marjara.planner.measure.model_state_bytes), and the peak
memory one training micro-batch adds, with and without activation checkpointing.

The activation peak is measured through PyTorch's CPU allocator as the profiler reports it
(marjara.planner.measure.cpu_peak_increase): forward and backward of one micro-batch of the
model train.py builds, its parameter gradients already allocated by an earlier step (so that the
increase is the activations', as the planner's activation rows claim), checkpointing done with
the DeepSpeed function the Learner installs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from marjara.model.config import ModelConfig
from marjara.planner.activations import activations
from marjara.planner.devices import lookup
from marjara.planner.measure import cpu_peak_increase
from marjara.planner.model_states import model_states
from marjara.planner.setup import Setup, zero_settings
from train_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "plan_probe.py"


def planned_setup(preset: str, vocab: int, precision: str, stage: int, world: int, seq_len: int = 16,
                  checkpointing: bool = False, **model) -> Setup:
    block = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())["zero_optimization"]
    return Setup(ModelConfig.from_preset(preset, vocab_size=vocab, **model), seq_len, precision, stage, False, False,
                 checkpointing, 1, world, lookup("H100"), zero_settings(block))


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def engine_held(request):
    """One launch per world size measures every case of tests/plan_probe.py."""
    world = request.param
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    out = subprocess.run(launcher + [str(PROBE)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 12 and all(r["world"] == world for r in rows)
    return rows


def test_model_states_match_what_the_engine_holds(engine_held):
    for row in engine_held:
        setup = planned_setup(row["preset"], row["vocab_size"], row["precision"], row["stage"], row["world"])
        planned = model_states(setup).held
        assert planned == pytest.approx(row["held"], rel=0.10), row


ACTIVATION_CASES = [  # preset, vocab, precision, micro-batch, seq_len, extra model settings
    ("tiny", 320, "fp32", 8, 256, {}),
    ("small", 320, "fp32", 2, 512, {}),
    ("tiny", 50304, "fp32", 2, 256, {}),
    ("small", 50304, "fp32", 1, 512, {}),
    ("tiny", 320, "bf16", 2, 128, {}),
    ("tiny", 320, "fp32", 4, 256, {"use_moe": True, "num_experts": 4, "top_k": 2}),
]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_checkpointing"])
@pytest.mark.parametrize("preset, vocab, precision, batch, seq_len, model", ACTIVATION_CASES)
def test_activation_estimate_matches_a_profiled_step(preset, vocab, precision, batch, seq_len, model, checkpointing):
    import deepspeed

    from marjara.distributed import ensure_process_group
    from marjara.model import MarjaraModel

    ensure_process_group()
    torch.manual_seed(0)
    net = MarjaraModel(ModelConfig.from_preset(preset, vocab_size=vocab, **model))
    if precision == "bf16":
        net = net.to(torch.bfloat16)
    if checkpointing:
        deepspeed.checkpointing.configure(None)
        net.checkpoint_fn = deepspeed.checkpointing.non_reentrant_checkpoint
    x, y = torch.randint(0, vocab, (2, batch, seq_len))

    def step():
        output = net(x, y)  # held through backward, as in the Learner's step
        output.loss.backward()

    step()
    measured = cpu_peak_increase(step)
    setup = planned_setup(preset, vocab, precision, 0, 1, seq_len, checkpointing, **model)
    assert activations(setup, batch).peak == pytest.approx(measured, rel=0.25)
