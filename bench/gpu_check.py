"""MARJARA on one GPU, checked in one short run (about 8 minutes on an H200): one line per check,
then a summary.

    python bench/gpu_check.py              # on a machine with one CUDA GPU
    python bench/gpu_check.py --dry-run    # print what it would run (any machine)
    python bench/gpu_check.py --only bf16_zero3 resume_zero3

Checks: bf16 under ZeRO 0/1/2/3 and fp16 under ZeRO 0/2 (20 steps of `small`, finite falling loss;
fp16 also logs its loss scale), MoE under ZeRO-2, --grad_checkpointing, resume of a ZeRO-3 run
(the resumed losses equal the uninterrupted run's), convert + generate of its result; then a bf16
matmul measured here, and tokens/s and MFU of `large` and `1b` in bf16 with --compile off and on
(the better one counts; the compiled `large` run is also the --compile check), against the
device's peak and the measured matmul; and the scale planner's per-GPU peak memory for the eager
runs against torch.cuda.max_memory_allocated() (marjara.planner.measure). Every run is train.py
as users start it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS = 20
SHORT = ["--model_size", "small", "--seq_len", "256", "--batch_size", "8", "--max_steps", str(STEPS),
         "--log_interval", "1", "--eval_interval", "0", "--sample_tokens", "0", "--save_interval", "0",
         "--warmup_steps", "2", "--lr", "1e-3"]
THROUGHPUT = {"large": ["--batch_size", "16", "--seq_len", "1024"], "1b": ["--batch_size", "8", "--seq_len", "2048"]}
THROUGHPUT_STEPS, THROUGHPUT_LOG = 30, 5
MATMUL = ("import torch, time\n"
          "n = 8192; a = torch.randn(n, n, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)\n"
          "for _ in range(3): a @ b\n"
          "best = float('inf')\n"
          "for _ in range(20):\n"
          "    torch.cuda.synchronize(); t = time.perf_counter(); a @ b; torch.cuda.synchronize()\n"
          "    best = min(best, time.perf_counter() - t)\n"
          "print(2 * n**3 / best / 1e12)\n")


class CheckFailed(Exception):
    pass


@dataclass
class Check:
    name: str
    commands: list[list[str]]
    verify: Callable[[Path, list[str]], str]  # (work dir, each command's stdout) -> detail line
    estimate_s: int  # expected on an H200, start-up included; --budget_s bounds the whole run


def train(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "train.py", *flags, "--out_dir", str(out)]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        raise CheckFailed(f"no {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}


def falling_loss(values: dict[int, float], steps: int = STEPS) -> str:
    """Every step logged, finite, and the last three clearly below the first."""
    if sorted(values) != list(range(1, steps + 1)):
        raise CheckFailed(f"logged steps {sorted(values)[:3]}...{sorted(values)[-3:]}, expected 1..{steps}")
    bad = [s for s, v in values.items() if not math.isfinite(v)]
    if bad:
        raise CheckFailed(f"non-finite loss at steps {bad[:5]}")
    first, last = values[1], sum(values[s] for s in range(steps - 2, steps + 1)) / 3
    if not last < 0.9 * first:
        raise CheckFailed(f"loss did not fall: step 1 {first:.3f}, last three {last:.3f}")
    return f"loss {first:.3f} -> {values[steps]:.3f}"


def verify_run(name: str, fp16: bool = False) -> Callable[[Path, list[str]], str]:
    def verify(work: Path, _outputs: list[str]) -> str:
        detail = falling_loss(losses(work / name))
        if fp16:
            scales = [m["train/loss_scale"] for m in read_metrics(work / name) if "train/loss_scale" in m]
            if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
                raise CheckFailed("no finite train/loss_scale logged")
            skipped = [m.get("train/skipped_steps", 0) for m in read_metrics(work / name)][-1]
            detail += f", loss scale {scales[-1]:g}, {skipped:g} overflow steps skipped"
        return detail
    return verify


def verify_resume(work: Path, _outputs: list[str]) -> str:
    full, resumed = losses(work / "resume_zero3_full"), losses(work / "resume_zero3_resumed")
    falling_loss(full)
    later = [s for s in range(STEPS // 2 + 1, STEPS + 1)]
    if sorted(resumed) != later:
        raise CheckFailed(f"the resumed run logged steps {sorted(resumed)}, expected {later}")
    # Embedding backward on CUDA sums with atomics, so the order of additions may differ between runs.
    worst = max(abs(resumed[s] - full[s]) for s in later)
    if worst > 1e-3:
        raise CheckFailed(f"resumed losses differ from the uninterrupted run's by up to {worst:.2e}")
    return "bit-identical losses after resume" if worst == 0 else f"resumed losses within {worst:.1e}"


def verify_generate(work: Path, outputs: list[str]) -> str:
    if not (work / "export" / "model.safetensors").exists():
        raise CheckFailed("convert wrote no model.safetensors")
    text = outputs[-1].strip()
    if not text:
        raise CheckFailed("generate printed nothing")
    return f"generated {text[:40]!r}"


def verify_matmul(_work: Path, outputs: list[str]) -> str:
    return f"{float(outputs[-1].strip().splitlines()[-1]):.0f} TFLOP/s"


def throughput_of(out: Path) -> tuple[float, float | None]:
    """(tokens/s, MFU) of the last log window (the first holds start-up and compilation)."""
    logged = [m for m in read_metrics(out) if "train/tokens_per_sec" in m]
    if not logged:
        raise CheckFailed(f"{out.name} logged no throughput")
    falling_loss({m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}, THROUGHPUT_STEPS)
    last = logged[-1]
    return last["train/tokens_per_sec"], last.get("train/mfu")


def verify_throughput(preset: str) -> Callable[[Path, list[str]], str]:
    def verify(work: Path, _outputs: list[str]) -> str:
        runs = {mode: throughput_of(work / f"tput_{preset}_{mode}") for mode in ("eager", "compiled")}
        mode = max(runs, key=lambda m: runs[m][0])
        tps, mfu = runs[mode]
        matmul = _measured_matmul(work)
        line = f"{tps:,.0f} tok/s ({mode}; eager {runs['eager'][0]:,.0f}, compiled {runs['compiled'][0]:,.0f})"
        if mfu is not None:
            line += f", MFU {mfu:.1%} of the device's peak"
            if matmul:
                from marjara.train.metrics import gpu_peak_tflops
                import torch

                peak = gpu_peak_tflops(torch.cuda.get_device_name()) or 0.0
                line += f", {mfu * peak / matmul:.1%} of the measured bf16 matmul"
        return line
    return verify


def verify_compiled(work: Path, _outputs: list[str]) -> str:
    """The compiled `large` run of throughput_large: it trained under torch.compile, loss falling."""
    log = work / "tput_large_compiled.log"
    if not log.exists() or "the model runs under torch.compile" not in log.read_text():
        raise CheckFailed("the compiled large run did not report running under torch.compile")
    return "large under torch.compile: " + falling_loss(losses(work / "tput_large_compiled"), THROUGHPUT_STEPS)


def planner_device(name: str) -> str:
    from marjara.planner.devices import DEVICES

    for key in sorted(DEVICES, key=len, reverse=True):
        if key in name:
            return key
    raise CheckFailed(f"the planner knows no device like {name!r} ({', '.join(DEVICES)})")


def verify_planned_memory(work: Path, _outputs: list[str]) -> str:
    """The planner's per-GPU peak for the eager throughput runs against the peak they measured."""
    import torch

    from marjara.planner.measure import compare_peak, planned_peak_bytes

    device = planner_device(torch.cuda.get_device_name())
    lines = []
    for preset in THROUGHPUT:
        run = work / f"tput_{preset}_eager"
        peaks = [m["train/gpu_peak_memory_gib"] for m in read_metrics(run) if "train/gpu_peak_memory_gib" in m]
        if not peaks:
            raise CheckFailed(f"{run.name} logged no train/gpu_peak_memory_gib")
        planned = planned_peak_bytes(throughput_flags(preset, run), gpus=1, gpu=device)
        measured = max(peaks) * 2**30
        if not 0.5 <= planned / measured <= 2.0:
            raise CheckFailed(f"{preset}: " + compare_peak(planned, measured))
        lines.append(f"{preset}: " + compare_peak(planned, measured))
    return "; ".join(lines)


