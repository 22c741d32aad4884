"""Convert a MARJARA DeepSpeed checkpoint (any ZeRO stage, any number of ranks, dense or MoE), or an
exported model, into MARJARA's format (model.safetensors + config.json, for MarjaraModel.from_pretrained)
or the Hugging Face layout (--format hf: Qwen3 / Qwen3-MoE, for transformers, vLLM, SGLang, ...).

    python -m marjara.convert CKPT_DIR|MODEL_DIR OUT_DIR [--format marjara|hf] [--tag TAG] [--ema]
                              [--dtype fp32|bf16] [--max_shard_size 5GB] [--overwrite]

No launcher needed. Weights stream from one checkpoint file at a time into the output files, so
peak memory stays near one copy of the output (see bench/convert.py). The work is
marjara/checkpoint/conversion.py's.
"""

from __future__ import annotations

import argparse

from marjara.checkpoint.conversion import FORMATS, convert, summary
from marjara.dtypes import WEIGHT_FLAGS
from marjara.errors import cli_entry

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m marjara.convert", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="the checkpoint folder a training run wrote (holds 'latest'), or an exported model")
    parser.add_argument("out_dir", help="folder for the exported model")
    parser.add_argument("--format", choices=FORMATS, default="marjara",
                        help="marjara: model.safetensors + config.json for MARJARA; hf: the Hugging Face layout "
                        "(Qwen3 / Qwen3-MoE) that transformers loads")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: the 'latest' one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    parser.add_argument("--dtype", choices=sorted(WEIGHT_FLAGS), default="fp32", help="dtype of the exported weights")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="--format hf: weights above this size are split into shards with an index file")
    parser.add_argument("--overwrite", action="store_true", help="replace a different model already in OUT_DIR")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    shard_size = None
    if args.format == "hf":
        from marjara.hf.export import parse_size

        shard_size = parse_size(args.max_shard_size)
    out = convert(args.ckpt_dir, args.out_dir, tag=args.tag, ema=args.ema, dtype=WEIGHT_FLAGS[args.dtype],
                  overwrite=args.overwrite, format=args.format, max_shard_size=shard_size)
    print(summary(out, args.format))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
