"""What each log line and tensorboard say about training: loss, lr, throughput, MFU, gradient norm,
fp16 loss scale and MoE load, averaged over the steps since the last line and over the ranks."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class StepMeter:
    def __init__(self, engine, model, report, world: int, tokens_per_step: int, flops_per_token: float, peak: float,
                 precision: str, zero_stage: int) -> None:
        self.engine, self.model, self.report, self.world = engine, model, report, world
        self.tokens_per_step, self.flops_per_token, self.peak, self.precision = (tokens_per_step, flops_per_token,
                                                                                 peak, precision)
        config = model.config
        # DeepSpeed reports the gradient norm under ZeRO and mixed precision, not for plain fp32
        # data parallelism; there every rank holds the whole averaged gradient, so measure it here.
        self.measure_grad_norm = (zero_stage == 0 and precision == "fp32"
                                  and not (config.use_moe and config.ep_size > 1))
        self.grad_norm: float | None = None
        self.lr: float | None = None
        self.sums = torch.zeros(2)  # loss, aux loss over the log interval
        self.window_steps, self.window_start = 0, time.perf_counter()

    def before_optimizer_step(self) -> None:
        """At the accumulation boundary, before engine.step() advances the scheduler and clears grads."""
        self.lr = self.engine.get_lr()[0]
        if self.measure_grad_norm:
            norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = float(torch.stack(norms).norm()) if norms else 0.0

    def add_micro_batch(self, loss: torch.Tensor, grad_accum: int) -> None:
        aux = self.model.last_aux_loss
        self.sums += torch.stack([loss.detach().float().cpu(),
                                  aux.detach().float().cpu() if aux is not None else torch.zeros(())]) / grad_accum

    def end_step(self, step: int, log: bool) -> None:
        self.window_steps += 1
        if log:
            elapsed = time.perf_counter() - self.window_start
            self._log(step, self.sums / self.window_steps, self.tokens_per_step * self.window_steps / elapsed)
            self.sums.zero_()
            self.window_steps, self.window_start = 0, time.perf_counter()

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().float().cpu()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        return values

    def _log(self, step: int, means: torch.Tensor, tokens_per_sec: float) -> None:
        loss, aux = self._mean_over_ranks(means).tolist()
        values = {"train/loss": loss, "train/lr": self.lr, "train/tokens_per_sec": tokens_per_sec}
        if self.peak > 0:
            values["train/mfu"] = self.flops_per_token * tokens_per_sec / (self.peak * 1e12 * self.world)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.grad_norm
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        if self.precision == "fp16":
            values["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
        if self.model.config.use_moe:
            values["moe/aux_loss"] = aux
            for layer, counts in self.model.last_expert_counts.items():
                counts = counts.float()
                values[f"moe/expert_load_max_over_mean/layer{layer}"] = float(counts.max() / counts.mean().clamp(min=1))
        line = f"loss {loss:.4f} | lr {self.lr:.2e} | {tokens_per_sec:,.0f} tok/s"
        if "train/mfu" in values:
            line += f" | mfu {values['train/mfu']:.1%}"
        self.report.log(step, values, line)
