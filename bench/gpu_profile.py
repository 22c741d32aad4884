"""Where a training step's time goes: torch.profiler over a few steps of train.py's own loop (the
Learner, built from train.py's flags), printed as short tables and saved as text.

    python bench/gpu_profile.py --model_size 1b --batch_size 16 --out profile-1b.txt   # on a GPU
    python bench/gpu_profile.py --dry-run      # any machine: `tiny` on the CPU, the same tables

It reports the SDPA backend that ran (flash / mem-efficient / cudnn / math), the kernels taking
the most GPU time, GPU time by category (matmul, attention, loss head, optimizer, NCCL, copies,
norms and elementwise), the time inside MARJARA's own ranges (data wait, loss head, backward,
optimizer step) and the host syncs per step. The profiled steps skip the log line's sync (the
log interval is the run's length) and the run writes no checkpoint: neither is a training step's
cost, and 1b's checkpoint is 17 GB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402

WAIT, WARMUP = 1, 1  # the first step holds set-up (and compilation); the second warms the profiler
# (category, substrings of op or kernel names): the first match wins, so the loss head's softmax
# is not taken for attention, nor its matmul-free kernels for elementwise work.
CATEGORIES = [
    ("host sync", ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
                   "aten::_local_scalar_dense")),
    ("NCCL / collectives", ("nccl", "c10d::", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                            "broadcast_")),
    ("loss head", ("marjara.loss_head", "cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "logsumexp")),
    ("attention", ("scaled_dot_product", "flash", "fmha", "efficient_attention", "attention")),
    ("optimizer", ("Optimizer.step", "marjara.optimizer_step", "adam", "_foreach_", "multi_tensor", "clip_grad")),
    ("data wait", ("marjara.data_wait", "Memcpy HtoD", "pin_memory")),
    ("matmul", ("gemm", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "nvjet", "cutlass",
                "xmma", "sm90_", "cublas")),
    ("copies", ("Memcpy", "Memset", "aten::copy_", "aten::_to_copy", "aten::cat", "aten::contiguous")),
    ("norm / elementwise", ("norm", "elementwise", "vectorized", "reduce_kernel", "triton_", "aten::mul", "aten::add",
                            "aten::silu", "aten::rsqrt", "aten::sqrt", "aten::pow", "aten::mean", "aten::sum",
                            "aten::div", "aten::sub", "aten::lerp", "aten::fill_", "aten::neg", "aten::exp")),
]
SDPA_BACKENDS = [  # (backend, substrings), most specific first
    ("flash (CPU)", ("_scaled_dot_product_flash_attention_for_cpu",)),
    ("flash", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd", "pytorch_flash")),
    ("cudnn", ("_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa", "sdpa_cudnn")),
    ("mem-efficient", ("_scaled_dot_product_efficient_attention", "fmha_cutlass", "efficient_attention")),
    ("math", ("_scaled_dot_product_attention_math",)),
]
RANGES = ["marjara.data_wait", "marjara.loss_head", "marjara.backward", "marjara.optimizer_step"]
# What a step phase is called after the innermost range it runs in; autograd runs the backward
# of CUDA tensors on a thread of its own, outside the marjara.backward range.
PHASES = [("marjara.data_wait", "data wait"), ("marjara.loss_head", "loss head (forward)"),
          ("marjara.optimizer_step", "optimizer step"), ("Optimizer.step", "optimizer step"),
          ("autograd::engine", "backward"), ("marjara.backward", "backward")]


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(needle.lower() in lowered for needle in needles):
            return label
    return "other"


def sdpa_backends(counts: dict[str, int]) -> dict[str, int]:
    """{backend: calls} from {op or kernel name: calls}; each name counts for at most one backend."""
    found: dict[str, int] = {}
    for name, calls in counts.items():
        for backend, needles in SDPA_BACKENDS:
            if any(needle in name for needle in needles):
                found[backend] = found.get(backend, 0) + calls
                break
    return found


def phase(ancestors: list[str]) -> str:
    """The step phase of an op from the names of its enclosing ranges, innermost first."""
    for name in ancestors:
        for prefix, label in PHASES:
            if name.startswith(prefix):
                return label
    return "forward and the rest"


def by_phase(events, on_gpu: bool, steps: int) -> list[tuple[str, float]]:
    """[(phase, ms per step)] of the ops' own time (GPU: the kernels each launched)."""
    sums: dict[str, float] = {}
    for event in events:
        value = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if not value or event.name.startswith("ProfilerStep"):
            continue
        ancestors, parent = [event.name], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        label = phase(ancestors)
        sums[label] = sums.get(label, 0.0) + value / 1e3 / steps
    return sorted(sums.items(), key=lambda item: -item[1])


