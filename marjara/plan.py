"""Plan a run before booking it: memory per GPU, communication and time, and a recommendation.

    python -m marjara.plan --model_size large --seq_len 1024 --nodes 8 --gpus_per_node 8 --gpu H100 \\
        --global_batch_tokens 4194304 --tokens 1e12 --write_config ds_plan.json

The flags are marjara/planner/inputs.py's (train.py's own, plus the cluster's); the work is
marjara/planner/run.py's.
"""

from __future__ import annotations

import marjara  # noqa: F401  (sets DeepSpeed's accelerator before deepspeed is imported)
from marjara.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from marjara.planner.inputs import build_parser
    from marjara.planner.run import run_plan

    return run_plan(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
