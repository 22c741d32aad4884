"""Measuring what the plan predicts, on the machine at hand: the model-state bytes an engine holds
and the peak memory a training step adds. The planner's tests use these on CPU ranks; a GPU check
calls compare_peak() after a run with torch.cuda.max_memory_allocated()."""

from __future__ import annotations

from typing import Callable

import torch

from marjara.compat.deepspeed import inner_optimizer, zero3_persistent


def model_state_bytes(engine) -> int:
    """Bytes of parameters and optimizer state (fp32 masters, Adam moments) this rank holds: the
    union of the memory those tensors view, so that views of one buffer count once."""
    spans: dict[int, list[tuple[int, int]]] = {}  # storage address -> [start, end) byte ranges

    def add(t):
        if torch.is_tensor(t) and t.numel():
            start = t.storage_offset() * t.element_size()
            spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + t.numel() * t.element_size()))

    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's shard, and the whole of a persistent parameter
            add(p.ds_tensor)
            if zero3_persistent(p):
                add(p.data)
        else:
            add(p)
    inner = inner_optimizer(engine)
    # The optimizer's state is keyed by the tensors it updates (the fp32 masters, or the flat
    # partitions ZeRO hands it; ZeRO-3 empties param_groups between steps).
    for master, state in inner.state.items():
        add(master)
        for value in state.values():
            add(value)
    total = 0
    for ranges in spans.values():
        covered = 0  # bytes of this storage already counted, up to this offset
        for start, end in sorted(ranges):
            total += max(0, end - max(start, covered))
            covered = max(covered, end)
    return total


def cpu_peak_increase(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor memory fn() allocates above what was live when it started, on CPU.

    PyTorch's CPU allocator reports every allocation and free to the profiler when it records
    memory (profile_memory=True), with the running total of live bytes: the CPU counterpart of
    torch.cuda.memory_allocated(). Its maximum during fn() is the peak increase. Frees of tensors
    allocated before fn() are not counted (the profiler never saw their size), so fn() must be
    run once before, to let such first-time allocations settle.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag.name == "Allocation":
            events.append((node.start_time_ns, node.extra_fields.total_allocated))
    return max((total for _, total in sorted(events)), default=0)


def compare_peak(planned_bytes: float, measured_bytes: float) -> str:
    """One line for a check script: planned vs measured peak, and their ratio."""
    gib = 2**30
    return (f"planned {planned_bytes / gib:.2f} GiB, measured {measured_bytes / gib:.2f} GiB "
            f"(planned / measured = {planned_bytes / measured_bytes:.2f})")


def planned_peak_bytes(train_argv: list[str], gpus: int = 1, gpu: str = "H100") -> float:
    """The planner's peak tensor memory per GPU (what torch.cuda.max_memory_allocated() measures:
    no fragmentation allowance) for train.py run with `train_argv` on `gpus` GPUs of one node."""
    from marjara.planner.inputs import build_parser, setup_from_args
    from marjara.planner.recommend import evaluate

    args = build_parser().parse_args([*train_argv, "--nodes", "1", "--gpus_per_node", str(gpus), "--gpu", gpu])
    setup, target, fixed_zero = setup_from_args(args)
    candidate = evaluate(setup.with_zero(*fixed_zero) if fixed_zero else setup, target)
    return candidate.memory.counted
