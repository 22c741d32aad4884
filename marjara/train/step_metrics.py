"""What each log line and tensorboard say about training: loss, lr, throughput, MFU, gradient norm,
fp16 loss scale and skipped steps, MoE load, averaged over the steps since the last line and over
the ranks; a line every `log_interval` steps and at the last. Nothing here reads the device
between log lines: the sums stay where the loss is."""

from __future__ import annotations

import time

import torch

from marjara import distributed
from marjara.compat.deepspeed import current_loss_scale, global_grad_norm, learning_rate, skipped_steps
from marjara.model import ModelOutput
from marjara.train.metrics import mfu_report


class StepMeter:
    def __init__(self, engine, model, report, world: int, tokens_per_step: int, flops_per_token: float, peak: float,
                 precision: str, zero_stage: int, log_interval: int, last_step: int) -> None:
        self.engine, self.model, self.report, self.world = engine, model, report, world
        self.log_interval, self.last_step = log_interval, last_step
        self.tokens_per_step, self.flops_per_token, self.peak, self.precision = (tokens_per_step, flops_per_token,
                                                                                 peak, precision)
        config = model.config
        # DeepSpeed reports the gradient norm under ZeRO and mixed precision, not for plain fp32
        # data parallelism; there every rank holds the whole averaged gradient, so measure it here.
        self.measure_grad_norm = (zero_stage == 0 and precision == "fp32"
                                  and not (config.use_moe and config.ep_size > 1))
        self.grad_norm: torch.Tensor | None = None  # on the device until a log line reads it
        self.lr: float | None = None
        self.sums: torch.Tensor | None = None  # loss, aux loss over the log interval, on the device
        self.expert_counts: dict[int, torch.Tensor] = {}  # the last micro-batch's, on the device
        self.window_steps, self.window_start = 0, time.perf_counter()

    def before_optimizer_step(self) -> None:
        """At the accumulation boundary, before engine.step() advances the scheduler and clears grads."""
        self.lr = learning_rate(self.engine)
        if self.measure_grad_norm:
            norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = torch.stack(norms).norm() if norms else None

    def add_micro_batch(self, output: ModelOutput, grad_accum: int) -> None:
        """`output`: the micro-batch's forward (with targets)."""
        loss, aux = output.loss, output.aux_loss
        values = torch.stack([loss.detach().float(), aux.detach().float() if aux is not None
                              else torch.zeros((), device=loss.device)]) / grad_accum
        self.sums = values if self.sums is None else self.sums + values
        self.expert_counts = output.expert_counts

    def maybe_log(self, step: int) -> None:
        """After optimizer step `step`: advance the progress bar; log a line if it is time."""
        self.report.advance()
        self.window_steps += 1
        if step % self.log_interval == 0 or step == self.last_step:
            elapsed = time.perf_counter() - self.window_start
            self._log(step, self.sums / self.window_steps, self.tokens_per_step * self.window_steps / elapsed)
            self.sums = None
            self.window_steps, self.window_start = 0, time.perf_counter()

    def _log(self, step: int, means: torch.Tensor, tokens_per_sec: float) -> None:
        loss, aux = (distributed.all_reduce(means) / self.world).tolist()
        values = {"train/loss": loss, "train/lr": self.lr, "train/tokens_per_sec": tokens_per_sec}
        mfu_values, mfu_line = mfu_report(self.flops_per_token, tokens_per_sec, self.peak, self.world)
        values.update(mfu_values)
        grad_norm = global_grad_norm(self.engine)
        if grad_norm is None:
            grad_norm = self.grad_norm
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        if self.precision == "fp16":
            scale = current_loss_scale(self.engine.optimizer)
            if scale is not None:
                values["train/loss_scale"] = scale
            values["train/skipped_steps"] = float(skipped_steps(self.engine))
        if torch.cuda.is_available():  # the allocator's own count: no device sync
            values["train/gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.model.config.use_moe:
            values["moe/aux_loss"] = aux
            for layer, counts in self.expert_counts.items():
                counts = counts.float()
                values[f"moe/expert_load_max_over_mean/layer{layer}"] = float(counts.max() / counts.mean().clamp(min=1))
        line = f"loss {loss:.4f} | lr {self.lr:.2e} | {tokens_per_sec:,.0f} tok/s" + mfu_line
        self.report.log(step, values, line)