def by_category(rows: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """[(name, time)] summed per category, largest first."""
    sums: dict[str, float] = {}
    for name, value in rows:
        sums[category(name)] = sums.get(category(name), 0.0) + value
    return sorted(sums.items(), key=lambda item: -item[1])


def report(prof, steps: int, on_gpu: bool) -> str:
    """The tables, per profiled step, from a finished profile."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()

    device_rows = [a for a in averages if a.device_type == DeviceType.CUDA] if on_gpu else []
    cpu_rows = [a for a in averages if a.device_type == DeviceType.CPU]
    if on_gpu:
        timed = [(a.key, a.self_device_time_total / 1e3 / steps) for a in device_rows]
        unit = "GPU kernel ms"
    else:
        timed = [(a.key, a.self_cpu_time_total / 1e3 / steps) for a in cpu_rows if not a.key.startswith("ProfilerStep")]
        unit = "CPU self ms"
    total = sum(value for _, value in timed) or 1.0
    step_ms = [a.cpu_time_total / 1e3 / a.count for a in cpu_rows if a.key.startswith("ProfilerStep")]
    lines = [f"per step, mean of {steps} profiled steps"]
    if step_ms:
        wall = sum(step_ms) / len(step_ms)
        lines.append(f"step wall time {wall:.1f} ms; {unit} {total:.1f}"
                     + (f" (GPU busy {total / wall:.0%} of the step)" if on_gpu else ""))
    backends = sdpa_backends({a.key: a.count for a in averages})
    lines.append("SDPA backend: " + (", ".join(f"{b} ({n // steps} calls/step)" for b, n in backends.items())
                                     or "none seen"))
    lines += ["", f"top ops by {unit}:"]
    for name, value in sorted(timed, key=lambda item: -item[1])[:15]:
        lines.append(f"  {value:9.2f}  {value / total:6.1%}  {category(name):<20} {name[:90]}")
    lines += ["", f"{unit} by category:"]
    lines += [f"  {value:9.2f}  {value / total:6.1%}  {label}" for label, value in by_category(timed)]
    lines += ["", f"{unit} by step phase:"]
    lines += [f"  {value:9.2f}  {value / total:6.1%}  {label}" for label, value in by_phase(prof.events(), on_gpu, steps)]
    lines += ["", "MARJARA's ranges (CPU ms, GPU ms of the kernels they launched):"]
    for a in cpu_rows:
        if a.key in RANGES or a.key.startswith("Optimizer.step"):
            gpu = a.device_time_total / 1e3 / steps if on_gpu else 0.0
            lines.append(f"  {a.key:<36} {a.count // steps:4d}x  cpu {a.cpu_time_total / 1e3 / steps:9.2f}"
                         f"  gpu {gpu:9.2f}")
    syncs = [a for a in cpu_rows if category(a.key) == "host sync"]
    lines += ["", "host syncs per step: " + (", ".join(f"{a.key} {a.count / steps:g}x ({a.cpu_time_total / 1e3 / steps:.2f}"
                                                       " ms)" for a in syncs) or "none")]
    return "\n".join(lines)


def instrument(learner, prof, label_head: bool) -> None:
    """Name the loop's parts for the profiler and step it once per training step. Wraps the
    learner's own methods on the instance: fit() runs unchanged."""
    from torch.autograd.profiler import record_function

    def ranged(name, fn):
        def call(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return call

    learner.batches.next = ranged("marjara.data_wait", learner.batches.next)
    learner.engine.backward = ranged("marjara.backward", learner.engine.backward)
    learner.engine.step = ranged("marjara.optimizer_step", learner.engine.step)
    if label_head:  # hooks inside a compiled module would change what torch.compile traces
        open_ranges = []
        head = learner.model.lm_head
        head.register_forward_pre_hook(lambda *_: open_ranges.append(record_function("marjara.loss_head").__enter__()))
        head.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None))
    step = learner.train_step

    def step_and_tick():
        step()
        prof.step()

    learner.train_step = step_and_tick
    learner.checkpointer.save = lambda *_: None  # no checkpoint: see the module's docstring


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true", help="profile `tiny` on the CPU for a couple of steps")
    p.add_argument("--model_size", default="1b", choices=sorted(gpu_throughput.SEQ_LEN))
    p.add_argument("--batch_size", type=int, default=None, help="default: the planner's largest for this GPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--active", type=int, default=3, help="profiled steps (after 2 that are not)")
    p.add_argument("--out", default=None, help="also write the tables to this file")
    p.add_argument("--work_dir", default=None, help="the run's folder (default: a fresh temporary one)")
    args = p.parse_args(argv)
    if args.active < 1 or (args.batch_size is not None and args.batch_size < 1):
        print("error: --active and --batch_size must be >= 1", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run this on a GPU machine, or pass --dry-run for a CPU profile of tiny",
              file=sys.stderr)
        return 2
    steps = WAIT + WARMUP + args.active + 1  # + the last step, which logs
    out_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="marjara_profile_")) / "run"
    if args.dry_run:
        preset, flags = "tiny", gpu_throughput.train_flags("tiny", 64, args.batch_size or 2, out_dir, steps, steps,
                                                           precision="fp32")
    else:
        from gpu_check import planner_device

        preset, seq = args.model_size, gpu_throughput.SEQ_LEN[args.model_size]
        batch = args.batch_size or gpu_throughput.planned_batch(preset, args.grad_checkpointing,
                                                                planner_device(torch.cuda.get_device_name()))
        flags = gpu_throughput.train_flags(preset, seq, batch, out_dir, steps, steps, args.compile,
                                           args.grad_checkpointing)
    print("train.py " + " ".join(flags), flush=True)
    from torch.profiler import ProfilerActivity, profile, schedule

    from marjara.compat.deepspeed import release_engine
    from marjara.distributed import shutdown
    from marjara.train.args import parse_config
    from marjara.train.learner import Learner

    learner = Learner(parse_config(flags))
    on_gpu = not args.dry_run
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu
    with profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=args.active, repeat=1),
                 record_shapes=False) as prof:
        instrument(learner, prof, label_head=not args.compile)
        code = learner.fit()
    release_engine(learner.engine)
    shutdown()
    if code != 0:
        print(f"error: the profiled run ended with exit code {code}", file=sys.stderr)
        return code
    text = f"{preset} profile ({'CPU dry run' if args.dry_run else torch.cuda.get_device_name()}, torch " \
           f"{torch.__version__}): {' '.join(flags)}\n" + report(prof, args.active, on_gpu)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
