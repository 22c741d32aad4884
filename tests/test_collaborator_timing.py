"""The loop's collaborators decide their own timing: StepMeter.maybe_log, Evaluator.maybe_validate
and Checkpointer.maybe_save, the last asking the non-finite guard (no save inside a streak)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from marjara.checkpoint.format import RunRecord, read_meta
from marjara.data import TokenDataset, TrainStream
from marjara.model import MarjaraModel, ModelOutput
from marjara.model.config import ModelConfig
from marjara.train.batches import DeviceBatches
from marjara.train.checkpointer import Checkpointer
from marjara.train.evaluator import Evaluator
from marjara.train.nonfinite import NonFiniteGuard
from marjara.train.step_metrics import StepMeter

pytestmark = pytest.mark.usefixtures("process_group")  # log lines and saves agree over the ranks


class Report:
    """What rank 0 would log and show, kept."""

    def __init__(self) -> None:
        self.logged, self.lines, self.bar = [], [], 0

    def log(self, step, values, line=None):
        self.logged.append((step, values))

    def print(self, message):
        self.lines.append(message)

    def advance(self, steps=1):
        self.bar += steps

    def close(self):
        pass


def steps_with(report: Report, key: str) -> list[int]:
    return [step for step, values in report.logged if key in values]


class Engine:
    """The engine calls the collaborators make, around a real module."""

    device = torch.device("cpu")

    def __init__(self, module) -> None:
        self.module, self.skipped_steps = module, 0

    def __call__(self, x, y=None):
        return self.module(x, y)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()

    def get_lr(self):
        return [1e-3]

    def get_global_grad_norm(self):
        return 1.0

    def save_checkpoint(self, out_dir, tag, save_latest):
        (Path(out_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), Path(out_dir) / tag / "mp_rank_00_model_states.pt")


def model() -> MarjaraModel:
    torch.manual_seed(0)
    return MarjaraModel(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16))


def test_the_meter_logs_every_log_interval_steps_and_at_the_last():
    net, report = model(), Report()
    meter = StepMeter(Engine(net), net, report, 1, tokens_per_step=64, flops_per_token=1.0, peak=0.0,
                      precision="bf16", zero_stage=1, log_interval=3, last_step=7)
    for step in range(1, 8):
        meter.before_optimizer_step()
        loss = torch.tensor(float(step))
        meter.add_micro_batch(ModelOutput(None, loss, None, {}, loss, torch.tensor(1)), grad_accum=1)
        meter.maybe_log(step)
    assert steps_with(report, "train/loss") == [3, 6, 7] and report.bar == 7
    # Each line averages the steps since the previous one.
    assert [values["train/loss"] for _, values in report.logged] == [2.0, 5.0, 7.0]


@pytest.mark.parametrize("interval, expected", [(4, [4, 8, 10]), (5, [5, 10]), (0, [])])
def test_the_evaluator_validates_every_interval_steps_and_at_the_last(interval, expected):
    net, report = model(), Report()
    x = torch.randint(0, 64, (2, 16))
    evaluator = Evaluator(Engine(net), [("", 1.0, [(x, x)])], None, report, "deterministic", interval, last_step=10)
    returned = [step for step in range(1, 11) if evaluator.maybe_validate(step) is not None]
    assert returned == steps_with(report, "val/loss") == expected


def test_the_checkpointer_saves_every_interval_but_not_inside_a_non_finite_streak(tmp_path):
    net, report = model(), Report()
    data = TokenDataset(np.arange(40 * 16 + 1, dtype=np.uint16) % 64, 16, "counting")
    batches = DeviceBatches(TrainStream(data, seed=1, micro_batch_size=2, grad_accum=1, rank=0, world_size=1), "cpu")
    guard = NonFiniteGuard(max_bad_steps=3, report=report)
    run = RunRecord(seq_len=16, model_config=net.config.to_dict(), tokenizer="bytes", zero_stage=0, world_size=1,
                    dtype="fp32", train_args={})
    checkpointer = Checkpointer(str(tmp_path), keep_last=0, save_interval=2, resume=None, zero_stage=0)
    assert checkpointer.start(Engine(net), None, batches, guard, report, run, []) == 0
    for step in range(1, 9):
        batches.next()
        batches.prefetch()
        guard.observe_loss(torch.tensor(math.nan if step in (3, 4) else 1.0))  # a streak over steps 3 and 4
        guard.end_step(step, batches.samples_consumed, skipped_by_optimizer=False, loss_bad=bool(guard.take_loss_flag()))
        checkpointer.maybe_save(step)
    checkpointer.save_unless_saved(8)  # the end of the run: step 8 is saved already
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step2", "global_step6", "global_step8"]
    assert sum("saved" in line for line in report.lines) == 3
    assert steps_with(report, "train/non_finite_steps") == [3, 4]
    # Each checkpoint records the stream's state after its step's batches (2 samples a step).
    assert [read_meta(tmp_path / f"global_step{s}", "").data_state for s in (2, 6)] == \
        [{"samples_consumed": 4}, {"samples_consumed": 12}]
