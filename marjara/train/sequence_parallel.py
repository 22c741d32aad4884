"""Ulysses sequence parallelism for a training run (--sp_size N): groups, checks, data, loss.

The world is cut into groups of N consecutive ranks; the N ranks of a group train on the same
samples, each on T/N consecutive tokens of every sample, and the groups are the data-parallel
ranks (world / N of them). What each part here guarantees:

- groups: DeepSpeed's parallel_state_sp registered as the engine's mpu (marjara.compat.deepspeed_sequence explains
  why not the config keys), so gradients are reduced over the data x sequence ranks and ZeRO
  partitions over them;
- data: the sample stream and the validation set are split between the data-parallel ranks only
  (dp_rank, dp_world); each rank then takes its slice of x and of y, y having been shifted over
  the whole sample first, so a slice's last token predicts the next slice's first;
- positions: rank r's tokens are at positions r*T/N .. (r+1)*T/N - 1 (RoPE sees global positions);
- loss: every rank returns the mean over all tokens of the sample group (the sum over the N
  slices / their token count), not a mean of per-rank means; its backward gives each rank the
  gradient of its own tokens' share, scaled for the way the ZeRO stage reduces over the sequence
  ranks (marjara.compat.deepspeed_sequence.sequence_gradient_scale).
"""

from __future__ import annotations

import torch

from marjara import distributed
from marjara.compat.deepspeed_sequence import sequence_gradient_scale, sequence_parallel_mpu
from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig
from marjara.model.ulysses import UlyssesAttention


def check_layout(sp_size: int, config: ModelConfig, seq_len: int, world: int) -> None:
    """What --sp_size needs of the world and the model, refused in one line before anything starts."""
    if sp_size == 1:
        return
    problems = []
    if world % sp_size:
        problems.append(f"--sp_size {sp_size} must divide the number of ranks ({world}); launch a multiple of "
                        f"{sp_size} ranks or lower --sp_size")
    if seq_len % sp_size:
        problems.append(f"--seq_len {seq_len} must be divisible by --sp_size {sp_size} (each rank holds seq_len / "
                        f"sp_size tokens); use --seq_len {seq_len - seq_len % sp_size or sp_size}")
    if config.n_heads % sp_size:
        problems.append(f"the model's {config.n_heads} attention heads must be divisible by --sp_size {sp_size} (each "
                        f"rank attends with n_heads / sp_size whole heads); choose --sp_size dividing {config.n_heads}")
    if config.use_moe:
        problems.append(f"--use_moe cannot run with --sp_size {sp_size}: DeepSpeed's MoE gate computes expert "
                        "capacity and the load-balancing loss from the tokens of one rank, which would then be one "
                        "slice of a sample, and its expert groups ignore the sequence ranks; train MoE with --sp_size 1")
    if problems:
        raise MarjaraError("; ".join(problems))


class _SampleMean(torch.autograd.Function):
    """Forward: the sum of every sequence rank's `local_sum` / the sum of their `local_count`, both
    in one all-reduce (float64: a count past 2**24 tokens stays exact). Backward: this rank's own
    share only (each rank's gradient covers its tokens; DeepSpeed adds the ranks' gradients up),
    times grad_scale."""

    @staticmethod
    def forward(ctx, local_sum, local_count, group, grad_scale):
        totals = distributed.all_reduce(torch.stack([local_sum.double(), local_count.double()]), group=group)
        count = totals[1].clamp(min=1)
        ctx.scale = grad_scale / count
        return (totals[0] / count).to(local_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale.to(grad.dtype), None, None, None


class SequenceParallel:
    """The model's sequence-parallel hook (MarjaraModel.sequence_parallel): positions and loss."""

    def __init__(self, group, sp_size: int, sp_rank: int, zero_stage: int) -> None:
        self.group, self.sp_size, self.sp_rank = group, sp_size, sp_rank
        self.grad_scale = sequence_gradient_scale(zero_stage, sp_size)

    def positions(self, batch: int, local_len: int, device) -> torch.Tensor:
        first = self.sp_rank * local_len
        return torch.arange(first, first + local_len, device=device).expand(batch, local_len)

    def sample_mean(self, local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
        """The sample's mean cross-entropy from this slice's summed cross-entropy and target count."""
        return _SampleMean.apply(local_sum, local_count, self.group, self.grad_scale)

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a (B, T) micro-batch whose y is already x shifted over the whole sample."""
        width = x.size(1) // self.sp_size
        cut = slice(self.sp_rank * width, (self.sp_rank + 1) * width)
        return x[:, cut].contiguous(), y[:, cut].contiguous()


class Layout:
    """Where this rank stands: its data-parallel rank and world, and (sp_size > 1) the mpu for
    deepspeed.initialize and the model's hook."""

    def __init__(self, sp_size: int, zero_stage: int, rank: int, world: int) -> None:
        self.sp_size = sp_size
        self.dp_rank, self.dp_world = rank // sp_size, world // sp_size
        self.mpu = self.hook = None
        if sp_size > 1:
            self.mpu = sequence_parallel_mpu(sp_size)
            self.hook = SequenceParallel(self.mpu.get_sequence_parallel_group(), sp_size,
                                         self.mpu.get_sequence_parallel_rank(), zero_stage)

    def attach(self, model) -> None:
        """Give the model (before the engine wraps it) its hook and every block its distributed attention."""
        if self.hook is None:
            return
        model.sequence_parallel = self.hook
        c = model.config
        for block in model.blocks:
            block.attn.sequence_parallel = UlyssesAttention(self.hook.group, self.sp_size, c.n_heads, c.n_kv_heads)

    def shard(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch if self.hook is None else self.hook.shard(*batch)

