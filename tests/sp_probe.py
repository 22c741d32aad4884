"""One training micro-batch of train.py's Learner, its loss and every parameter's full gradient
written to a file (rank 0), for tests/test_sequence_parallel_runs.py.

    python tests/sp_probe.py OUT.pt [--n_kv_heads K] [--traps] -- TRAIN.PY FLAGS...

With --traps (sp_size > 1, ZeRO-0) the same batch is run again with each known trap of sequence
parallelism built in on purpose, each result saved under its name: the test shows that every
trap changes the gradients, so the equality of the real path is not an accident.
"""

from __future__ import annotations

import sys

import torch

import marjara  # noqa: F401
from marjara.distributed import shutdown
from marjara.model.config import PRESETS
from marjara.train.args import parse_config
from marjara.train.learner import Learner


def full_grads(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    grads = {}
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param) if engine.zero_optimization_stage() > 0 else param.grad
        grads[name] = grad.detach().float().cpu().clone()
    return grads


def one_step(learner: Learner, batch) -> dict:
    engine = learner.engine
    x, y = batch
    loss = engine(x, y).loss
    engine.backward(loss)
    result = {"loss": loss.detach().float().cpu().item(), "grads": full_grads(engine),
              "x": x.cpu(), "y": y.cpu()}
    for param in engine.module.parameters():
        param.grad = None
    return result


def traps(learner: Learner, batch) -> dict[str, dict]:
    """The same batch through each broken variant of the sequence-parallel path."""
    hook, engine = learner.model.sequence_parallel, learner.engine
    out = {}
    real_positions, real_mean = hook.positions, hook.sample_mean

    # 1. positions restarting at 0 on every shard
    hook.positions = lambda batch_size, local_len, device: torch.arange(local_len, device=device).expand(batch_size, local_len)
    out["positions_from_zero"] = one_step(learner, batch)
    hook.positions = real_positions

    # 2. a per-rank mean loss (each rank's own mean cross-entropy, DeepSpeed's reduction as it is)
    hook.sample_mean = lambda local_sum, local_count: local_sum / local_count
    out["per_rank_mean"] = one_step(learner, batch)
    hook.sample_mean = real_mean

    # 3. labels shifted within each shard only: the shard's last token predicts nothing
    x, y = batch
    local_y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -1)], dim=1)
    out["labels_shifted_per_shard"] = one_step(learner, (x, local_y))

    # 4. gradients not reduced across the sequence ranks
    engine.enable_backward_allreduce = False
    out["unreduced"] = one_step(learner, batch)
    engine.enable_backward_allreduce = True
    return out


def main() -> int:
    args = sys.argv[1:]
    out_path = args.pop(0)
    split = args.index("--")
    own, train_args = args[:split], args[split + 1:]
    if "--n_kv_heads" in own:
        PRESETS["tiny"] = {**PRESETS["tiny"], "n_kv_heads": int(own[own.index("--n_kv_heads") + 1])}
    learner = Learner(parse_config(train_args))
    batch = learner.batches.next()
    result = one_step(learner, batch)
    if "--traps" in own:
        result["traps"] = traps(learner, batch)
    if learner.rank == 0:
        torch.save(result, out_path)
    learner.engine.destroy()
    del learner
    shutdown()
    return 0


if __name__ == "__main__":
    from marjara.distributed import exit_now

    exit_now(main())
