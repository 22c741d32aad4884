"""What rank 0 reports: tensorboard events, metrics.jsonl, a progress bar or plain lines, MFU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak of one device, TFLOP/s (vendor figures), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def measure_cpu_peak_tflops(size: int = 2048, repeats: int = 3) -> float:
    """fp32 matmul throughput of this process's threads, the CPU's practical peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(override: float | None) -> tuple[float, str]:
    if override:
        return override, "--peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops, f"{name} bf16 peak"
        return 0.0, f"{name}: unknown peak (pass --peak_tflops)"
    return measure_cpu_peak_tflops(), "measured fp32 matmul"


class Reporter:
    """Rank 0 writes; every other rank's instance does nothing."""

    def __init__(self, enabled: bool, log_dir: str, metrics_path: Path, total_steps: int, start_step: int,
                 resumed: bool = False) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.metrics_file = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run continues the folder's events; tensorboard hides those after the step it
        # resumes from (an abandoned continuation's).
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_step + 1 if resumed else None)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(metrics_path, "a")
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def log(self, step: int, values: dict[str, float], line: str | None = None) -> None:
        """Record scalars (tensorboard tags like `train/loss`) and, if given, show a line."""
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics_file.flush()
        if line is not None:
            if self.bar is not None:
                self.bar.set_postfix_str(line, refresh=False)
            else:
                self.print(f"step {step:>6} | {line}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.metrics_file.close()
