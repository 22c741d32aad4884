"""Peak memory per rank of one training step against seq_len, at --sp_size 1 and 2, on CPU ranks.

    python bench/long_context.py                       # tiny, 2K..32K tokens, budget 256 MiB
    python bench/long_context.py --model_size small --lengths 2048 4096 8192 --budget_mib 512

Every (sp_size, seq_len) runs in fresh processes (sp_size ranks, through torchrun) that build the
Learner exactly as train.py does, with the long-context memory settings at both sp sizes
(--grad_checkpointing --tiled_mlp; the output head always computes its loss in token chunks),
batch 1, fp32, ZeRO-0. Each rank runs one step (which also creates the optimizer state), then
measures the second.

How memory is measured: tracemalloc does not see torch's allocations and torch keeps no statistics
of its CPU allocator, so this reads the kernel's count of the process's resident memory. The
high-water mark (VmHWM) is reset just before the measured step (writing 5 to
/proc/self/clear_refs) and read after it; the figure is that peak minus the resident memory just
before the step (weights, gradients, optimizer state and the libraries are in both). glibc is told
to serve every allocation of 64 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_=65536), so
that freed tensors leave the resident set at once and the peak is that of the live tensors, not of
malloc's cache. The reported peak of a setting is the largest over its ranks.

The table gives the peak per length and setting and the ratio sp2 / sp1; below it, the longest
measured seq_len whose peak fits --budget_mib at each setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(out: str, train_args: list[str]) -> int:
    """One rank: build the run, one warm-up step, then one measured step."""
    import marjara  # noqa: F401
    from marjara.compat.deepspeed import release_engine
    from marjara.distributed import rank, shutdown
    from marjara.train.args import parse_config
    from marjara.train.learner import Learner

    learner = Learner(parse_config(train_args))
    learner.meter = learner._start()
    learner.train_step()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    learner.train_step()
    peak = _status_kib("VmHWM")
    result = {"rank": rank(), "before_mib": before / 1024, "peak_mib": peak / 1024,
              "step_peak_mib": (peak - before) / 1024}
    Path(f"{out}.rank{rank()}.json").write_text(json.dumps(result))
    release_engine(learner.engine)
    del learner
    shutdown()
    return 0


def measure(model_size: str, sp_size: int, seq_len: int, port: int, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m")
        train_args = ["--model_size", model_size, "--seq_len", str(seq_len), "--batch_size", "1",
                      "--sp_size", str(sp_size), "--grad_checkpointing", "--tiled_mlp", "--max_steps", "2",
                      "--eval_interval", "0", "--sample_tokens", "0", "--mixed_precision", "fp32",
                      "--out_dir", os.path.join(tmp, "run")]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "MALLOC_MMAP_THRESHOLD_": "65536"}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp_size),
                   "--master_port", str(port), __file__, "--worker", out, "--", *train_args]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"sp {sp_size} seq_len {seq_len} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(sp_size)]
    return max(ranks, key=lambda r: r["step_peak_mib"])


def longest_within(results: dict[int, dict], budget: float) -> int | None:
    fitting = [length for length, r in results.items() if r["step_peak_mib"] <= budget]
    return max(fitting) if fitting else None


def main() -> int:
    if "--worker" in sys.argv:
        split = sys.argv.index("--")
        return worker(sys.argv[sys.argv.index("--worker") + 1], sys.argv[split + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--budget_mib", type=float, default=256.0,
                        help="per-rank budget for one step's peak above its starting memory")
    parser.add_argument("--port", type=int, default=29700)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per measurement")
    args = parser.parse_args()

    print(f"# bench/long_context.py, {date.today().isoformat()}: model {args.model_size}, batch 1, fp32, ZeRO-0, "
          "--grad_checkpointing --tiled_mlp, CPU ranks (gloo)")
    print("# peak = one training step's peak resident memory per rank above the memory before it (MiB); "
          "worst rank")
    results: dict[int, dict[int, dict]] = {1: {}, 2: {}}
    print(f"{'seq_len':>8} | {'sp1 peak':>9} | {'sp2 peak':>9} | {'sp2/sp1':>7} | {'sp1 RSS':>8} | {'sp2 RSS':>8}")
    for i, length in enumerate(args.lengths):
        for sp in (1, 2):
            results[sp][length] = measure(args.model_size, sp, length, args.port + 2 * i + sp, args.timeout)
        one, two = results[1][length], results[2][length]
        print(f"{length:>8} | {one['step_peak_mib']:>9.1f} | {two['step_peak_mib']:>9.1f} | "
              f"{two['step_peak_mib'] / one['step_peak_mib']:>7.2f} | {one['peak_mib']:>8.0f} | {two['peak_mib']:>8.0f}",
              flush=True)
    best = {sp: longest_within(results[sp], args.budget_mib) for sp in (1, 2)}
    print(f"# longest seq_len within {args.budget_mib:g} MiB per rank (of the lengths measured): "
          f"sp1 {best[1]}, sp2 {best[2]}"
          + (f" ({best[2] / best[1]:.2f}x)" if best[1] and best[2] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
