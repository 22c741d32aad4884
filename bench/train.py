"""Training throughput through the DeepSpeed engine vs. a plain PyTorch loop, MFU, and per-rank
model-state memory of ZeRO 0/1/2/3 on 2 ranks. Every figure is measured in this run:

    python bench/train.py [--preset small] [--batch_size 4] [--seq_len 128] [--grad_accum 8] [--steps 2]
    python bench/train.py --grad_accum 1 --steps 6 --skip_memory   # one micro-batch per optimizer step
    python bench/train.py --preset medium --skip_memory --peak_tflops 790      # on an H200 (bf16 by default)

ZeRO-1's optimizer step costs the same whatever the tokens behind it; the default of 8
micro-batches (4096 tokens) per optimizer step is still far fewer than a pre-training step holds.

On a CPU with tcmalloc installed, the throughput table is measured twice, each in a fresh process:
under glibc's malloc and under a preloaded tcmalloc.
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
from marjara.train.allocator import active_allocator, find_tcmalloc  # noqa: E402
from marjara.model.config import PRESETS, ModelConfig  # noqa: E402
from marjara.distributed import ensure_process_group, exit_now, rank, shutdown, world_size  # noqa: E402
from marjara.dtypes import PRECISIONS  # noqa: E402
from marjara.train.config import TrainConfig  # noqa: E402
from marjara.train.engine import initialize_engine  # noqa: E402
from marjara.train.metrics import device_peak_tflops, mfu_report  # noqa: E402
from marjara.model import MarjaraModel  # noqa: E402
from marjara.train.optim import build_adamw, parameter_groups  # noqa: E402
from marjara.planner.measure import model_state_bytes  # noqa: E402


def train_config(stage: int, batch: int, precision: str, grad_accum: int = 1) -> TrainConfig:
    """The run train.py would make of the shipped ds_configs/zeroN.json and these flags (lr 1e-4)."""
    return TrainConfig.from_flags({"deepspeed_config": str(ROOT / "ds_configs" / f"zero{stage}.json"), "lr": 1e-4,
                                   "batch_size": batch, "grad_accum": grad_accum, "mixed_precision": precision})


def new_engine(model: MarjaraModel, cfg: TrainConfig):
    optimizer = build_adamw(parameter_groups(model, cfg.optim.weight_decay), cfg)
    return initialize_engine(model=model, optimizer=optimizer, config=cfg.engine_config(world_size()))


def build(preset: str, seed: int = 0) -> MarjaraModel:
    torch.manual_seed(seed)
    return MarjaraModel(ModelConfig.from_preset(preset))


def batches(config: ModelConfig, batch: int, seq_len: int, n: int, device) -> list:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (n, batch, seq_len + 1), generator=g)
    return [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in data]


def optimizer_steps(config: ModelConfig, args, device) -> list[list]:
    """args.steps + 1 optimizer steps (the first is a warm-up) of args.grad_accum micro-batches each."""
    micro = batches(config, args.batch_size, args.seq_len, (args.steps + 1) * args.grad_accum, device)
    return [micro[i:i + args.grad_accum] for i in range(0, len(micro), args.grad_accum)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokens_per_sec(step, data) -> float:
    """Run step(micro_batches) on every optimizer step; the first is a warm-up, the rest are timed."""
    step(data[0])
    sync()
    start = time.perf_counter()
    for micro_batches in data[1:]:
        step(micro_batches)
    sync()
    return sum(x.numel() for micro_batches in data[1:] for x, _ in micro_batches) / (time.perf_counter() - start)


def time_plain(args, device) -> float:
    model = build(args.preset).to(device)
    cfg = train_config(0, args.batch_size, args.precision, args.grad_accum)
    optimizer = build_adamw(parameter_groups(model, cfg.optim.weight_decay), cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(micro_batches):
        for x, y in micro_batches:
            with autocast:
                loss = model(x, targets=y).loss
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return tokens_per_sec(step, optimizer_steps(model.config, args, device))


def time_engine(args, stage: int) -> float:
    engine = new_engine(build(args.preset), train_config(stage, args.batch_size, args.precision, args.grad_accum))

    def step(micro_batches):
        for x, y in micro_batches:  # the engine scales the loss by 1/grad_accum and steps at the boundary
            loss = engine(x, y).loss
            engine.backward(loss)
            engine.step()

    return tokens_per_sec(step, optimizer_steps(engine.module.config, args, engine.device))


def memory_worker(args) -> None:
    """Runs on each rank under torchrun: one ZeRO stage, one optimizer step (Adam's state exists
    from then on; its size does not depend on the batch, so the batch is tiny), then its memory."""
    ensure_process_group()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine = new_engine(build(args.preset), train_config(args.stage, 1, args.precision))
    for x, y in batches(engine.module.config, 1, 16, 1, engine.device):
        loss = engine(x, y).loss
        engine.backward(loss)
        engine.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if rank() == 0:
        print(json.dumps({"model_state_mb": model_state_bytes(engine) / 2**20,
                          "peak_rss_growth_mb": (peak - before) / 1024}), flush=True)
    shutdown()
    exit_now(0)


def measure_memory(preset: str, precision: str, stage: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + stage), __file__, "--memory_worker", "--stage", str(stage), "--preset", preset,
           "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"ZeRO-{stage} {precision} memory run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def throughput(args) -> dict:
    """The engine-vs-plain table, under whichever malloc this process has; returns the medians."""
    ensure_process_group()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = PRECISIONS.get(args.precision, torch.float32)
    peak, source = device_peak_tflops(args.peak_tflops, dtype)
    model = build(args.preset)
    flops_per_token = model.flops_per_token(args.seq_len)
    print(f"preset {args.preset} ({model.num_parameters() / 1e6:.1f}M params), {args.grad_accum} micro-batch(es) "
          f"of {args.batch_size} x {args.seq_len} tokens per optimizer step, {args.precision}, "
          f"{torch.get_num_threads()} threads, malloc: {active_allocator()}; peak {peak:.3f} TFLOP/s ({source})")
    del model
    results: dict[str, list[float]] = {"plain PyTorch": [], "engine ZeRO-0": [], "engine ZeRO-1": []}
    for _ in range(args.rounds):
        results["plain PyTorch"].append(time_plain(args, device))
        for stage in (0, 1):
            results[f"engine ZeRO-{stage}"].append(time_engine(args, stage))
    medians = {name: statistics.median(values) for name, values in results.items()}
    base = medians["plain PyTorch"]
    print(f"{'loop':<16}{'tokens/s':>12}{'vs plain':>10}{'MFU':>8}")
    for name, tps in medians.items():
        values, _ = mfu_report(flops_per_token, tps, peak, devices=1)
        mfu = f"{values['train/mfu']:.1%}" if values else "n/a"  # n/a: above 100 %, the peak is wrong
        print(f"{name:<16}{tps:>12,.0f}{tps / base:>9.2f}x{mfu:>8}")
    print("goal: engine >= 0.95x the plain loop at ZeRO 0/1 on one rank", flush=True)
    return medians


def throughput_under(allocator: str, args) -> dict:
    """throughput() in a fresh process whose malloc is glibc's or a preloaded tcmalloc."""
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = find_tcmalloc()
    cmd = [sys.executable, __file__, "--throughput_worker", "--preset", args.preset, "--precision", args.precision,
           "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--grad_accum", str(args.grad_accum),
           "--steps", str(args.steps), "--rounds", str(args.rounds)]
    if args.peak_tflops:
        cmd += ["--peak_tflops", str(args.peak_tflops)]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = out.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("{")), flush=True)
    results = [line for line in lines if line.startswith("{")]
    if out.returncode != 0 or not results:
        raise SystemExit(f"the {allocator} throughput run failed (exit {out.returncode})")
    return json.loads(results[-1])


def positive(kind):
    """An argparse type: `kind`(text), refused in one line unless > 0."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {value}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=positive(int), default=4)
    parser.add_argument("--seq_len", type=positive(int), default=128)
    parser.add_argument("--grad_accum", type=positive(int), default=8, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=positive(int), default=2, help="timed optimizer steps")
    parser.add_argument("--rounds", type=positive(int), default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--peak_tflops", type=positive(float), default=None,
                        help="the device's peak for MFU (default: a known GPU's bf16 peak, or a CPU fp32 matmul "
                             "measured in this run)")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--memory_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--throughput_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args)
    if args.throughput_worker:
        return print(json.dumps(throughput(args)))

    if torch.cuda.is_available() or not find_tcmalloc():
        throughput(args)  # GPU memory comes from PyTorch's caching allocator whatever the malloc
    else:
        glibc = throughput_under("glibc", args)
        tcmalloc = throughput_under("tcmalloc", args)
        print("tcmalloc vs glibc malloc: " + ", ".join(f"{name} {tcmalloc[name] / glibc[name]:.2f}x" for name in glibc))
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
