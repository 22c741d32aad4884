"""Choosing a run: the lowest ZeRO stage (offload only when nothing else fits) and the micro-batch
x accumulation split that fits and reaches the target global batch; its time and its ds_config."""

from __future__ import annotations

from dataclasses import dataclass, replace

from marjara.errors import MarjaraError
from marjara.planner.comm import Traffic, add_sequence_traffic, step_traffic
from marjara.planner.memory import MemoryPlan, largest_micro_batch, plan_memory
from marjara.planner.sequence import sp_sizes
from marjara.planner.setup import Setup
from marjara.planner.shapes import flops_per_token

# (stage, offload_optimizer, offload_param), in the order a user should prefer them.
VARIANTS = [(0, False, False), (1, False, False), (2, False, False), (3, False, False),
            (2, True, False), (3, True, False), (3, True, True)]


def variant_name(stage: int, offload_optimizer: bool, offload_param: bool) -> str:
    return f"ZeRO-{stage}" + ("+opt+param" if offload_param else "+opt" if offload_optimizer else "")


@dataclass
class Candidate:
    setup: Setup
    max_micro_batch: int          # 0: one sequence does not fit
    micro_batch: int              # the split's (or 1 when nothing fits)
    grad_accum: int
    memory: MemoryPlan
    traffic: Traffic
    compute_seconds: float
    refused: str = ""             # why DeepSpeed would not run it at all

    @property
    def name(self) -> str:
        s = self.setup
        return variant_name(s.zero_stage, s.offload_optimizer, s.offload_param)

    @property
    def fits(self) -> bool:
        return not self.refused and self.max_micro_batch > 0 and self.memory.fits

    @property
    def global_sequences(self) -> int:
        return self.micro_batch * self.grad_accum * self.setup.data_parallel

    @property
    def step_seconds(self) -> float:
        return max(self.compute_seconds, self.traffic.seconds) + self.traffic.sequence_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.global_sequences * self.setup.seq_len / self.step_seconds


@dataclass(frozen=True)
class Target:
    micro_batch: int | None = None      # fixed by --batch_size or the JSON
    grad_accum: int | None = None       # fixed by --grad_accum or the JSON
    global_batch_tokens: int | None = None
    mfu: float = 0.4
    sp_size_fixed: bool = False         # --sp_size (or the JSON's sequence_parallel_size) given


def split(per_gpu: int, max_micro: int) -> tuple[int, int]:
    """The largest micro-batch <= max_micro dividing per_gpu sequences, and the accumulation."""
    micro = max(m for m in range(1, min(per_gpu, max_micro) + 1) if per_gpu % m == 0)
    return micro, per_gpu // micro


def sequences_per_gpu(setup: Setup, target: Target) -> int | None:
    if target.global_batch_tokens is None:
        return None
    sequences = target.global_batch_tokens / setup.seq_len
    ranks = setup.data_parallel
    if sequences < ranks:
        who = ("GPU", "GPUs") if setup.sp_size == 1 else ("data-parallel group", f"groups of --sp_size {setup.sp_size}")
        raise MarjaraError(
            f"--global_batch_tokens {target.global_batch_tokens} is less than one sequence of {setup.seq_len} tokens per "
            f"{who[0]} ({ranks} {who[1]} need at least {ranks * setup.seq_len}); raise it or use fewer GPUs")
    return round(sequences / ranks)


def evaluate(setup: Setup, target: Target) -> Candidate:
    per_gpu = sequences_per_gpu(setup, target)
    refused = ""
    if setup.model.use_moe and setup.zero_stage == 3:
        refused = "DeepSpeed's MoE layers do not run under ZeRO-3"
    limit = target.micro_batch or per_gpu or None
    max_micro = largest_micro_batch(setup, **({"limit": limit} if limit else {}))
    if per_gpu and max_micro and not target.micro_batch and target.grad_accum:
        micro, accum = max(1, per_gpu // target.grad_accum), target.grad_accum
    elif per_gpu and max_micro and not target.micro_batch:
        micro, accum = split(per_gpu, max_micro)
    else:
        # A fixed micro-batch, or none that fits (then 1, so that the time still covers the target).
        micro = target.micro_batch or max(max_micro, 1)
        accum = target.grad_accum or (max(1, round(per_gpu / micro)) if per_gpu else 1)
    memory = plan_memory(setup, micro)
    traffic = step_traffic(setup, micro, accum)
    add_sequence_traffic(setup, micro, accum, traffic)
    recompute = 4 / 3 if setup.grad_checkpointing else 1.0  # one more forward per step
    flops = flops_per_token(setup.model, setup.seq_len) * recompute * micro * accum * setup.seq_len
    flops /= setup.sp_size  # each rank of a sequence group: its tokens, and its heads of attention
    compute = flops / (setup.device.peak_tflops * 1e12 * target.mfu)
    return Candidate(setup, max_micro, micro, accum, memory, traffic, compute, refused)


def candidates(setup: Setup, target: Target, fixed_zero: tuple[int, bool, bool] | None) -> list[Candidate]:
    variants = [fixed_zero] if fixed_zero else VARIANTS
    return [evaluate(setup.with_zero(*variant), target) for variant in variants]


def _first_fit(setup: Setup, target: Target, variants) -> Candidate | None:
    return next((c for c in (evaluate(setup.with_zero(*v), target) for v in variants) if c.fits), None)


def recommend(setup: Setup, target: Target, fixed_zero) -> tuple[list[Candidate], Candidate | None]:
    """The table's candidates (under the run's checkpointing setting) and the first that fits,
    trying activation checkpointing too when nothing fits without it. When nothing fits at all and
    --sp_size was not given, sequence parallelism: the smallest size (sequence.sp_sizes' order)
    that fits without offload, without and then with checkpointing; then with ZeRO's offload;
    then with the checkpointed activations offloaded to the host too. A global batch of fewer
    sequences than GPUs starts at the smallest sequence parallelism that spreads it over all."""
    sizes = [] if target.sp_size_fixed else sp_sizes(setup)
    if sizes and target.global_batch_tokens and target.global_batch_tokens / setup.seq_len < setup.world:
        # Fewer sequences per step than GPUs: one rank per sample cannot run at all, the smallest
        # sequence groups that give every GPU a share of a sample can.
        enough = [n for n in sizes if target.global_batch_tokens / setup.seq_len >= setup.world // n]
        if enough:
            setup = replace(setup, sp_size=min(enough))
            sizes = [n for n in sizes if n > setup.sp_size]
    table = candidates(setup, target, fixed_zero)
    chosen = next((c for c in table if c.fits), None)
    if chosen is None and not setup.grad_checkpointing:
        chosen = next((c for c in candidates(replace(setup, grad_checkpointing=True), target, fixed_zero) if c.fits), None)
    variants = [fixed_zero] if fixed_zero else VARIANTS
    checkpointing = (True,) if setup.grad_checkpointing else (False, True)
    parallel = [replace(setup, sp_size=n, grad_checkpointing=ck) for n in sizes for ck in checkpointing]
    offloaded = [replace(setup, sp_size=n, grad_checkpointing=True, offload_activations=True)
                 for n in [setup.sp_size, *sizes] if not setup.offload_activations]
    in_memory = [v for v in variants if not (v[1] or v[2])]
    for trials, allowed in ((parallel, in_memory), (parallel, variants), (offloaded, variants)):
        for trial in trials:
            chosen = chosen or _first_fit(trial, target, allowed)
    return table, chosen
