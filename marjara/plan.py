"""Plan a run before booking it: memory per GPU, communication and time, and a recommendation.

    python -m marjara.plan --model_size large --seq_len 1024 --nodes 8 --gpus_per_node 8 --gpu H100 \\
        --global_batch_tokens 4194304 --tokens 1e12 --write_config ds_plan.json
"""

from __future__ import annotations

import json

import marjara  # noqa: F401  (sets DeepSpeed's accelerator before deepspeed is imported)
from marjara.errors import cli_entry

EXIT_DOES_NOT_FIT = 1


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from marjara.planner.ds_config import write_config
    from marjara.planner.inputs import build_parser, setup_from_args
    from marjara.planner.recommend import recommend
    from marjara.planner.report import as_json, describe, recommendation_text, table_text

    args = build_parser().parse_args(argv)
    setup, target, fixed_zero = setup_from_args(args)
    table, chosen = recommend(setup, target, fixed_zero)
    setup = table[0].setup  # the table's: recommend may start at a sequence parallelism of its own
    if chosen is not None and args.write_config:
        write_config(chosen, args.write_config)
    if args.json:
        print(json.dumps(as_json(setup, table, chosen, args.tokens), indent=2))
    else:
        print(describe(setup))
        print(table_text(table, args.tokens, target.mfu))
        print(recommendation_text(chosen, args.write_config if chosen else None))
    return 0 if chosen is not None else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    raise SystemExit(main())
