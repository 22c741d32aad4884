"""MFU that can be trusted: known GPU peaks, a CPU peak measured robustly, no reading above 100 %."""

import pytest
import torch

from marjara.train import metrics


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0)])
def test_known_gpus_get_their_dense_bf16_peak(name, peak):
    assert metrics.gpu_peak_tflops(name) == peak


def test_an_unknown_gpu_has_no_peak_and_the_override_wins(monkeypatch):
    assert metrics.gpu_peak_tflops("Tesla T4") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    peak, source = metrics.device_peak_tflops(None)
    assert peak == 0.0 and "pass --peak_tflops" in source
    assert metrics.device_peak_tflops(123.0) == (123.0, "--peak_tflops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert metrics.device_peak_tflops(None)[0] == 989.0


def test_the_cpu_peak_is_the_best_of_several_compute_bound_matmuls(monkeypatch):
    """A disturbed timing (here: the first, 10x slower) must not decide the peak."""
    durations = iter([1.0] + [0.1] * (metrics.CPU_PEAK_REPEATS - 1))
    clock = [0.0]

    def fake_clock():
        clock[0] += next(durations) if fake_clock.started else 0.0
        fake_clock.started = not fake_clock.started
        return clock[0]

    fake_clock.started = False
    monkeypatch.setattr(metrics.time, "perf_counter", fake_clock)
    size = metrics.CPU_PEAK_SIZE
    assert metrics.measure_cpu_peak_tflops() == pytest.approx(2 * size**3 / 0.1 / 1e12)
    assert metrics.CPU_PEAK_REPEATS >= 5 and size >= 2048  # 17 GFLOP per product: compute-bound


def test_a_reading_above_100_percent_is_not_reported_as_mfu():
    values, line = metrics.mfu_report(flops_per_token=1e9, tokens_per_sec=500.0, peak_tflops=1.0, devices=1)
    assert values == {"train/mfu": 0.5} and line == " | mfu 50.0%"
    values, line = metrics.mfu_report(flops_per_token=1e9, tokens_per_sec=2150.0, peak_tflops=1.0, devices=1)
    assert values == {} and "mfu n/a" in line and "pass --peak_tflops" in line and "%" not in line
    assert metrics.mfu_report(1e9, 2150.0, peak_tflops=1.0, devices=4)[0] == {"train/mfu": pytest.approx(0.5375)}
    assert metrics.mfu_report(1e9, 500.0, peak_tflops=0.0, devices=1) == ({}, "")
