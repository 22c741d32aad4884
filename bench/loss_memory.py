"""Peak memory of the loss with a large vocabulary: the plain output head + cross-entropy over the
whole micro-batch vs. MARJARA's chunked one (marjara/model/head.py). Both are measured in this run,
each in a fresh process:

    python bench/loss_memory.py [--mode train|validation] [--preset small] [--vocab 100352]
                                [--batch_size 4] [--seq_len 1024]

--mode train (the default): one training step (forward, backward, AdamW step). --mode validation:
one validation batch (eval mode, no gradients), the full fp32 logits' cross-entropy the evaluator
used to compute vs. the chunked head it uses now.

The figure is the step's peak above the memory held just before it (model, and for training the
gradients and AdamW state, already allocated by a warm-up step): torch.cuda.max_memory_allocated
on a GPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on a CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import marjara  # noqa: E402,F401
from marjara.errors import MarjaraError, cli_entry  # noqa: E402
from marjara.model import MarjaraModel  # noqa: E402
from marjara.model.config import PRESETS, ModelConfig  # noqa: E402


def plain_loss(model: MarjaraModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The head and loss as they were before chunking: fp32 logits of the whole micro-batch."""
    logits = F.linear(model.hidden_states(x), model.lm_head.weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


def chunked_loss(model: MarjaraModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, targets=y).loss


def plain_validation_sum(model: MarjaraModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The evaluator's loss as it was: the model's logits of the whole batch, then fp32 cross-entropy."""
    logits = model(x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="sum", ignore_index=-1)


def chunked_validation_sum(model: MarjaraModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, targets=y).ce_sum


LOSSES = {("train", "plain"): plain_loss, ("train", "chunked"): chunked_loss,
          ("validation", "plain"): plain_validation_sum, ("validation", "chunked"): chunked_validation_sum}


def _cpu_peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _cpu_now_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(variant: str, args) -> dict:
    """One variant in this process: returns the step's peak above the memory before it, in MiB."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    training = args.mode == "train"
    model = MarjaraModel(ModelConfig.from_preset(args.preset, vocab_size=args.vocab)).to(device).train(training)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = LOSSES[args.mode, variant]
    data = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)

    def step(xb, yb):
        if not training:
            with torch.no_grad():
                return float(loss_fn(model, xb, yb) / (yb != -1).sum())
        loss = loss_fn(model, xb, yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as under DeepSpeed
        return float(loss)

    step(x[:1, :8], y[:1, :8])  # allocates gradients and AdamW state (training)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step(x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _cpu_now_kib() * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        loss = step(x, y)
        peak = _cpu_peak_kib() * 1024 - before
    return {"variant": variant, "peak_mib": peak / 2**20, "loss": loss, "device": device.type,
            "chunk_tokens": model.lm_head.chunk_tokens}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--mode", default="train", choices=["train", "validation"],
                   help="a training step, or a validation batch (no gradients)")
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--vocab", type=int, default=100_352, help="vocabulary size (cl100k_base's, padded to 64)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--variant", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("vocab", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise MarjaraError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    return args


@cli_entry
def main(argv=None) -> int:
    args = parse(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return 0
    results = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", variant]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise MarjaraError(f"the {variant} measurement failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
        results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
    plain, chunked = results["plain"], results["chunked"]
    tokens = args.batch_size * args.seq_len
    print(f"{args.preset} preset, vocab {args.vocab}, {tokens} tokens per micro-batch, on {plain['device']}; "
          f"chunks of {chunked['chunk_tokens']} tokens")
    what = "one training step" if args.mode == "train" else "one validation batch (no gradients)"
    print(f"peak memory of {what} above its start: plain {plain['peak_mib']:.0f} MiB, "
          f"chunked {chunked['peak_mib']:.0f} MiB: {chunked['peak_mib'] / plain['peak_mib']:.2f}x "
          f"(fp32 logits of the micro-batch alone: {tokens * args.vocab * 4 / 2**20:.0f} MiB)")
    print(f"loss: plain {plain['loss']:.6f}, chunked {chunked['loss']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
