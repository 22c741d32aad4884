"""Validation of a 2-rank expert-parallel MoE run (ep_size 2, top-2): reproducible, and equal to
what the converted model scores on the same validation batches."""

import json

import pytest
import torch
import torch.nn.functional as F

from checkpoint_runs import COMMON, RUNS, STEPS, checkpoint, torchrun
from marjara.checkpoint.conversion import convert
from marjara.data import open_data, validation_batches
from marjara.model import MarjaraModel
from train_helpers import metrics

pytestmark = pytest.mark.slow


def flag(flags: list[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]  # the last one given wins, as in argparse


def converted_model_loss(model, flags: list[str], world: int) -> float:
    """Mean cross-entropy over every rank's share of the run's validation batches, computed with
    the converted model in one process."""
    batch_size, n_batches, seq_len = (int(flag(flags, f"--{n}")) for n in ("batch_size", "eval_batches", "seq_len"))
    data = open_data(None, seq_len)
    total, count = 0.0, 0
    for r in range(world):
        for x, y in validation_batches(data.val, batch_size, n_batches, r, world):
            with torch.no_grad():
                logits = model(x).logits
            total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum",
                                     ignore_index=-1).item()
            count += int((y != -1).sum())
    return total / count


def test_ep2_validation_logs_the_same_loss_each_time_equal_to_the_converted_model(tmp_path_factory, tmp_path):
    ckpt = checkpoint(tmp_path_factory, "moe_ep2")  # 2 ranks, ep_size 2, top-2; validates at step STEPS
    flags = [*COMMON, *RUNS["moe_ep2"]]
    in_run = [m["val/loss"] for m in metrics(ckpt) if "val/loss" in m]
    assert len(in_run) == 1 and metrics(ckpt)[-1]["step"] == STEPS

    # The same weights validated twice more in a resumed Learner, other RNG states on every rank.
    again = tmp_path / "again"
    torchrun("tests/evaluate_resumed.py", [str(tmp_path / "losses.json"), *flags, "--out_dir", str(again),
                                           "--resume", str(ckpt / f"global_step{STEPS}")])
    logged = [(m["step"], m["val/loss"]) for m in metrics(again) if "val/loss" in m]
    assert logged == [(STEPS, in_run[0]), (STEPS, in_run[0])]

    converted = MarjaraModel.from_pretrained(convert(ckpt, tmp_path / "model"))  # no process group needed
    assert converted_model_loss(converted, flags, world=2) == pytest.approx(in_run[0], abs=1e-6)

    # DeepSpeed's gate (--moe_eval_routing training) drops tokens and samples: each pass differs.
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["deterministic"] == [in_run[0], in_run[0]]
    first, second = losses["training"]
    assert first != second and in_run[0] not in (first, second)
