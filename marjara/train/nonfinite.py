"""The non-finite guard: steps whose loss or gradient norm is NaN/inf are not applied, counted,
logged, and a run that keeps producing them stops before it can save non-finite weights.

Where the step is skipped (bf16 and fp32; fp16 keeps DeepSpeed's dynamic loss scaling, whose
overflow skips are routine and not counted here):

- ZeRO 1-3 and DeepSpeed's bf16 optimizer already refuse a step whose global gradient norm is
  not finite (they set `optimizer.overflow`; the engine then counts `skipped_steps` and holds the
  scheduler back);
- ZeRO-0 in fp32 runs the client optimizer directly: `GuardedAdamW` below does the same there.

Detection costs no synchronisation per micro-batch: each micro-batch's loss is folded into a
flag on the device, read once per optimizer step together with the engine's own count of
skipped steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from marjara import distributed

DEFAULT_MAX_BAD_STEPS = 5


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW that does not step when the gradients hold NaN/inf, and says so through the
    `overflow` attribute DeepSpeed's engine reads after every optimizer step."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        # Expert gradients differ between ranks: every rank must take the same decision.
        self.overflow = not all_finite(p.grad for group in self.param_groups for p in group["params"])
        if self.overflow:
            return None
        return super().step(closure)


@dataclass
class NonFiniteGuard:
    """The policy for non-finite steps: which step is bad (end_step), when the run must stop
    (`in_a_row >= max_bad_steps`) and when a save may happen (allows_save). `report`, if given,
    logs and shows each bad step."""

    max_bad_steps: int
    enabled: bool = True
    report: object | None = field(default=None, repr=False)
    total: int = 0
    in_a_row: int = 0
    first_bad_step: int | None = None       # of the current streak
    first_bad_sample: int | None = None     # global sample index where that streak's data begins
    _loss_flag: torch.Tensor | None = field(default=None, repr=False)

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Fold a micro-batch's loss into the step's flag (on its device: no synchronisation)."""
        if not self.enabled:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_flag = bad if self._loss_flag is None else self._loss_flag | bad

    def take_loss_flag(self) -> torch.Tensor:
        """This step's flag (1: a non-finite loss on this rank), on the device, unread; resets it.
        The trainer all-reduces it together with the stop signal: one read per optimizer step."""
        flag = (self._loss_flag.to(torch.int64) if self._loss_flag is not None
                else torch.zeros((), dtype=torch.int64))
        self._loss_flag = None
        return flag

    def end_step(self, step: int, first_sample: int, skipped_by_optimizer: bool, loss_bad: bool) -> bool:
        """Record optimizer step `step` (1-based) whose data began at global sample `first_sample`;
        True when it was non-finite (its update was not applied where DeepSpeed allows skipping).
        `loss_bad`: take_loss_flag() as agreed by every rank."""
        if not self.enabled:
            return False
        bad = loss_bad or skipped_by_optimizer
        if not bad:
            self.in_a_row = 0
            self.first_bad_step = self.first_bad_sample = None
            return False
        self.total += 1
        if self.in_a_row == 0:
            self.first_bad_step, self.first_bad_sample = step, first_sample
        self.in_a_row += 1
        if self.report is not None:
            self.report.log(step, {"train/non_finite_steps": self.total})
            self.report.print(f"step {step:>6} | non-finite loss or gradient norm: update skipped "
                              f"({self.in_a_row} in a row of at most {self.max_bad_steps}, {self.total} in this run)")
        return True

    @property
    def must_stop(self) -> bool:
        return self.enabled and self.in_a_row >= self.max_bad_steps

    @property
    def allows_save(self) -> bool:
        """Not in the middle of a non-finite streak: `latest` keeps naming the last good step."""
        return self.in_a_row == 0


def all_finite(tensors) -> bool:
    """Whether every given tensor (this rank's weights, weight partitions or gradients) is finite,
    agreed by all ranks (one read): checked before every save, so that non-finite weights are never
    written, and by GuardedAdamW before it steps."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t is not None and t.numel()]
    ok = torch.stack(flags).all().to(torch.int32) if flags else torch.tensor(1, dtype=torch.int32)
    return bool(distributed.all_reduce(ok, op="min").item())


def stop_line(guard: NonFiniteGuard, step: int, samples_now: int, out_dir: str, resumed_from=None) -> str:
    """The one line a stopped run ends with: what happened, that nothing was saved, and how to
    resume past the data that blew up (--skip_samples counts from the checkpoint resumed)."""
    from pathlib import Path

    from marjara.checkpoint.format import LATEST, read_meta
    from marjara.checkpoint.locate import is_checkpoint_dir, latest_tag

    what = (f"stopped at step {step}: {guard.in_a_row} steps in a row with a non-finite loss or gradient norm "
            f"(--max_bad_steps {guard.max_bad_steps}), from step {guard.first_bad_step} on (global sample "
            f"{guard.first_bad_sample}); none was applied and nothing was saved")
    out = Path(out_dir)
    tag = latest_tag(out) if is_checkpoint_dir(out) else None
    if tag is not None and (out / tag).is_dir():
        done = read_meta(out / tag, "").samples_consumed
        return (f"{what}; {out_dir}/{LATEST} still names {tag}: to step over the data that blew up, resume with "
                f"--resume {out_dir} --skip_samples {samples_now - done}")
    if resumed_from is not None:
        return (f"{what}; to step over the data that blew up, resume with --resume {resumed_from.tag_dir} "
                f"--skip_samples {samples_now - resumed_from.meta.samples_consumed}")
    return f"{what}; no checkpoint exists yet: start again with --overwrite --skip_samples {samples_now}"
