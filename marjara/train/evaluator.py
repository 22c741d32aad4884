"""Validation: mean cross-entropy over fixed batches on every rank, of the weights and of their EMA."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


class Evaluator:
    def __init__(self, engine, batches: list, world: int, ema, report) -> None:
        self.engine, self.batches, self.world, self.ema, self.report = engine, batches, world, ema, report

    @torch.no_grad()
    def loss(self) -> float:
        """Mean validation cross-entropy over the fixed validation batches of all ranks."""
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for x, y in self.batches:
            logits, _ = self.engine(x.to(self.engine.device))
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(logits.device).view(-1),
                                   reduction="sum", ignore_index=-1)
            totals += torch.tensor([loss.item(), int((y != -1).sum())], dtype=torch.float64)
        self.engine.train()
        if self.world > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    def run(self, step: int) -> None:
        """Evaluate and log val/loss, val/ppl (and val/loss_ema with an EMA)."""
        loss = self.loss()
        values = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        line = f"val loss {loss:.4f} | ppl {values['val/ppl']:.2f}"
        if self.ema is not None:
            with self.ema.swapped_in():
                values["val/loss_ema"] = self.loss()
            line += f" | ema val loss {values['val/loss_ema']:.4f}"
        self.report.log(step, values)
        self.report.print(f"step {step:>6} | {line}")
