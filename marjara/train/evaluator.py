"""Validation: mean cross-entropy over fixed batches on every rank, of the weights and of their EMA.

MoE layers route as eval mode does (every token to its top-k experts), so the loss is reproducible
and equals what the exported model scores, unless moe_routing is "training" (--moe_eval_routing).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from marjara.model.ffn import moe_eval_routing


class Evaluator:
    def __init__(self, engine, batches: list, world: int, ema, report, moe_routing: str = "deterministic") -> None:
        self.engine, self.batches, self.world, self.ema, self.report = engine, batches, world, ema, report
        self.moe_routing = moe_routing

    @torch.no_grad()
    def loss(self) -> float:
        """Mean validation cross-entropy over the fixed validation batches of all ranks."""
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        with moe_eval_routing(self.engine.module, self.moe_routing):
            for x, y in self.batches:
                logits, _ = self.engine(x.to(self.engine.device))
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(logits.device).view(-1),
                                       reduction="sum", ignore_index=-1)
                totals += torch.tensor([loss.item(), int((y != -1).sum())], dtype=torch.float64)
        self.engine.train()
        if self.world > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1])

    def run(self, step: int) -> float:
        """Evaluate and log val/loss, val/ppl (and val/loss_ema with an EMA); returns val/loss."""
        loss = self.loss()
        values = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
        line = f"val loss {loss:.4f} | ppl {values['val/ppl']:.2f}"
        if self.ema is not None:
            with self.ema.swapped_in():
                values["val/loss_ema"] = self.loss()
            line += f" | ema val loss {values['val/loss_ema']:.4f}"
        self.report.log(step, values)
        self.report.print(f"step {step:>6} | {line}")
        return loss
