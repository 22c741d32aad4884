"""Run lm-evaluation-harness on an exported model (or a checkpoint), through lm-eval's own CLI.

    python -m marjara.evaluate MODEL --tasks hellaswag,arc_easy [--include_path DIR] [--limit N]
        [--output_path results/] [--batch_size 16] [--num_fewshot K] [...any other lm-eval flag]

MODEL is the OUT_DIR of python -m marjara.convert, or a checkpoint folder (--tag, --ema select
what to convert). lm-eval cannot discover models from other packages, so this registers the
"marjara" model and then hands the command line to lm-eval. Needs the eval extra:
pip install -e '.[eval]' in the MARJARA checkout. The work is marjara/eval/harness.py's.
"""

from __future__ import annotations

import argparse

from marjara.dtypes import WEIGHT_FLAGS
from marjara.errors import cli_entry


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m marjara.evaluate", description=__doc__.splitlines()[0],
                                     epilog="Other flags go to lm-eval unchanged (see lm-eval run --help).")
    parser.add_argument("model", help="exported model folder (python -m marjara.convert) or checkpoint folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, or task YAML files")
    parser.add_argument("--tag", default=None, help="checkpoint folders only: the tag to convert (default: latest)")
    parser.add_argument("--ema", action="store_true", help="checkpoint folders only: use the EMA weights")
    parser.add_argument("--dtype", choices=list(WEIGHT_FLAGS), default=None, help="weights' dtype (default: as exported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", default="16", help="sequences per forward pass")
    return parser.parse_known_args(argv)


@cli_entry
def main(argv=None) -> int:
    args, rest = parse_args(argv)
    from marjara.eval.harness import run_lm_eval

    run_lm_eval(args.model, args.tasks, rest, tag=args.tag, ema=args.ema, dtype=args.dtype, device=args.device,
                batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
