"""Decode speed: KV cache vs. recomputing the prefix, and one batch of 8 vs. one prompt at a time.

Both sides of each ratio are measured in this run, on this machine:
    python bench/generate.py [--preset small] [--prompt_len 256] [--new_tokens 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from marjara.model.config import ModelConfig
from marjara.model import MarjaraModel
from marjara.model.generation import output_head


@torch.no_grad()
def decode_without_cache(model: MarjaraModel, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = torch.tensor([prompt])
    head = output_head(model)  # the same output projection as generate() uses
    for _ in range(new_tokens):
        last = model.hidden_states(tokens)[:, -1]
        tokens = torch.cat([tokens, head(last).argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):].tolist()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--batch_new_tokens", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset, max_seq_len=args.prompt_len + args.new_tokens)
    model = MarjaraModel(config, inference=True).eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,)).tolist()
    print(f"preset {args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")

    model.generate([prompt[:8]], 4, temperature=0)  # warm-up
    cached, t_cache = timed(lambda: model.generate([prompt], args.new_tokens, temperature=0)[0])
    plain, t_plain = timed(lambda: decode_without_cache(model, prompt, args.new_tokens))
    agree = sum(a == b for a, b in zip(cached, plain)) / args.new_tokens
    print(f"{args.prompt_len}-token prompt, {args.new_tokens} new tokens:")
    print(f"  KV cache        {args.new_tokens / t_cache:8.1f} tok/s")
    print(f"  recompute       {args.new_tokens / t_plain:8.1f} tok/s")
    print(f"  speed-up        {t_plain / t_cache:8.2f}x   (goal >= 5x; greedy tokens agree: {agree:.0%})")

    lengths = [16, 48, 80, 112, 144, 176, 208, 240]
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in lengths]
    n = args.batch_new_tokens
    batched, t_batch = timed(lambda: model.generate(prompts, n, temperature=0))
    single, t_single = timed(lambda: [model.generate([p], n, temperature=0)[0] for p in prompts])
    total = n * len(prompts)
    print(f"8 prompts of {lengths[0]}..{lengths[-1]} tokens, {n} new tokens each:")
    print(f"  one batch       {total / t_batch:8.1f} tok/s")
    print(f"  one by one      {total / t_single:8.1f} tok/s")
    print(f"  speed-up        {t_single / t_batch:8.2f}x   (goal >= 3x; identical tokens: {batched == single})")


if __name__ == "__main__":
    main()
