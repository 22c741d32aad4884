"""What rank 0 reports: tensorboard events, metrics.jsonl, a progress bar or plain lines, MFU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 peak of one device, TFLOP/s, from the vendors' data sheets, for MFU.
# Matched against torch.cuda.get_device_name(), longest key first ("H100 PCIe" before "H100").
GPU_PEAK_TFLOPS = {
    "B200": 2250.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
    "L40S": 362.0, "L40": 181.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0,
}

# A CPU's peak is measured: fp32 (or the run's dtype) matmuls of this size are compute-bound on
# any CPU core count in use, and the best of several repeats is the one least disturbed by
# other processes. A single short timing on a busy machine comes out far below the real peak.
CPU_PEAK_SIZE = 2048
CPU_PEAK_REPEATS = 8


def measure_cpu_peak_tflops(size: int = CPU_PEAK_SIZE, repeats: int = CPU_PEAK_REPEATS,
                            dtype: torch.dtype = torch.float32) -> float:
    """Matmul throughput of this process's threads: the best of `repeats` timed products."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # first touch of the pages and of the BLAS's threads
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def gpu_peak_tflops(name: str) -> float | None:
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return GPU_PEAK_TFLOPS[key]
    return None


def device_peak_tflops(override: float | None, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where it comes from); 0.0 when unknown (no MFU then).
    `dtype` is the training's: on a CPU the peak is measured in it."""
    if override:
        return override, "--peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        tflops = gpu_peak_tflops(name)
        if tflops is None:
            return 0.0, f"{name}: unknown peak (pass --peak_tflops)"
        return tflops, f"{name} dense bf16 peak"
    dtype_name = str(dtype).removeprefix("torch.")
    return measure_cpu_peak_tflops(dtype=dtype), f"best of {CPU_PEAK_REPEATS} {dtype_name} matmuls measured at start"


def mfu_report(flops_per_token: float, tokens_per_sec: float, peak_tflops: float, devices: int) -> tuple[dict, str]:
    """({"train/mfu": value} or {}, the log line's fragment). Model FLOPs over the devices' peak;
    a reading above 100 % means the peak is wrong (a CPU peak measured too low on a busy machine,
    or a wrong --peak_tflops): it is not logged as MFU, and the line says so."""
    if peak_tflops <= 0:
        return {}, ""
    mfu = flops_per_token * tokens_per_sec / (peak_tflops * 1e12 * devices)
    if mfu > 1.0:
        achieved = flops_per_token * tokens_per_sec / devices / 1e12
        return {}, (f" | mfu n/a ({achieved:.3g} TFLOP/s per device exceeds the {peak_tflops:.3g} TFLOP/s "
                    "peak; pass --peak_tflops)")
    return {"train/mfu": mfu}, f" | mfu {mfu:.1%}"


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
