"""The Checkpointer: everything between a run and its checkpoint folder.

- The folder: one run per --out_dir (claim: refuse another run's folder, clear it with
  --overwrite, or continue the metrics of the run resumed).
- Resume: the checkpoint --resume names, checked against its checksums and against this run,
  loaded into the engine, each rank's RNG, the EMA and the data stream (through its
  load_state_dict), also on another world size (DeepSpeed's universal format).
- Saving: when (maybe_save: every save_interval steps, unless the non-finite guard holds saves
  back), what (DeepSpeed's checkpoint, marjara.json, each rank's RNG and EMA), never non-finite
  weights; the file protocol, rotation (keep_last) and `latest` are marjara.checkpoint.store's.

The Learner calls it in the order in which each call's inputs come to exist:
    Checkpointer(...)                finds and verifies the checkpoint to resume from (writes nothing)
    check_resume(model, tokenizer)   refuses a checkpoint of another model, tokenizer or ZeRO stage
    claim(log_dir, overwrite)        the folder, once every input is checked
    engine_config(ds_config)         the DeepSpeed config, set to load a universal checkpoint if need be
    start(engine, ema, batches, ...) loads the checkpoint resumed; what it is given, later saves write
    maybe_save(step), save_unless_saved(step)
"""

from __future__ import annotations

from pathlib import Path

import torch

from marjara import distributed
from marjara.checkpoint import store
from marjara.checkpoint.ema_reader import ema_tensors
from marjara.checkpoint.format import Checkpoint, CheckpointMeta, RunRecord
from marjara.checkpoint.locate import find_resume_point
from marjara.checkpoint.verify import check_checkpoint
from marjara.compat.deepspeed import repair_universal_optimizer
from marjara.errors import AgreedError, MarjaraError, TrainingDiverged
from marjara.model.config import ModelConfig
from marjara.train import run_dir
from marjara.train.nonfinite import all_finite


