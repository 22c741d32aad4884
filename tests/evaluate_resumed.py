"""Validates a train.py checkpoint again through the run's own Learner and Evaluator.

    torchrun --nproc_per_node 2 tests/evaluate_resumed.py OUT.json TRAIN_FLAGS... --resume CKPT/TAG

Builds train.py's Learner from TRAIN_FLAGS (resumed, so at the checkpoint's step) and runs its
validation twice, logging val/loss to OUT_DIR/metrics.jsonl; before each, every rank seeds torch's
generator differently (DeepSpeed's gate draws from it). Then validates twice more with the
training-time gate (--moe_eval_routing training). Writes from rank 0
{"deterministic": [loss, loss], "training": [loss, loss]}.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import marjara  # noqa: E402,F401  (selects DeepSpeed's accelerator before deepspeed is imported)
import torch  # noqa: E402

from marjara.distributed import exit_now, rank, shutdown  # noqa: E402
from marjara.train.args import parse_config  # noqa: E402
from marjara.train.learner import Learner  # noqa: E402


def main() -> None:
    out, flags = Path(sys.argv[1]), sys.argv[2:]
    learner = Learner(parse_config(flags))
    losses = {"deterministic": [], "training": []}
    for seed in (100, 200):
        torch.manual_seed(seed + rank())
        losses["deterministic"].append(learner.evaluator.run(learner.step))
    learner.evaluator.moe_routing = "training"
    for seed in (300, 400):
        torch.manual_seed(seed + rank())
        losses["training"].append(learner.evaluator.loss())
    learner.report.close()
    if rank() == 0:
        out.write_text(json.dumps(losses))
    learner.engine.destroy()
    del learner
    shutdown()


if __name__ == "__main__":
    main()
    exit_now(0)
