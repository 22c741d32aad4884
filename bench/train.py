"""Training throughput through the DeepSpeed engine vs. a plain PyTorch loop, MFU, and per-rank
model-state memory of ZeRO 0/1/2/3 on 2 ranks. Every figure is measured in this run:

    python bench/train.py [--preset small] [--batch_size 4] [--seq_len 128] [--steps 6]
    python bench/train.py --preset medium --precision bf16 --skip_memory      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import marjara  # noqa: E402,F401
from marjara.config import ModelConfig  # noqa: E402
from marjara.distributed import ensure_process_group, rank, world_size  # noqa: E402
from marjara.ds_config import resolve_engine_settings  # noqa: E402
from marjara.metrics import device_peak_tflops  # noqa: E402
from marjara.model import MarjaraModel  # noqa: E402
from marjara.optim import build_adamw, parameter_groups  # noqa: E402
from marjara.train_args import parse_args  # noqa: E402
from marjara.trainer import skip_single_rank_allreduce  # noqa: E402


def ds_config(stage: int, batch: int, precision: str) -> dict:
    """The shipped ds_configs/zeroN.json, resolved exactly as train.py resolves it."""
    args = parse_args(["--deepspeed_config", str(ROOT / "ds_configs" / f"zero{stage}.json"),
                       "--batch_size", str(batch), "--mixed_precision", precision])
    return resolve_engine_settings(args, world_size(), torch.cuda.is_available(), use_moe=False).ds_config


def build(preset: str, seed: int = 0) -> MarjaraModel:
    torch.manual_seed(seed)
    return MarjaraModel(ModelConfig.from_preset(preset))


def batches(config: ModelConfig, batch: int, seq_len: int, n: int, device) -> list:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (n, batch, seq_len + 1), generator=g)
    return [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in data]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_plain(preset, batch, seq_len, steps, precision, device) -> float:
    model = build(preset).to(device)
    optimizer = build_adamw(parameter_groups(model, 0.1), 1e-4)
    data = batches(model.config, batch, seq_len, steps + 1, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(x, y):
        with autocast:
            _, loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return tokens_per_sec(step, data)


def tokens_per_sec(step, data) -> float:
    """Run step(x, y) on every batch; the first is a warm-up, the rest are timed."""
    step(*data[0])
    sync()
    start = time.perf_counter()
    for x, y in data[1:]:
        step(x, y)
    sync()
    return sum(x.numel() for x, _ in data[1:]) / (time.perf_counter() - start)


def time_engine(preset, batch, seq_len, steps, precision, stage, device) -> float:
    import deepspeed

    model = build(preset)
    groups = parameter_groups(model, 0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_adamw(groups, 1e-4),
                                      config=ds_config(stage, batch, precision))
    skip_single_rank_allreduce(engine)  # as the trainer does
    data = batches(model.config, batch, seq_len, steps + 1, engine.device)

    def step(x, y):
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()

    return tokens_per_sec(step, data)


def model_state_bytes(engine) -> int:
    """Bytes of parameters and optimizer state (fp32 masters, Adam moments) this rank holds."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in engine.module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # The optimizer's state is keyed by the tensors it updates (the fp32 masters, or the flat
    # partitions ZeRO hands it; ZeRO-3 empties param_groups between steps).
    for master, state in inner.state.items():
        add(master)
        for value in state.values():
            add(value)
    return total


def memory_worker(args) -> None:
    """Runs on each rank under torchrun: one ZeRO stage, one optimizer step (Adam's state exists
    from then on; its size does not depend on the batch, so the batch is tiny), then its memory."""
    import deepspeed

    ensure_process_group()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(args.preset)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_adamw(parameter_groups(model, 0.1), 1e-4),
                                      config=ds_config(args.stage, 1, args.precision))
    for x, y in batches(model.config, 1, 16, 1, engine.device):
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if rank() == 0:
        print(json.dumps({"model_state_mb": model_state_bytes(engine) / 2**20,
                          "peak_rss_growth_mb": (peak - before) / 1024}), flush=True)


def measure_memory(preset: str, precision: str, stage: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + stage), __file__, "--memory_worker", "--stage", str(stage), "--preset", preset,
           "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"ZeRO-{stage} {precision} memory run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--memory_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args)

    ensure_process_group()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, source = device_peak_tflops(None)
    model = build(args.preset)
    flops_per_token = model.flops_per_token(args.seq_len)
    print(f"preset {args.preset} ({model.num_parameters() / 1e6:.1f}M params), micro-batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.precision}, {torch.get_num_threads()} threads; peak {peak:.3f} TFLOP/s ({source})")
    del model
    results: dict[str, list[float]] = {"plain PyTorch": [], "engine ZeRO-0": [], "engine ZeRO-1": []}
    for _ in range(args.rounds):
        results["plain PyTorch"].append(time_plain(args.preset, args.batch_size, args.seq_len, args.steps,
                                                   args.precision, device))
        for stage in (0, 1):
            results[f"engine ZeRO-{stage}"].append(time_engine(args.preset, args.batch_size, args.seq_len, args.steps,
                                                               args.precision, stage, device))
    base = statistics.median(results["plain PyTorch"])
    print(f"{'loop':<16}{'tokens/s':>12}{'vs plain':>10}{'MFU':>8}")
    for name, values in results.items():
        tps = statistics.median(values)
        mfu = flops_per_token * tps / (peak * 1e12) if peak else float("nan")
        print(f"{name:<16}{tps:>12,.0f}{tps / base:>9.2f}x{mfu:>8.1%}")
    print("goal: engine >= 0.95x the plain loop at ZeRO 0/1 on one rank")
    if args.skip_memory:
        return
    print("2 ranks, per-rank model state (parameters + fp32 masters + Adam moments, counted from tensors) "
          "and peak RSS growth:")
    for precision in ("fp32", "bf16"):
        rows = [measure_memory(args.preset, precision, stage) for stage in (0, 1, 2, 3)]
        zero0 = rows[0]["model_state_mb"]
        for stage, row in enumerate(rows):
            print(f"  {precision} ZeRO-{stage}: model state {row['model_state_mb']:8.1f} MiB "
                  f"({row['model_state_mb'] / zero0:.2f}x ZeRO-0)   peak RSS growth {row['peak_rss_growth_mb']:8.1f} MiB")
    print("goal: ZeRO-3 model state per rank <= 0.6x ZeRO-0's")


if __name__ == "__main__":
    main()