def _measured_matmul(work: Path) -> float | None:
    path = work / "matmul.txt"
    return float(path.read_text()) if path.exists() else None


def plan(work: Path) -> list[Check]:
    checks = []
    for stage in (0, 1, 2, 3):
        name = f"bf16_zero{stage}"
        checks.append(Check(name, [train(work / name, *SHORT, "--mixed_precision", "bf16",
                                         "--deepspeed_config", f"ds_configs/zero{stage}.json")], verify_run(name), 30))
    for stage in (0, 2):
        name = f"fp16_zero{stage}"
        checks.append(Check(name, [train(work / name, *SHORT, "--mixed_precision", "fp16",
                                         "--deepspeed_config", f"ds_configs/zero{stage}.json")],
                            verify_run(name, fp16=True), 30))
    checks.append(Check("moe_zero2", [train(work / "moe_zero2", *SHORT, "--mixed_precision", "bf16", "--use_moe",
                                            "--deepspeed_config", "ds_configs/moe_zero2.json")],
                        verify_run("moe_zero2"), 35))
    checks.append(Check("grad_checkpointing", [train(work / "grad_checkpointing", *SHORT, "--grad_checkpointing",
                                                     "--deepspeed_config", "ds_configs/zero2.json")],
                        verify_run("grad_checkpointing"), 30))
    full = train(work / "resume_zero3_full", *SHORT, "--deepspeed_config", "ds_configs/zero3.json",
                 "--save_interval", str(STEPS // 2))
    resumed = train(work / "resume_zero3_resumed", *SHORT, "--deepspeed_config", "ds_configs/zero3.json",
                    "--resume", str(work / "resume_zero3_full" / f"global_step{STEPS // 2}"))
    checks.append(Check("resume_zero3", [full, resumed], verify_resume, 60))
    checks.append(Check("convert_generate", [
        [sys.executable, "-m", "marjara.convert", str(work / "resume_zero3_full"), str(work / "export")],
        [sys.executable, "-m", "marjara.generate", str(work / "export"), "--prompt", "The ", "--max_new_tokens", "32",
         "--temperature", "0", "--device", "cuda"]], verify_generate, 30))
    checks.append(Check("bf16_matmul", [[sys.executable, "-c", MATMUL]], verify_matmul, 15))
    for preset in THROUGHPUT:
        eager, compiled = work / f"tput_{preset}_eager", work / f"tput_{preset}_compiled"
        checks.append(Check(f"throughput_{preset}", [
            [sys.executable, "train.py", *throughput_flags(preset, eager)],
            [sys.executable, "train.py", *throughput_flags(preset, compiled), "--compile"]],
            verify_throughput(preset), 80 if preset == "large" else 100))
        if preset == "large":
            checks.append(Check("compile", [], verify_compiled, 0))
    checks.append(Check("planned_memory", [], verify_planned_memory, 0))
    return checks


def throughput_flags(preset: str, out: Path) -> list[str]:
    return ["--model_size", preset, *THROUGHPUT[preset], "--max_steps", str(THROUGHPUT_STEPS), "--log_interval",
            str(THROUGHPUT_LOG), "--eval_interval", "0", "--sample_tokens", "0", "--save_interval", "0",
            "--warmup_steps", "5", "--mixed_precision", "bf16", "--deepspeed_config", "ds_configs/zero1.json",
            "--out_dir", str(out)]


def run_check(check: Check, work: Path, deadline: float) -> tuple[str, str]:
    outputs = []
    for cmd in check.commands:
        left = deadline - time.monotonic()
        if left < 5:
            return "SKIP", "out of the time budget"
        try:
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                    timeout=min(left, 3 * check.estimate_s))
        except subprocess.TimeoutExpired:
            return "FAIL", "out of the time budget while running"
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
            return "FAIL", f"exit {result.returncode}: {last[:200]}"
        outputs.append(result.stdout)
        if "--out_dir" in cmd:
            (work / f"{Path(cmd[cmd.index('--out_dir') + 1]).name}.log").write_text(result.stdout + result.stderr)
        if check.name == "bf16_matmul":
            (work / "matmul.txt").write_text(result.stdout.strip().splitlines()[-1])
    try:
        return "PASS", check.verify(work, outputs)
    except CheckFailed as exc:
        return "FAIL", str(exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true", help="print the checks and their commands; run nothing")
    p.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (names as --dry-run lists them)")
    p.add_argument("--work_dir", default=None, help="where runs write (default: a fresh temporary folder)")
    p.add_argument("--budget_s", type=float, default=540.0, help="stop starting runs after this many seconds")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="marjara_gpu_check_"))
    checks = plan(work)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in checks})
        if unknown:
            print(f"error: unknown check(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in checks)}",
                  file=sys.stderr)
            return 2
        checks = [c for c in checks if c.name in args.only]
    if args.dry_run:
        total = sum(c.estimate_s for c in checks)
        for check in checks:
            print(f"{check.name} (about {check.estimate_s} s):")
            if not check.commands:
                print(f"    (reads what earlier runs left: {check.verify.__doc__.splitlines()[0]})")
            for cmd in check.commands:
                print("    " + shlex.join(str(part) for part in cmd))
        print(f"{len(checks)} checks, about {total / 60:.1f} min; no run starts after --budget_s {args.budget_s:.0f} s; "
              f"runs write to {work}")
        return 0
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        print("error: no CUDA GPU here; run this on a GPU machine, or pass --dry-run to see the plan", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {time.strftime('%Y-%m-%d')} · {work}",
          flush=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    verdicts = []
    for check in checks:
        began = time.monotonic()
        verdict, detail = run_check(check, work, deadline)
        verdicts.append(verdict)
        print(f"{verdict:<4} {check.name:<20} {time.monotonic() - began:5.0f} s  {detail}", flush=True)
    counts = {v: verdicts.count(v) for v in ("PASS", "FAIL", "SKIP")}
    print(f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.monotonic() - start:.0f} s")
    return 0 if counts["FAIL"] == 0 and counts["SKIP"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
