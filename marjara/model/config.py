"""Model configuration: presets, validation with clear errors, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from marjara.errors import MarjaraError
from marjara.fileio import parse_json_object

# GQA defaults: tiny/small/medium share each K/V head between 2 query heads, large between 3.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "small": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512),
    "medium": dict(d_model=512, n_layers=12, n_heads=8, n_kv_heads=4, max_seq_len=1024),
    "large": dict(d_model=768, n_layers=24, n_heads=12, n_kv_heads=4, max_seq_len=1024),
    # GPU scale. 1b: about 1.2B parameters (head_dim 128, 4 query heads per K/V head). 7b: Llama-2-7B's
    # dimensions (its SwiGLU width, untied output matrix) with 8 K/V heads instead of 32.
    "1b": dict(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4, max_seq_len=2048),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_size=11008,
               tie_embeddings=False, max_seq_len=4096),
}

# GPT-2's 50257 tokens padded to a multiple of 64 (faster matmuls); overridden per tokenizer.
DEFAULT_VOCAB_SIZE = 50304


@dataclass
class ModelConfig:
    vocab_size: int = DEFAULT_VOCAB_SIZE
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    # SwiGLU hidden size; 0 means 8/3 * d_model rounded up to a multiple of ffn_multiple_of.
    ffn_hidden_size: int = 0
    ffn_multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Mixture of experts (deepspeed.moe.layer.MoE); layer i is MoE when i % moe_layer_freq equals
    # moe_layer_freq - 1, so the default 2 makes every other layer (1, 3, ...) an MoE layer.
    use_moe: bool = False
    num_experts: int = 4
    top_k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    use_residual: bool = False
    moe_layer_freq: int = 2
    ep_size: int = 1
    aux_loss_coef: float = 0.01
    preset: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.ffn_hidden_size == 0 and self.ffn_multiple_of > 0:
            raw = int(8 * self.d_model / 3)
            self.ffn_hidden_size = self.ffn_multiple_of * math.ceil(raw / self.ffn_multiple_of)
        self.validate()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise MarjaraError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[name], "preset": name, **overrides}
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MarjaraError(
                f"unknown model config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        values = parse_json_object(text, "model config", "fix or regenerate the file",
                                   "it must be an object of field: value pairs")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "ModelConfig") -> list[str]:
        """Human-readable `field: mine != theirs` lines for the fields that define the weights."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{key}: {mine[key]!r} != {theirs[key]!r}"
            for key in sorted(mine)
            if key not in _NON_ARCHITECTURAL and mine[key] != theirs[key]
        ]

    # ---- derived ------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.use_moe and layer % self.moe_layer_freq == self.moe_layer_freq - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        problems: list[str] = []

        def positive(*names: str) -> None:
            for name in names:
                if getattr(self, name) <= 0:
                    problems.append(f"{name} must be > 0 (got {getattr(self, name)})")

        positive("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size",
                 "max_seq_len", "rope_theta", "norm_eps", "init_std")
        if self.n_heads > 0 and self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        elif self.n_heads > 0 and self.head_dim % 2:
            problems.append(f"head_dim = d_model / n_heads ({self.head_dim}) must be even for RoPE")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.use_moe:
            positive("num_experts", "ep_size", "moe_layer_freq", "capacity_factor", "eval_capacity_factor")
            if self.top_k not in (1, 2):
                problems.append(f"top_k must be 1 or 2 (got {self.top_k}); DeepSpeed's MoE gate supports no other")
            elif self.top_k > self.num_experts:
                problems.append(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
            if self.ep_size > 0 and self.num_experts > 0 and self.num_experts % self.ep_size:
                problems.append(f"num_experts ({self.num_experts}) must be divisible by ep_size ({self.ep_size})")
            if self.min_capacity < 0:
                problems.append(f"min_capacity must be >= 0 (got {self.min_capacity})")
            if self.aux_loss_coef < 0:
                problems.append(f"aux_loss_coef must be >= 0 (got {self.aux_loss_coef})")
            if self.moe_layer_freq > 0 and not self.moe_layers:
                problems.append(
                    f"moe_layer_freq ({self.moe_layer_freq}) exceeds n_layers ({self.n_layers}): no layer would be MoE"
                )
        if problems:
            raise MarjaraError("invalid model config: " + "; ".join(problems))


# Fields that do not change the shape or meaning of the weights (a checkpoint may be resumed or
# loaded with other values).
_NON_ARCHITECTURAL = {"preset", "dropout", "capacity_factor", "eval_capacity_factor", "min_capacity",
                      "drop_tokens", "ep_size", "aux_loss_coef", "max_seq_len", "init_std"}
