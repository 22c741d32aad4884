"""The Learner: the DeepSpeed engine around MarjaraModel, and the loop that trains it.

The loop only steps; its collaborators decide their own timing: StepMeter.maybe_log (log lines),
Evaluator.maybe_validate (validation), Checkpointer.maybe_save (checkpoints; it asks the
NonFiniteGuard, which alone decides what a bad step is and when the run stops), StopRequests
(SIGTERM/SIGINT), the EMA, and at the end verify_replicas and print_sample.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

from marjara.data import TrainStream, open_data, validation_batches
from marjara.distributed import ensure_process_group, rank, world_size
from marjara.dtypes import PRECISIONS
from marjara.model.pretrained import read_folder
from marjara.train import init_from
from marjara.model.expert_init import init_experts
from marjara.model.tiled_mlp import enable_tiled_mlp
from marjara.train.allocator import active_allocator
from marjara.train.batches import DeviceBatches
from marjara.compat.deepspeed import engine_leaves_loss_unscaled, loss_for_backward, skipped_steps
from marjara.checkpoint.format import RunRecord
from marjara.train.build import build_engine, build_model, compile_model, model_config, quiet_libraries
from marjara.train.checkpointer import Checkpointer
from marjara.train.config import TrainConfig
from marjara.train.ema import WeightEMA
from marjara.train.evaluator import Evaluator
from marjara.errors import EXIT_NON_FINITE
from marjara.train.metrics import Reporter, device_peak_tflops
from marjara.train.nonfinite import NonFiniteGuard, stop_line
from marjara.train.replicas import verify_replicas
from marjara.train.run_dir import METRICS_FILE
from marjara.train.sample import print_sample
from marjara.train.sequence_parallel import Layout, check_layout
from marjara.train.signals import StopRequests
from marjara.train.step_metrics import StepMeter


class Learner:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        ensure_process_group()
        self.rank, self.world = rank(), world_size()
        quiet_libraries(self.rank)
        ckpt = cfg.checkpoint
        self.checkpointer = checkpointer = Checkpointer(ckpt.out_dir, ckpt.keep_last, ckpt.save_interval, ckpt.resume,
                                                        cfg.optim.zero_stage)

        init = read_folder(cfg.model.init_from) if cfg.model.init_from else None
        tokenizer = init_from.data_tokenizer(init, cfg.data.source, cfg.data.tokenizer) if init else cfg.data.tokenizer
        self.data = open_data(cfg.data.source, cfg.data.seq_len, tokenizer)
        if init:
            init_from.check_data_tokenizer(init, self.data.tokenizer_name, self.data.description)
        self.config = init_from.init_model_config(init, cfg) if init else model_config(cfg, self.data.vocab_size)
        self.data.check_model_vocab(self.config.vocab_size)
        check_layout(cfg.optim.sp_size, self.config, cfg.data.seq_len, self.world)
        self.layout = Layout(cfg.optim.sp_size, cfg.optim.zero_stage, self.rank, self.world)  # sequence and data ranks
        dp_rank, dp_world = self.layout.dp_rank, self.layout.dp_world
        ds_config = cfg.engine_config(dp_world)
        checkpointer.check_resume(self.config, self.data.tokenizer_name)
        # Every input is checked by now: a refused run has written nothing. One run per folder.
        checkpointer.claim(cfg.run.log_dir, cfg.checkpoint.overwrite)
        self.report = Reporter(self.rank == 0, cfg.run.log_dir, Path(ckpt.out_dir) / METRICS_FILE,
                               cfg.optim.max_steps, checkpointer.start_step,
                               resumed=checkpointer.resumed_from is not None)

        torch.manual_seed(cfg.optim.seed)  # identical initial weights on every rank
        model = build_model(self.config, cfg.optim.grad_checkpointing, ds_config)
        self.layout.attach(model)
        if cfg.optim.tiled_mlp:
            enable_tiled_mlp(model)
        if self.config.use_moe:
            # Distinct per expert-parallel rank, the same per replica.
            init_experts(model, cfg.optim.seed, bool(ds_config.get("use_data_before_expert_parallelism", False)))
        if init and checkpointer.resumed_from is None:  # a resumed run has trained weights of its own
            init_from.load_init_weights(model, init, ds_config)
            self.report.print(f"initialised from {init.describe()}")
        self.engine, group_hparams = build_engine(model, cfg, checkpointer.engine_config(ds_config),
                                                  mpu=self.layout.mpu)
        self.model = self.engine.module
        self.loss_unscaled = engine_leaves_loss_unscaled(self.engine)  # ZeRO-0 fp16: see compat
        self.ema = WeightEMA(self.model, cfg.optim.ema_decay, cfg.optim.zero_stage) if cfg.optim.ema_decay > 0 else None
        stream = TrainStream(self.data.train, cfg.optim.seed, cfg.optim.batch_size, cfg.optim.grad_accum, dp_rank,
                             dp_world)
        self.batches = DeviceBatches(stream, self.engine.device, shard=self.layout.shard)
        self.guard = NonFiniteGuard(cfg.run.max_bad_steps, enabled=cfg.optim.mixed_precision != "fp16",
                                    report=self.report)
        run = RunRecord(seq_len=cfg.data.seq_len, model_config=self.config.to_dict(),
                        tokenizer=self.data.tokenizer_name,
                        zero_stage=cfg.optim.zero_stage, world_size=self.world, dtype=cfg.optim.mixed_precision,
                        train_args=cfg.plain_values())
        self.step = checkpointer.start(self.engine, self.ema, self.batches, self.guard, self.report, run,
                                       group_hparams)
        if cfg.run.skip_samples:
            consumed = self.batches.samples_consumed
            self.report.print(f"--skip_samples {cfg.run.skip_samples}: stepping over global samples {consumed}.."
                              f"{consumed + cfg.run.skip_samples - 1}")
            self.batches.skip(cfg.run.skip_samples)
        val_sets = ([(name, weight, [self.layout.shard(b) for b in validation_batches(
                        dataset, cfg.optim.batch_size, cfg.run.eval_batches, dp_rank, dp_world)])
                     for name, weight, dataset in self.data.validation_sets()] if cfg.run.eval_interval > 0 else [])
        if cfg.optim.compile:
            compile_model(self.engine, self.config, self.report)
        self.evaluator = Evaluator(self.engine, val_sets, self.ema, self.report, cfg.model.moe_eval_routing,
                                   cfg.run.eval_interval, cfg.optim.max_steps)
        self.meter: StepMeter | None = None  # built when fit() starts: it measures the device's peak

    def fit(self) -> int:
        """Train to max_steps, or until SIGTERM/SIGINT (then save and stop); returns the exit code."""
        cfg = self.cfg
        with StopRequests() as stop:
            self.meter = self._start()
            while self.step < cfg.optim.max_steps:
                skipped_before, first_sample = skipped_steps(self.engine), self.batches.samples_consumed
                self.train_step()
                self.step += 1
                # The one host sync of the step: the stop signal and the non-finite flag, agreed together.
                signum, loss_bad = stop.agreed_with(self.guard.take_loss_flag())
                self.guard.end_step(self.step, first_sample, skipped_steps(self.engine) > skipped_before, loss_bad)
                if self.guard.must_stop:  # every rank agrees; the run ends the usual way, with exit code 3
                    return self._stop_non_finite()
                if self.ema is not None:
                    self.ema.update()
                self.meter.maybe_log(self.step)
                self.evaluator.maybe_validate(self.step)
                self.checkpointer.maybe_save(self.step)
                if signum:
                    return self._stop(signum)
            self.checkpointer.save_unless_saved(self.step)
            verify_replicas(self.model, self.world, cfg.optim.zero_stage, self.report)
            print_sample(self.model, self.data.tokenizer, self.config.max_seq_len, cfg.run.sample_tokens,
                         cfg.optim.seed, self.report)
            self.report.close()
            return 0

    def train_step(self) -> None:
        """One optimizer step: grad_accum micro-batches; the engine steps the optimizer at the boundary.
        Nothing here waits for the device: the next micro-batch is cut and copied while this one
        computes, and the loss is summed on the device."""
        engine = self.engine
        for _ in range(self.cfg.optim.grad_accum):
            x, y = self.batches.next()
            output = engine(x, y)
            loss = output.loss
            self.guard.observe_loss(loss)  # on the device: no synchronisation per micro-batch
            engine.backward(loss_for_backward(engine, loss, self.loss_unscaled))
            self.batches.prefetch()
            if engine.is_gradient_accumulation_boundary():
                self.meter.before_optimizer_step()
            engine.step()
            self.meter.add_micro_batch(output, self.cfg.optim.grad_accum)

    def _start(self) -> StepMeter:
        """Print the run's start line; returns the meter of its steps."""
        cfg = self.cfg
        tokens_per_step = cfg.optim.batch_size * cfg.optim.grad_accum * self.layout.dp_world * cfg.data.seq_len
        dtype = PRECISIONS.get(cfg.optim.mixed_precision, torch.float32)
        peak, peak_source = device_peak_tflops(cfg.run.peak_tflops, dtype)
        self.report.print(
            f"world_size={self.world} zero_stage={cfg.optim.zero_stage} precision={cfg.optim.mixed_precision} "
            f"model={self.config.preset} ({self.model.num_parameters() / 1e6:.2f}M params, "
            f"{self.model.num_active_parameters() / 1e6:.2f}M active) data={self.data.description} "
            f"tokenizer={self.data.tokenizer_name} global_batch={tokens_per_step} tokens "
            f"peak={peak:.2f} TFLOP/s ({peak_source})"
            + ("" if torch.cuda.is_available() else f" malloc={active_allocator()}"))
        if self.data.is_mixture:
            samples = cfg.optim.max_steps * cfg.optim.batch_size * cfg.optim.grad_accum * self.layout.dp_world
            self.report.print(f"mixture: {self.data.train.summary(samples)}")
        return StepMeter(self.engine, self.model, self.report, self.world, tokens_per_step,
                         self.model.flops_per_token(cfg.data.seq_len), peak, cfg.optim.mixed_precision,
                         cfg.optim.zero_stage, cfg.run.log_interval, cfg.optim.max_steps)

    def _stop_non_finite(self) -> int:
        if self.rank == 0:
            line = stop_line(self.guard, self.step, self.batches.samples_consumed, self.cfg.checkpoint.out_dir,
                             self.checkpointer.resumed_from)
            print(f"error: {line}", file=sys.stderr, flush=True)
        self.report.close()
        return EXIT_NON_FINITE

    def _stop(self, signum: int) -> int:
        self.checkpointer.save_unless_saved(self.step)
        out_dir = self.cfg.checkpoint.out_dir
        self.report.print(f"{signal.Signals(signum).name}: saved checkpoint at step {self.step} in {out_dir}; "
                          f"continue with --resume {out_dir}")
        self.report.close()
        return 128 + signum
