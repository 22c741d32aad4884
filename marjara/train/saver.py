"""Saving a run: DeepSpeed's checkpoint plus MARJARA's meta (marjara.json) and each rank's RNG and EMA."""

from __future__ import annotations

from pathlib import Path

from marjara.checkpoint import store as ckpt
from marjara.checkpoint.format import CheckpointMeta, RunRecord
from marjara.errors import TrainingDiverged
from marjara.train.nonfinite import all_finite


class Saver:
    def __init__(self, engine, out_dir: str, keep_last: int, run: RunRecord, ema, report, last_saved: int) -> None:
        self.engine, self.out_dir, self.keep_last, self.run = engine, out_dir, keep_last, run
        self.ema, self.report = ema, report
        self.last_saved = last_saved  # the step of the newest checkpoint of this run (-1: none)

    def save(self, step: int, samples_consumed: int) -> Path:
        # Non-finite weights are never written (the guard skips non-finite steps; this is the net
        # under it). Every rank checks its own weights or ZeRO-3 partitions; all agree.
        if not all_finite(getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()):
            self.report.close()
            raise TrainingDiverged(f"the weights hold NaN or inf at step {step}; nothing was saved and "
                                   f"{self.out_dir} is as it was; resume from its last checkpoint with a lower "
                                   "--lr, or with --skip_samples past the data of the last steps")
        meta = CheckpointMeta.for_save(step, {"samples_consumed": samples_consumed}, self.run,
                                       self.ema.meta() if self.ema is not None else None)
        rank_state = {"rng": ckpt.rng_state(), "ema": {}, "ema_shapes": {}}
        if self.ema is not None:
            rank_state.update(self.ema.state_dict())
        tag_dir = ckpt.save(self.engine, self.out_dir, meta, rank_state, self.keep_last)
        self.last_saved = step
        self.report.print(f"step {step:>6} | saved {tag_dir}")
        return tag_dir

    def save_unless_saved(self, step: int, samples_consumed: int) -> None:
        if self.last_saved != step:
            self.save(step, samples_consumed)
