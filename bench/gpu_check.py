"""MARJARA on one GPU, checked in one short run: one line per check, then the throughput table
and a summary. Sized for a lent H200's 15 minutes: the most important runs come first and
--budget_s skips what would not fit (the estimates are leads until a device run times them).

    python bench/gpu_check.py                       # on a machine with one CUDA GPU
    python bench/gpu_check.py --dry-run             # the plan, its time estimates and what the budget skips
    python bench/gpu_check.py --only bf16_zero3 resume_zero3 --budget_s 200

Checks: a bf16 matmul measured here (the ceiling MFU is also compared with); tokens/s and MFU of
`1b`, `large` and `small` in bf16, eager and under --compile, with and without
--grad_checkpointing, each at the largest micro-batch that fits, and the scale planner's per-GPU
peak memory for each run against torch.cuda.max_memory_allocated() (bench/gpu_throughput.py);
bf16 under ZeRO 0/1/2/3 and fp16 under ZeRO 0/2 (20 steps of `small`, finite falling loss; fp16
also logs its loss scale), MoE under ZeRO-2, --grad_checkpointing, resume of a ZeRO-3 run (the
resumed losses equal the uninterrupted run's), convert + generate of its result. These small runs
share the GPU, PARALLEL at a time; the timed runs have it alone. Every run is train.py (or the
marjara command) as users start it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput  # noqa: E402
from gpu_schedule import PARALLEL, Check, admit, group_estimate, groups, run_group  # noqa: E402
from gpu_throughput import CheckFailed, CheckSkipped, read_metrics  # noqa: E402

STEPS = 20
SHORT = ["--model_size", "small", "--seq_len", "256", "--batch_size", "8", "--max_steps", str(STEPS),
         "--log_interval", "1", "--eval_interval", "0", "--sample_tokens", "0", "--save_interval", "0",
         "--warmup_steps", "2", "--lr", "1e-3"]
MATMUL = ("import torch, time\n"
          "n = 8192; a = torch.randn(n, n, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)\n"
          "for _ in range(3): a @ b\n"
          "times = []\n"
          "for _ in range(20):\n"
          "    torch.cuda.synchronize(); t = time.perf_counter(); a @ b; torch.cuda.synchronize()\n"
          "    times.append(time.perf_counter() - t)\n"
          "print(2 * n**3 / sorted(times)[10] / 1e12)\n")  # the median of 20 products, random data


def train(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "train.py", *flags, "--out_dir", str(out)]


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



def measured_matmul(work: Path) -> float | None:
    path = work / "matmul.txt"
    return float(path.read_text()) if path.exists() else None


def planner_device(name: str) -> str:
    from marjara.planner.devices import DEVICES

    for key in sorted(DEVICES, key=len, reverse=True):
        if key in name:
            return key
    raise CheckFailed(f"the planner knows no device like {name!r} ({', '.join(DEVICES)})")


def correctness_checks(work: Path) -> list[Check]:
    """The small runs: every precision / ZeRO path, MoE, checkpointing, resume, convert + generate."""
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
         "--temperature", "0", "--device", "cuda"]], verify_generate, 30, needs="resume_zero3"))
    for check in checks:
        check.parallel = True
    return checks


def throughput_check(run: gpu_throughput.Run, work: Path, gpu: str, batches: dict, results: list[dict]) -> Check:
    """One timed run; the command shown is its first try, at the planner's micro-batch."""
    start = gpu_throughput.planned_batch(run.preset, run.checkpointed, gpu)
    command = [sys.executable, "train.py", *gpu_throughput.run_flags(run, start, work / f"{run.name}_b{start}")]
    return Check(run.name.replace("tput_", "throughput_"), [command], lambda _w, _o: "",
                 gpu_throughput.estimate_s(run, start, gpu),
                 execute=lambda work, deadline: gpu_throughput.execute(run, work, deadline, gpu, batches, results))


def plan(work: Path, gpu: str = "H200") -> tuple[list[Check], list[dict]]:
    """The checks in the order they run, and the list the throughput runs fill."""
    batches: dict = {}
    results: list[dict] = []
    timed = [throughput_check(run, work, gpu, batches, results) for run in gpu_throughput.RUNS]

    def verify_compiled(_work: Path, _outputs: list[str]) -> str:
        """The --compile throughput runs that passed: each reported torch.compile, losses finite and falling."""
        compiled = [r for r in results if r["mode"].startswith("compiled")]
        if not compiled:
            raise CheckSkipped("no --compile throughput run passed (their own lines say why)")
        return "under torch.compile: " + ", ".join(f"{r['preset']} {r['mode']}" for r in compiled)

    def verify_planned_memory(_work: Path, _outputs: list[str]) -> str:
        """Each throughput run's planned per-GPU peak against the peak it measured."""
        return gpu_throughput.verify_planned_memory(results)

    checks = ([Check("bf16_matmul", [[sys.executable, "-c", MATMUL]], verify_matmul, 15)] + timed[:2]
              + correctness_checks(work) + timed[2:]
              + [Check("compile", [], verify_compiled, 0), Check("planned_memory", [], verify_planned_memory, 0)])
    return checks, results


