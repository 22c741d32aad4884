"""Sample text from an exported model (or a training checkpoint, converted in memory).

    python -m marjara.generate MODEL --prompt "Once upon a time" [--max_new_tokens 200]
        [--temperature 0.8] [--top_k 200] [--top_p 0.95] [--seed 0]
    python -m marjara.generate MODEL --prompt_file prompts.txt   # one prompt per line, one batch

MODEL is the OUT_DIR of python -m marjara.convert, or a checkpoint folder (--tag, --ema select
what to convert). One prompt streams its tokens as they come; several are generated together as
one batch with the KV cache and printed when done. Generation stops at the end-of-text token.
The work is marjara/checkpoint/inference.py's.
"""

from __future__ import annotations

import argparse

from marjara.dtypes import WEIGHT_FLAGS
from marjara.errors import cli_entry

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m marjara.generate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="exported model folder (python -m marjara.convert) or checkpoint folder")
    parser.add_argument("--prompt", default=None, help="the text to continue ('' samples from scratch)")
    parser.add_argument("--prompt_file", default=None, help="a UTF-8 file of prompts, one per line, generated as one batch")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens; 0 disables")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep tokens up to this probability")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--tag", default=None, help="checkpoint folders only: the tag to convert (default: latest)")
    parser.add_argument("--ema", action="store_true", help="checkpoint folders only: use the EMA weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=sorted(WEIGHT_FLAGS), default=None,
                        help="weights' dtype (default: as exported; a checkpoint: fp32)")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from marjara.checkpoint.inference import generate_from

    generate_from(args.model, args.prompt, args.prompt_file, args.max_new_tokens, args.temperature, args.top_k,
                  args.top_p, args.seed, tag=args.tag, ema=args.ema, device=args.device,
                  dtype=WEIGHT_FLAGS[args.dtype] if args.dtype else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
