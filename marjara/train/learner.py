"""The Learner: the DeepSpeed engine around MarjaraModel, and the loop that trains it.

The loop only steps and asks its collaborators: StepMeter (log lines), Evaluator (validation),
Saver / Resume (checkpoints), StopRequests (SIGTERM/SIGINT), the EMA, and at the end
verify_replicas and print_sample.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

from marjara.data import TrainStream, open_data, validation_batches
from marjara.distributed import ensure_process_group, rank, world_size
from marjara.model.pretrained import read_folder
from marjara.train import init_from
from marjara.model.expert_init import init_experts
from marjara.model.tiled_mlp import enable_tiled_mlp
from marjara.train.allocator import active_allocator
from marjara.train.batches import DeviceBatches
from marjara.compat import engine_leaves_loss_unscaled, loss_for_backward
from marjara.train.build import build_engine, build_model, compile_model, model_config, quiet_libraries
from marjara.train.config import TrainConfig
from marjara.train.ema import WeightEMA
from marjara.train.evaluator import Evaluator
from marjara.errors import EXIT_NON_FINITE
from marjara.train.metrics import Reporter, device_peak_tflops
from marjara.train.nonfinite import NonFiniteGuard, stop_line
from marjara.train.replicas import verify_replicas
from marjara.train.resume import Resume
from marjara.train.run_dir import METRICS_FILE, claim_agreed
from marjara.train.sample import print_sample
from marjara.train.saver import Saver
from marjara.train.sequence_parallel import Layout, ShardedStream, check_layout
from marjara.train.signals import StopRequests
from marjara.train.step_metrics import StepMeter


class Learner:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        ensure_process_group()
        self.rank, self.world = rank(), world_size()
        quiet_libraries(self.rank)
        resume = Resume(cfg.resume, cfg.zero_stage, self.world, self.rank) if cfg.resume else None
        self.resumed_from = resume.point if resume else None

        init = read_folder(cfg.init_from) if cfg.init_from else None
        tokenizer = init_from.data_tokenizer(init, cfg.data, cfg.tokenizer) if init else cfg.tokenizer
        self.data = open_data(cfg.data, cfg.seq_len, tokenizer)
        if init:
            init_from.check_data_tokenizer(init, self.data.tokenizer_name, self.data.description)
        self.config = init_from.init_model_config(init, cfg) if init else model_config(cfg, self.data.vocab_size)
        self.data.check_model_vocab(self.config.vocab_size)
        check_layout(cfg.sp_size, self.config, cfg.seq_len, self.world)
        self.layout = Layout(cfg.sp_size, cfg.zero_stage, self.rank, self.world)  # sequence and data ranks
        dp_rank, dp_world = self.layout.dp_rank, self.layout.dp_world
        ds_config = cfg.engine_config(dp_world)
        if resume:
            resume.check_compatible(self.config, self.data.tokenizer_name)
        # Every input is checked by now: a refused run has written nothing. One run per folder.
        claim_agreed(cfg.out_dir, cfg.log_dir, self.resumed_from, cfg.overwrite, self.rank, self.world)
        self.report = Reporter(self.rank == 0, cfg.log_dir, Path(cfg.out_dir) / METRICS_FILE, cfg.max_steps,
                               resume.step if resume else 0, resumed=resume is not None)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(self.config, cfg.grad_checkpointing, ds_config)
        self.layout.attach(model)
        if cfg.tiled_mlp:
            enable_tiled_mlp(model)
        if self.config.use_moe:
            # Distinct per expert-parallel rank, the same per replica.
            init_experts(model, cfg.seed, bool(ds_config.get("use_data_before_expert_parallelism", False)))
        if init and not resume:  # a resumed run has trained weights of its own
            init_from.load_init_weights(model, init, ds_config)
            self.report.print(f"initialised from {init.describe()}")
        self.engine, group_hparams = build_engine(model, cfg, resume.engine_config(ds_config) if resume else ds_config,
                                                 mpu=self.layout.mpu)
        self.model = self.engine.module
        self.loss_unscaled = engine_leaves_loss_unscaled(self.engine.optimizer)  # ZeRO-0 fp16: see compat
        self.ema = WeightEMA(self.model, cfg.ema_decay, cfg.zero_stage) if cfg.ema_decay > 0 else None
        self.step, samples_consumed = resume.load(self.engine, self.ema, group_hparams, self.report) if resume else (0, 0)
        if cfg.skip_samples:
            self.report.print(f"--skip_samples {cfg.skip_samples}: stepping over global samples {samples_consumed}.."
                              f"{samples_consumed + cfg.skip_samples - 1}")
            samples_consumed += cfg.skip_samples
        self.guard = NonFiniteGuard(cfg.max_bad_steps, enabled=cfg.mixed_precision != "fp16")
        stream = TrainStream(self.data.train, cfg.seed, cfg.batch_size, cfg.grad_accum, dp_rank, dp_world,
                             samples_consumed)
        self.batches = DeviceBatches(ShardedStream(stream, self.layout), self.engine.device)
        val_sets = ([(name, weight, [self.layout.shard(b) for b in validation_batches(
                        dataset, cfg.batch_size, cfg.eval_batches, dp_rank, dp_world)])
                     for name, weight, dataset in self.data.validation_sets()] if cfg.eval_interval > 0 else [])
        if cfg.compile:
            compile_model(self.engine, self.config, self.report)

        self.evaluator = Evaluator(self.engine, val_sets, self.ema, self.report, cfg.moe_eval_routing)
        run_meta = {"seq_len": cfg.seq_len, "model_config": self.config.to_dict(), "tokenizer": self.data.tokenizer_name,
                    "zero_stage": cfg.zero_stage, "world_size": self.world, "dtype": cfg.mixed_precision,
                    "train_args": cfg.plain_values()}
        self.saver = Saver(self.engine, cfg.out_dir, cfg.keep_last, run_meta, self.ema, self.report,
                           last_saved=self.step if resume else -1)
        self.meter: StepMeter | None = None

    def fit(self) -> int:
        """Train to max_steps, or until SIGTERM/SIGINT (then save and stop); returns the exit code."""
        cfg = self.cfg
        with StopRequests() as stop:
            self.meter = self._start()
            while self.step < cfg.max_steps:
                skipped_before, first_sample = self.engine.skipped_steps, self.batches.samples_consumed
                self.train_step()
                self.step += 1
                last = self.step == cfg.max_steps
                # The one host sync of the step: the stop signal and the non-finite flag, agreed together.
                signum, loss_bad = stop.agreed_with(self.guard.take_loss_flag())
                if self.guard.end_step(self.step, first_sample, self.engine.skipped_steps > skipped_before, loss_bad):
                    self._report_bad_step()
                if self.guard.must_stop:  # every rank agrees; the run ends the usual way, with exit code 3
                    return self._stop_non_finite()
                if self.ema is not None:
                    self.ema.update()
                self.report.advance()
                self.meter.end_step(self.step, log=self.step % cfg.log_interval == 0 or last)
                if cfg.eval_interval > 0 and (self.step % cfg.eval_interval == 0 or last):
                    self.evaluator.run(self.step)
                # Not in the middle of a non-finite streak: `latest` keeps naming the last good step.
                if cfg.save_interval > 0 and self.step % cfg.save_interval == 0 and not self.guard.in_a_row:
                    self.saver.save(self.step, self.batches.samples_consumed)
                if signum:
                    return self._stop(signum)
            self.saver.save_unless_saved(self.step, self.batches.samples_consumed)
            verify_replicas(self.model, self.world, cfg.zero_stage, self.report)
            print_sample(self.model, self.data.tokenizer, self.config.max_seq_len, cfg.sample_tokens, cfg.seed,
                         self.report)
            self.report.close()
            return 0

    def train_step(self) -> None:
        """One optimizer step: grad_accum micro-batches; the engine steps the optimizer at the boundary.
        Nothing here waits for the device: the next micro-batch is cut and copied while this one
        computes, and the loss is summed on the device."""
        engine = self.engine
        for _ in range(self.cfg.grad_accum):
            x, y = self.batches.next()
            _, loss = engine(x, y)
            self.guard.observe_loss(loss)  # on the device: no synchronisation per micro-batch
            engine.backward(loss_for_backward(engine, loss, self.loss_unscaled))
            self.batches.prefetch()
            if engine.is_gradient_accumulation_boundary():
                self.meter.before_optimizer_step()
            engine.step()
            self.meter.add_micro_batch(loss, self.cfg.grad_accum)

    def _start(self) -> StepMeter:
        """Print the run's start line; returns the meter of its steps."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.layout.dp_world * cfg.seq_len
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
        peak, peak_source = device_peak_tflops(cfg.peak_tflops, dtype)
        self.report.print(
            f"world_size={self.world} zero_stage={cfg.zero_stage} precision={cfg.mixed_precision} "
            f"model={self.config.preset} ({self.model.num_parameters() / 1e6:.2f}M params, "
            f"{self.model.num_active_parameters() / 1e6:.2f}M active) data={self.data.description} "
            f"tokenizer={self.data.tokenizer_name} global_batch={tokens_per_step} tokens "
            f"peak={peak:.2f} TFLOP/s ({peak_source})"
            + ("" if torch.cuda.is_available() else f" malloc={active_allocator()}"))
        if self.data.is_mixture:
            samples = cfg.max_steps * cfg.batch_size * cfg.grad_accum * self.layout.dp_world
            self.report.print(f"mixture: {self.data.train.summary(samples)}")
        return StepMeter(self.engine, self.model, self.report, self.world, tokens_per_step,
                         self.model.flops_per_token(cfg.seq_len), peak, cfg.mixed_precision, cfg.zero_stage)

    def _report_bad_step(self) -> None:
        g = self.guard
        self.report.log(self.step, {"train/non_finite_steps": g.total})
        self.report.print(f"step {self.step:>6} | non-finite loss or gradient norm: update skipped "
                          f"({g.in_a_row} in a row of at most {g.max_bad_steps}, {g.total} in this run)")

    def _stop_non_finite(self) -> int:
        if self.rank == 0:
            line = stop_line(self.guard, self.step, self.batches.samples_consumed, self.cfg.out_dir, self.resumed_from)
            print(f"error: {line}", file=sys.stderr, flush=True)
        self.report.close()
        return EXIT_NON_FINITE

    def _stop(self, signum: int) -> int:
        self.saver.save_unless_saved(self.step, self.batches.samples_consumed)
        self.report.print(f"{signal.Signals(signum).name}: saved checkpoint at step {self.step} in {self.cfg.out_dir}; "
                          f"continue with --resume {self.cfg.out_dir}")
        self.report.close()
        return 128 + signum
