"""Ulysses sequence parallelism (`--sp_size N`, DeepSpeed-Ulysses) in the plan.

Each sample's seq_len tokens are split over the N consecutive ranks of a sequence group. Outside
attention a rank holds seq_len / N tokens of every tensor. Attention exchanges heads for tokens by
all-to-all: q, k and v go from (B, T/N, H, D) to (B, T, H/N, D), SDPA runs on the whole sequence
for H/N heads, and its output goes back. The element count per rank is the same either way, and
SDPA's flash / memory-efficient kernels keep no T x T matrix (only the output and a log-sum-exp
per head and token), so attention's activations per rank are those of seq_len / N tokens too.
Key/value heads that N does not divide are replicated to lcm(kv_heads, N) before the exchange (as
ALST does, and marjara/model/ulysses.py), so that every rank receives whole ones.

What Ulysses keeps beyond the single-rank count, per local token and layer: SDPA keeps its own
output beside the exchanged one the output projection keeps (s x d), the exchanged v is a tensor of
its own rather than a view of the fused projection (s x kv'), and replication widens k
(s x (kv' - kv)). The fused projection itself is still counted: an upper bound, since in 16-bit
runs nothing may keep it once q/k norms have their fp32 copies.

Traffic: per layer and micro-batch, forward sends four all-to-alls (q, k, v, out), each moving
(N - 1) / N of the local tensor; backward sends the same again; activation checkpointing's
recomputed forward a third time. Attention waits for them, so their time adds to the step's
instead of overlapping compute as ZeRO's collectives do.

ZeRO partitions and reduces over the sequence-data-parallel group: DeepSpeed 0.19's engine hands
its optimizers `seq_data_parallel_group` (data x sequence ranks, every rank of the world here), so
model states and their collectives are those of the world, not of world / N.
"""

from __future__ import annotations

from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig
from marjara.model.ulysses import kv_heads_after_replication
from marjara.planner.setup import Setup


def exchanged_kv_heads(config: ModelConfig, sp_size: int) -> int:
    """Key/value heads the all-to-all carries: the model's, replicated as the model does."""
    return kv_heads_after_replication(config.n_heads, config.n_kv_heads, sp_size)


def sp_problem(config: ModelConfig, seq_len: int, world: int, sp_size: int) -> str:
    """Why --sp_size cannot run this model on this many GPUs ('' when it can)."""
    if sp_size < 1:
        return f"--sp_size must be >= 1 (got {sp_size})"
    if world % sp_size:
        return f"--sp_size {sp_size} must divide the {world} GPUs (nodes x gpus_per_node); pick a divisor of {world}"
    if sp_size == 1:
        return ""
    if config.use_moe:
        return "--sp_size > 1 with --use_moe is not planned (the expert all-to-all over sequence ranks is not modelled)"
    if seq_len % sp_size:
        return f"--seq_len {seq_len} must be divisible by --sp_size {sp_size}; pick a multiple of {sp_size}"
    if config.n_heads % sp_size:
        return (f"--sp_size {sp_size} must divide the {config.n_heads} attention heads of {config.preset}; "
                f"pick a divisor of {config.n_heads}")
    return ""


def check_sp(setup: Setup) -> None:
    """train.py's own rules (TrainConfig refuses --offload_activations without checkpointing)."""
    problem = sp_problem(setup.model, setup.seq_len, setup.world, setup.sp_size)
    if problem:
        raise MarjaraError(problem)


def ulysses_bytes_per_token(setup: Setup) -> float:
    """What one layer keeps per local token beyond the single-rank count (the module's docstring)."""
    if setup.sp_size == 1:
        return 0.0
    c, s = setup.model, setup.bytes_per_value
    kv, exchanged = c.n_kv_heads * c.head_dim, exchanged_kv_heads(c, setup.sp_size) * c.head_dim
    return s * (c.d_model + exchanged + (exchanged - kv))


def all_to_all_bytes_per_layer(setup: Setup, micro_batch: int) -> float:
    """Bytes one rank sends in one layer's forward: q, k, v and the output, (N - 1) / N of each."""
    n = setup.sp_size
    if n == 1:
        return 0.0
    c = setup.model
    heads = 2 * c.n_heads + 2 * exchanged_kv_heads(c, n)  # q and out, k and v
    local = micro_batch * setup.local_seq_len * heads * c.head_dim * setup.bytes_per_value
    return (n - 1) / n * local


def sp_sizes(setup: Setup) -> list[int]:
    """--sp_size values worth trying, in the order a user should prefer them: powers of two from 2
    that fit in a node, then those that span nodes (whose all-to-all crosses the slower network)."""
    sizes, n = [], 2
    while n <= setup.world:
        if not sp_problem(setup.model, setup.seq_len, setup.world, n):
            sizes.append(n)
        n *= 2
    return sorted(sizes, key=lambda n: (n > setup.gpus_per_node, n))
