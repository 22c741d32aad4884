"""Resuming a run: the checkpoint to continue from, whether it fits this run, and loading it
(DeepSpeed's engine state, each rank's RNG, the EMA), also on another world size."""

from __future__ import annotations

import torch

from marjara.checkpoint import store as ckpt
from marjara.checkpoint.ema_reader import ema_tensors
from marjara.checkpoint.format import find_resume_point
from marjara.compat import repair_universal_optimizer
from marjara.checkpoint.verify import check_checkpoint
from marjara.errors import AgreedError, MarjaraError
from marjara.model.config import ModelConfig


class Resume:
    def __init__(self, where: str, zero_stage: int, world: int, rank: int) -> None:
        self.where, self.zero_stage, self.world, self.rank = where, zero_stage, world, rank
        try:
            self.point = find_resume_point(where)  # every rank reads the same marjara.json: the same outcome
        except MarjaraError as exc:
            raise AgreedError(str(exc)) from None
        # All ranks check the files against their checksums together, before any is loaded; a
        # problem ends the run on every rank, printed once (by rank 0).
        self.verified = check_checkpoint(self.point, lambda intact: f"--resume {intact.tag_dir}")
        self.meta = self.point.meta
        # ZeRO-1/2/3 partitions saved by another world size load through DeepSpeed's universal format.
        self.universal = zero_stage > 0 and self.meta.world_size != world

    @property
    def step(self) -> int:
        return self.meta.step

    def check_compatible(self, model_config: ModelConfig, tokenizer_name: str) -> None:
        meta = self.meta
        if meta.zero_stage != self.zero_stage:
            raise MarjaraError(
                f"--resume {self.where}: the checkpoint was saved under ZeRO stage {meta.zero_stage}, this run "
                f"uses stage {self.zero_stage}; resume with ds_configs/zero{meta.zero_stage}.json or a copy of it"
            )
        differences = meta.model.differences(model_config)
        if differences:
            raise MarjaraError(
                f"--resume {self.where}: the checkpoint's model differs from this run's ({'; '.join(differences)} "
                "as checkpoint != now); pass the same model flags as the original run"
            )
        if meta.tokenizer != tokenizer_name:
            raise MarjaraError(
                f"--resume {self.where}: the checkpoint was trained with tokenizer {meta.tokenizer!r}, "
                f"this data uses {tokenizer_name!r}; use data prepared with the same tokenizer"
            )

    def engine_config(self, ds_config: dict) -> dict:
        """The DeepSpeed config to build the engine with, set to load a universal checkpoint if need be."""
        if not self.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def load(self, engine, ema, group_hparams: list[dict], report) -> tuple[int, int]:
        """Load the checkpoint into the engine (and the EMA); returns (step, samples consumed)."""
        point, meta = self.point, self.meta
        tag = ckpt.universal_tag(point.ckpt_dir, point.tag) if self.universal else point.tag
        load_path, _ = engine.load_checkpoint(str(point.ckpt_dir), tag=tag)
        if load_path is None:
            raise MarjaraError(f"DeepSpeed found no checkpoint at {point.ckpt_dir / tag}; resume from another tag")
        if self.universal:
            repair_universal_optimizer(engine, group_hparams)
        same_world = meta.world_size == self.world
        if same_world:
            state = torch.load(point.rank_file(self.rank), weights_only=True)
            ckpt.set_rng_state(state["rng"])
        if ema is not None:
            if meta.ema is None:
                raise MarjaraError(f"--ema_decay is set but checkpoint {point.tag_dir} holds no EMA; resume without it")
            if same_world and meta.ema.layout == ema.layout:
                ema.load_own(state)
            else:
                ema.load_full(ema_tensors(point))
        report.print(f"resumed from {point.tag_dir} at step {meta.step} "
                     f"({meta.samples_consumed} samples consumed{', universal' if self.universal else ''}"
                     f"{'' if self.verified else '; saved before checksums, loaded unverified'})")
        return meta.step, meta.samples_consumed