def run_check(check: Check, work: Path, deadline: float) -> tuple[str, str]:
    try:
        if check.execute is not None:
            return check.execute(work, deadline)
        env = {**os.environ, "OMP_NUM_THREADS": "4"} if check.parallel else None
        outputs = []
        for cmd in check.commands:
            left = deadline - time.monotonic()
            if left < 5:
                return "SKIP", "out of the time budget"
            try:
                result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                                        timeout=min(left, 3 * check.estimate_s))
            except subprocess.TimeoutExpired:
                return "FAIL", "out of the time budget while running"
            if "--out_dir" in cmd:
                (work / f"{Path(cmd[cmd.index('--out_dir') + 1]).name}.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
                return "FAIL", f"exit {result.returncode}: {last[:200]}"
            outputs.append(result.stdout)
            if check.name == "bf16_matmul":
                (work / "matmul.txt").write_text(result.stdout.strip().splitlines()[-1])
        return "PASS", check.verify(work, outputs)
    except CheckFailed as exc:
        return "FAIL", str(exc)
    except CheckSkipped as exc:
        return "SKIP", str(exc)


def print_plan(checks: list[Check], budget_s: float, work: Path) -> None:
    """Every check, its commands and estimate, the order they run in, and what --budget_s would skip."""
    left, skipped = budget_s, []
    for group in groups(checks):
        admitted = admit(group, left)
        left -= group_estimate(admitted)
        skipped += [c.name for c in group if c not in admitted]
        for check in group:
            together = f", {PARALLEL} at a time with its neighbours" if check.parallel else ""
            print(f"{check.name} (about {check.estimate_s} s{together}):")
            if not check.commands:
                print(f"    (reads what earlier runs left: {check.verify.__doc__.splitlines()[0]})")
            for cmd in check.commands:
                print("    " + shlex.join(str(part) for part in cmd))
            if check.execute is not None:
                print("    (micro-batch: the planner's; 3/4 of it again after an out-of-memory exit, "
                      f"at most {gpu_throughput.MAX_TRIES} runs)")
    total = sum(group_estimate(g) for g in groups(checks))
    print(f"{len(checks)} checks, about {total / 60:.1f} min in all; runs write to {work}")
    print(f"under --budget_s {budget_s:.0f}: {len(checks) - len(skipped)} run, {len(skipped)} skipped"
          + (f" ({', '.join(skipped)})" if skipped else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--dry-run", action="store_true", help="print the checks, their commands and estimates; run nothing")
    p.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (names as --dry-run lists them)")
    p.add_argument("--work_dir", default=None, help="where runs write (default: a fresh temporary folder)")
    p.add_argument("--budget_s", type=float, default=330.0,
                   help="start no check whose estimate no longer fits in this many seconds (default 330: one "
                        "rerun still fits in the device's 15 minutes; see docs/gpu-run.md)")
    p.add_argument("--gpu", default=None, help="the planner's device for --dry-run (default H200; on a GPU: the one here)")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="marjara_gpu_check_"))
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            print("error: no CUDA GPU here; run this on a GPU machine, or pass --dry-run to see the plan",
                  file=sys.stderr)
            return 2
    try:
        gpu = args.gpu or ("H200" if args.dry_run else planner_device(torch.cuda.get_device_name()))
        from marjara.planner.devices import lookup

        lookup(gpu)
    except Exception as exc:  # CheckFailed or the planner's MarjaraError: one line either way
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checks, results = plan(work, gpu)
    if args.only:
        names = {c.name for c in checks}
        unknown = sorted(set(args.only) - names)
        if unknown:
            print(f"error: unknown check(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in checks)}",
                  file=sys.stderr)
            return 2
        wanted = set(args.only) | {c.needs for c in checks if c.name in args.only and c.needs}
        checks = [c for c in checks if c.name in wanted]
    if args.dry_run:
        print_plan(checks, args.budget_s, work)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} (CUDA {torch.version.cuda}) · "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · budget {args.budget_s:.0f} s · {work}", flush=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    verdicts = []

    def report(verdict: str, name: str, detail: str, seconds: float) -> None:
        verdicts.append(verdict)
        print(f"{verdict:<4} {name:<30} {seconds:5.0f} s  {detail}", flush=True)

    for group in groups(checks):
        run_group(group, lambda check: run_check(check, work, deadline), deadline, report)
    from marjara.train.metrics import gpu_peak_tflops

    if results:
        print("throughput (bf16, ZeRO-1, one GPU; MFU of the device's dense bf16 peak):")
        print(gpu_throughput.table(results, measured_matmul(work), gpu_peak_tflops(torch.cuda.get_device_name())))
    counts = {v: verdicts.count(v) for v in ("PASS", "FAIL", "SKIP")}
    print(f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.monotonic() - start:.0f} s")
    return 0 if counts["FAIL"] == 0 and counts["SKIP"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
