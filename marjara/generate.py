"""Sample text from an exported model (or a training checkpoint, converted in memory).

    python -m marjara.generate MODEL --prompt "Once upon a time" [--max_new_tokens 200]
        [--temperature 0.8] [--top_k 200] [--top_p 0.95] [--seed 0]
    python -m marjara.generate MODEL --prompt_file prompts.txt   # one prompt per line, one batch

MODEL is the OUT_DIR of python -m marjara.convert, or a checkpoint folder (--tag, --ema select
what to convert). One prompt streams its tokens as they come; several are generated together as
one batch with the KV cache and printed when done. Generation stops at the end-of-text token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import torch

from marjara.errors import MarjaraError, cli_entry
from marjara.model.generation import check_fits
from marjara.data.tokenizer import Tokenizer

DTYPE_FLAGS = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEPARATOR = "-" * 40


class TextStream:
    """Prints the text of a growing token sequence as it becomes final: characters still waiting
    for the rest of their bytes (decoded as U+FFFD for now) are held back."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def close(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise MarjaraError("give either --prompt TEXT or --prompt_file FILE (--prompt '' samples from scratch)")
    if prompt is not None:
        return [prompt]
    path = Path(prompt_file)
    if not path.is_file():
        raise MarjaraError(f"--prompt_file {path}: no such file")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise MarjaraError(f"--prompt_file {path} is not UTF-8 text") from None
    if not lines:
        raise MarjaraError(f"--prompt_file {path} holds no prompt (one per line, blank lines skipped)")
    return lines


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """An empty prompt starts a new document: the end-of-text token that precedes every document."""
    return tokenizer.encode(text) or [tokenizer.eot_id]


def generate_text(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int | None, out: TextIO | None = None) -> list[list[int]]:
    """Generate and print (to stdout by default); returns the new tokens of each prompt."""
    out = out or sys.stdout
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eot_id, seed=seed)
    check_fits(model.config, max(len(e) for e in encoded), max_new_tokens)  # before anything is printed
    if len(prompts) == 1:
        out.write(prompts[0])
        stream = TextStream(tokenizer, out)

        def on_tokens(tokens):
            if tokens[0] is not None:
                stream.push(tokens[0])

        outputs = model.generate(encoded, max_new_tokens, on_tokens=on_tokens, **sampling)
        stream.close()
        out.write("\n")
    else:
        outputs = model.generate(encoded, max_new_tokens, **sampling)
        for prompt, tokens in zip(prompts, outputs):
            out.write(f"{prompt}{tokenizer.decode(tokens)}\n{SEPARATOR}\n")
    out.flush()
    return outputs


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
    parser.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default=None,
                        help="weights' dtype (default: as exported; a checkpoint: fp32)")
    return parser.parse_args(argv)


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MarjaraError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MarjaraError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args.prompt, args.prompt_file)
    from marjara.checkpoint.inference import load_for_inference
    from marjara.model.generation import check_sampling_args

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    check_device(args.device)
    dtype = DTYPE_FLAGS[args.dtype] if args.dtype else None
    model, tokenizer = load_for_inference(args.model, tag=args.tag, ema=args.ema, device=args.device, dtype=dtype)
    generate_text(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
