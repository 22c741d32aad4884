"""What one plan is about: the model, the precision and ZeRO settings, and the cluster."""

from __future__ import annotations

from dataclasses import dataclass, replace

from marjara.model.config import ModelConfig
from marjara.planner.devices import Device

# DeepSpeed 0.19's defaults for the zero_optimization keys the plan reads (runtime/zero/config.py).
ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "overlap_comm": None,               # DeepSpeed: True under ZeRO-3, False below
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
}


@dataclass(frozen=True)
class Setup:
    model: ModelConfig
    seq_len: int
    precision: str                  # bf16 | fp16 | fp32
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    grad_checkpointing: bool
    nodes: int
    gpus_per_node: int
    device: Device
    zero: dict                      # zero_optimization settings, ZERO_DEFAULTS filled in
    sp_size: int = 1                # Ulysses sequence-parallel ranks per sample (marjara/planner/sequence.py)
    offload_activations: bool = False  # checkpointed block inputs kept in host memory
    tiled_mlp: bool = False         # not modelled: the SwiGLU's activations are counted untiled

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        """Ranks that read different samples: a sequence-parallel group of sp_size ranks shares one."""
        return self.world // self.sp_size

    @property
    def local_seq_len(self) -> int:
        """Tokens of each sample one rank holds outside attention."""
        return self.seq_len // self.sp_size

    @property
    def ep_size(self) -> int:
        return self.model.ep_size if self.model.use_moe else 1

    @property
    def bytes_per_value(self) -> int:
        """Bytes of a parameter, gradient or activation element in the model's working precision."""
        return 4 if self.precision == "fp32" else 2

    @property
    def overlap_comm(self) -> bool:
        value = self.zero.get("overlap_comm")
        return self.zero_stage == 3 if value is None else bool(value)

    def with_zero(self, stage: int, offload_optimizer: bool = False, offload_param: bool = False) -> "Setup":
        return replace(self, zero_stage=stage, offload_optimizer=offload_optimizer, offload_param=offload_param)


def zero_settings(block: dict) -> dict:
    return {key: block.get(key, default) for key, default in ZERO_DEFAULTS.items()}