class Checkpointer:
    def __init__(self, out_dir: str, keep_last: int, save_interval: int, resume: str | None, zero_stage: int) -> None:
        self.out_dir, self.keep_last, self.save_interval = out_dir, keep_last, save_interval
        self.resume, self.zero_stage = resume, zero_stage
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.resumed_from: Checkpoint | None = None
        self.verified = False
        if resume:
            try:
                self.resumed_from = find_resume_point(resume)  # every rank reads the same marjara.json alike
            except MarjaraError as exc:
                raise AgreedError(str(exc)) from None
            # All ranks check the files against their checksums together, before any is loaded; a
            # problem ends the run on every rank, printed once (by rank 0).
            self.verified = check_checkpoint(self.resumed_from, lambda intact: f"--resume {intact.tag_dir}")
        # ZeRO-1/2/3 partitions saved by another world size load through DeepSpeed's universal format.
        self.universal = (self.resumed_from is not None and zero_stage > 0
                          and self.resumed_from.meta.world_size != self.world)
        self.last_saved = self.start_step if self.resumed_from else -1  # the step of this run's newest save

    @property
    def start_step(self) -> int:
        """The step training continues from: the checkpoint's, or 0 for a fresh run."""
        return self.resumed_from.meta.step if self.resumed_from else 0

    def check_resume(self, model_config: ModelConfig, tokenizer_name: str) -> None:
        """Refuse a checkpoint this run cannot continue (nothing is written yet)."""
        if self.resumed_from is None:
            return
        meta, where = self.resumed_from.meta, self.resume
        if meta.zero_stage != self.zero_stage:
            raise MarjaraError(
                f"--resume {where}: the checkpoint was saved under ZeRO stage {meta.zero_stage}, this run "
                f"uses stage {self.zero_stage}; resume with ds_configs/zero{meta.zero_stage}.json or a copy of it"
            )
        differences = meta.model.differences(model_config)
        if differences:
            raise MarjaraError(
                f"--resume {where}: the checkpoint's model differs from this run's ({'; '.join(differences)} "
                "as checkpoint != now); pass the same model flags as the original run"
            )
        if meta.tokenizer != tokenizer_name:
            raise MarjaraError(
                f"--resume {where}: the checkpoint was trained with tokenizer {meta.tokenizer!r}, "
                f"this data uses {tokenizer_name!r}; use data prepared with the same tokenizer"
            )

    def claim(self, log_dir: str, overwrite: bool) -> None:
        """One run per folder. Every rank reads the same folder and comes to the same answer (a
        refusal is raised on all of them, printed by rank 0); rank 0 alone clears the folder
        (--overwrite) or trims the metrics of the run it continues."""
        out = Path(self.out_dir)
        same_run = self.resumed_from is not None and out.resolve() == self.resumed_from.ckpt_dir.resolve()
        found = [] if same_run else run_dir.previous_run(out, Path(log_dir))
        if found and not overwrite:
            raise AgreedError(str(run_dir.refuse(self.out_dir, found)))
        if overwrite:
            distributed.barrier()  # every rank has looked before rank 0 deletes
            if found and self.rank == 0:
                run_dir.clear(self.out_dir, log_dir)
            distributed.barrier()
        if same_run and self.rank == 0:
            run_dir.continue_metrics(self.out_dir, self.start_step)

    def engine_config(self, ds_config: dict) -> dict:
        """The DeepSpeed config to build the engine with, set to load a universal checkpoint if need be."""
        if not self.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def start(self, engine, ema, batches, guard, report, run: RunRecord, group_hparams: list[dict]) -> int:
        """Load the checkpoint resumed (if any) into the engine, the EMA and the data stream; the
        same engine, EMA and stream are what every later save writes, `run` what its marjara.json
        records, and `guard` is asked whether a save may happen. Returns the step to continue from."""
        self.engine, self.ema, self.batches, self.guard, self.report, self.run = engine, ema, batches, guard, report, run
        if self.resumed_from is not None:
            self._load(group_hparams)
        return self.start_step

    def _load(self, group_hparams: list[dict]) -> None:
        point, meta, engine, ema = self.resumed_from, self.resumed_from.meta, self.engine, self.ema
        tag = store.universal_tag(point.ckpt_dir, point.tag) if self.universal else point.tag
        load_path, _ = engine.load_checkpoint(str(point.ckpt_dir), tag=tag)
        if load_path is None:
            raise MarjaraError(f"DeepSpeed found no checkpoint at {point.ckpt_dir / tag}; resume from another tag")
        if self.universal:
            repair_universal_optimizer(engine, group_hparams)
        same_world = meta.world_size == self.world
        if same_world:
            state = torch.load(point.rank_file(self.rank), weights_only=True)
            store.set_rng_state(state["rng"])
        if ema is not None:
            if meta.ema is None:
                raise MarjaraError(f"--ema_decay is set but checkpoint {point.tag_dir} holds no EMA; resume without it")
            if same_world and meta.ema.layout == ema.layout:
                ema.load_own(state)
            else:
                ema.load_full(ema_tensors(point))
        self.batches.load_state_dict(meta.data_state)
        self.report.print(f"resumed from {point.tag_dir} at step {meta.step} "
                          f"({meta.samples_consumed} samples consumed{', universal' if self.universal else ''}"
                          f"{'' if self.verified else '; saved before checksums, loaded unverified'})")

    def maybe_save(self, step: int) -> None:
        """Save after optimizer step `step` every save_interval steps (0: never), if the guard allows."""
        if self.save_interval > 0 and step % self.save_interval == 0 and self.guard.allows_save:
            self.save(step)

    def save_unless_saved(self, step: int) -> None:
        """At the end of a run, or when it is asked to stop: save `step` unless it is saved already."""
        if self.last_saved != step:
            self.save(step)

    def save(self, step: int) -> Path:
        """Save on every rank (a collective); returns the tag folder."""
        # Non-finite weights are never written (the guard skips non-finite steps; this is the net
        # under it). Every rank checks its own weights or ZeRO-3 partitions; all agree.
        if not all_finite(getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()):
            self.report.close()
            raise TrainingDiverged(f"the weights hold NaN or inf at step {step}; nothing was saved and "
                                   f"{self.out_dir} is as it was; resume from its last checkpoint with a lower "
                                   "--lr, or with --skip_samples past the data of the last steps")
        meta = CheckpointMeta.for_save(step, self.batches.state_dict(), self.run,
                                       self.ema.meta() if self.ema is not None else None)
        rank_state = {"rng": store.rng_state(), "ema": {}, "ema_shapes": {}}
        if self.ema is not None:
            rank_state.update(self.ema.state_dict())
        tag_dir = store.save(self.engine, self.out_dir, meta, rank_state, self.keep_last)
        self.last_saved = step
        self.report.print(f"step {step:>6} | saved {tag_dir}")
        return tag_dir
