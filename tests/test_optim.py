import math

import pytest

from marjara.model.config import ModelConfig
from marjara.model import MarjaraModel
from marjara.train.optim import lr_factor, parameter_groups

pytestmark = pytest.mark.usefixtures("process_group")  # the MoE models built here need one


def test_warmup_then_cosine_to_the_minimum():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_matrices_decay_and_norms_do_not():
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=64))
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in groups["decay"]["params"])
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == model.num_parameters()  # the tied embedding counted once


def test_moe_experts_get_groups_of_their_own():
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=64, use_moe=True))
    groups = parameter_groups(model, 0.1)
    moe = [g for g in groups if g.get("moe")]
    assert moe and all(not p.allreduce for g in moe for p in g["params"])
    assert all(getattr(p, "allreduce", True) for g in groups if not g.get("moe") for p in g["params"])
