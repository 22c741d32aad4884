"""python -m marjara.plan's work on its parsed flags: the table of candidates, the recommendation,
and the DeepSpeed JSON of the recommended run (--write_config)."""

from __future__ import annotations

import argparse
import json

from marjara.planner.write_config import write_config
from marjara.planner.inputs import setup_from_args
from marjara.planner.recommend import recommend
from marjara.planner.report import as_json, describe, recommendation_text, table_text

EXIT_DOES_NOT_FIT = 1


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan (a table, or --json); the exit status: 0, or EXIT_DOES_NOT_FIT when nothing fits."""
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
