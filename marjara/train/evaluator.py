"""Validation: mean cross-entropy over fixed batches on every rank, of the weights and of their EMA.

MoE layers route as eval mode does (every token to its top-k experts), so the loss is reproducible
and equals what the exported model scores, unless moe_routing is "training" (--moe_eval_routing).

A mixture has one validation set per source: each is logged as val/loss/<name> and
val/ppl/<name>, and val/loss / val/ppl are the weighted total (weights as in the mixture).
"""

from __future__ import annotations

import math

import torch

from marjara import distributed
from marjara.model.ffn import moe_eval_routing


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Evaluator:
    """`sets`: (name, weight, this rank's batches) per validation set; one unnamed set of weight 1
    for single-source data. maybe_validate() runs every `interval` steps and at `last_step`
    (interval 0: never)."""

    def __init__(self, engine, sets: list[tuple[str, float, list]], ema, report, moe_routing: str,
                 interval: int, last_step: int) -> None:
        self.engine, self.sets, self.ema, self.report = engine, sets, ema, report
        self.moe_routing = moe_routing
        self.interval, self.last_step = interval, last_step

    def maybe_validate(self, step: int) -> float | None:
        """Validate after optimizer step `step` if it is time; returns val/loss then, else None."""
        if self.interval > 0 and (step % self.interval == 0 or step == self.last_step):
            return self.run(step)
        return None

    def loss(self) -> float:
        """The validation loss: the weighted total over the sets (a single source's own loss)."""
        return self.losses()[0]

    @torch.no_grad()
    def set_loss(self, batches: list) -> float:
        """Mean validation cross-entropy over one set's fixed batches, of all ranks, through the
        same chunked output head as training (marjara/model/head.py). The sums stay on the device;
        the one read is of the all-reduced totals."""
        engine = self.engine
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
        with moe_eval_routing(engine.module, self.moe_routing):
            for x, y in batches:
                x, y = x.to(engine.device, non_blocking=True), y.to(engine.device, non_blocking=True)
                out = engine(x, y)  # the chunked head: no batch-wide fp32 logits
                totals += torch.stack([out.ce_sum.double(), out.ce_tokens.double()])
        engine.train()
        totals = distributed.all_reduce(totals).tolist()
        return totals[0] / totals[1]

    def losses(self) -> tuple[float, dict[str, float]]:
        """(weighted total, loss of each named set)."""
        each = {name: self.set_loss(batches) for name, _, batches in self.sets}
        return sum(weight * each[name] for name, weight, _ in self.sets), each

    def run(self, step: int) -> float:
        """Evaluate and log val/loss, val/ppl, per source for a mixture (and val/loss_ema with an EMA);
        returns val/loss."""
        loss, each = self.losses()
        values = {"val/loss": loss, "val/ppl": perplexity(loss)}
        line = f"val loss {loss:.4f} | ppl {values['val/ppl']:.2f}"
        named = {name: value for name, value in each.items() if name}
        for name, value in named.items():
            values[f"val/loss/{name}"] = value
            values[f"val/ppl/{name}"] = perplexity(value)
        if named:
            line += " | " + " | ".join(f"{name} {value:.4f}" for name, value in named.items())
        if self.ema is not None:
            with self.ema.swapped_in():
                values["val/loss_ema"] = self.loss()
            line += f" | ema val loss {values['val/loss_ema']:.4f}"
        self.report.log(step, values)
        self.report.print(f"step {step:>6} | {line}")
        return loss
