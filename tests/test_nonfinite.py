"""The non-finite guard's parts: AdamW that refuses non-finite gradients, the streak counter."""

import math

import pytest
import torch

from marjara.train.nonfinite import GuardedAdamW, NonFiniteGuard, all_finite


def test_guarded_adamw_does_not_step_on_non_finite_gradients_and_says_so():
    weight = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([weight], lr=0.1)
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert opt.overflow and torch.equal(weight.detach(), torch.ones(3)) and not opt.state
    weight.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and (weight.detach() < 1).all()


def test_guarded_adamw_steps_exactly_like_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), None
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = GuardedAdamW([a], lr=0.01, weight_decay=0.1), torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(5)
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_streaks_are_counted_and_reset_by_a_good_step():
    guard = NonFiniteGuard(max_bad_steps=3)
    outcomes = []
    for step, (loss, skipped) in enumerate([(1.0, False), (math.nan, False), (1.0, True), (1.0, False),
                                            (math.inf, False), (math.nan, True), (math.nan, False)], start=1):
        guard.observe_loss(torch.tensor(1.0))
        guard.observe_loss(torch.tensor(loss))  # a bad micro-batch spoils its whole step
        outcomes.append(guard.end_step(step, first_sample=step * 8, skipped_by_optimizer=skipped,
                                       loss_bad=bool(guard.take_loss_flag())))
        if guard.must_stop:
            break
    assert outcomes == [False, True, True, False, True, True, True]
    assert guard.total == 5 and guard.in_a_row == 3 and guard.must_stop
    assert (guard.first_bad_step, guard.first_bad_sample) == (5, 40)


def test_disabled_guard_counts_nothing():
    guard = NonFiniteGuard(max_bad_steps=1, enabled=False)
    guard.observe_loss(torch.tensor(math.nan))
    assert not guard.end_step(1, 0, skipped_by_optimizer=True, loss_bad=True) and not guard.must_stop


@pytest.mark.parametrize("value, expected", [(1.0, True), (math.nan, False), (-math.inf, False)])
def test_all_finite(value, expected):
    assert all_finite([torch.ones(4), torch.tensor([0.0, value])]) is expected
