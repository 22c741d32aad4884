"""Model configuration: presets, validation with clear errors, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from marjara.errors import MarjaraError
from marjara.rules import Rule, above, at_least, fraction, one_of
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


def knob(default: Any, help: str = "", *, rule: Rule | None = None, architectural: bool = True, flag: bool = False,
         moe: bool = False, plan: bool = False, **field_args: Any):
    """A ModelConfig field, declared once with what the rest of MARJARA derives from it:
    `rule`: its valid values (validate() checks them; train.py checks its flag with the same rule);
    `architectural`: it defines the weights, so a resumed or initialised run must match it;
    `flag`: a training run sets it, as a train.py flag with this `help` and the field's default;
    `moe`: it matters only with use_moe (checked and applied only then);
    `plan`: `python -m marjara.plan`'s memory and time estimate depends on it."""
    return field(default=default, metadata={"help": help, "rule": rule, "architectural": architectural, "flag": flag,
                                            "moe": moe, "plan": plan}, **field_args)


POSITIVE = above(0)


@dataclass
class ModelConfig:
    vocab_size: int = knob(DEFAULT_VOCAB_SIZE, "tokens in the vocabulary", rule=POSITIVE)
    d_model: int = knob(128, "width of the residual stream", rule=POSITIVE)
    n_layers: int = knob(4, "transformer blocks", rule=POSITIVE)
    n_heads: int = knob(4, "query heads", rule=POSITIVE)
    n_kv_heads: int = knob(2, "key/value heads (grouped-query attention)", rule=POSITIVE)
    ffn_hidden_size: int = knob(0, "SwiGLU hidden size; 0: 8/3 x d_model rounded up to a multiple of ffn_multiple_of",
                                rule=POSITIVE)
    ffn_multiple_of: int = knob(64, "what an ffn_hidden_size worked out from d_model is rounded up to")
    max_seq_len: int = knob(256, "longest sequence the RoPE tables cover", rule=POSITIVE, architectural=False)
    rope_theta: float = knob(10000.0, "RoPE base frequency (larger: slower-turning positions, for longer contexts)",
                             rule=POSITIVE, flag=True)
    norm_eps: float = knob(1e-6, "RMSNorm epsilon", rule=POSITIVE)
    qk_norm: bool = knob(True, "RMSNorm of each head's queries and keys before RoPE")
    tie_embeddings: bool = knob(True, "the output matrix is the token embedding")
    dropout: float = knob(0.0, "dropout probability in attention and the MLP", rule=fraction(), architectural=False,
                          flag=True)
    init_std: float = knob(0.02, "standard deviation of the initial weights", rule=POSITIVE, architectural=False)
    # Mixture of experts (deepspeed.moe.layer.MoE).
    use_moe: bool = knob(False, "mixture-of-experts FFN on every other layer", flag=True, plan=True)
    num_experts: int = knob(4, "experts per MoE layer", rule=POSITIVE, flag=True, moe=True, plan=True)
    top_k: int = knob(1, "experts each token is routed to",
                      rule=one_of((1, 2), "1 or 2", hint="DeepSpeed's MoE gate supports no other"),
                      flag=True, moe=True, plan=True)
    capacity_factor: float = knob(1.0, "expert capacity in training, as a multiple of the tokens per expert under "
                                  "perfect balance", rule=POSITIVE, architectural=False, flag=True, moe=True, plan=True)
    eval_capacity_factor: float = knob(1.0, "expert capacity in validation with --moe_eval_routing training",
                                       rule=POSITIVE, architectural=False, flag=True, moe=True)
    min_capacity: int = knob(4, "the least tokens an expert accepts per batch", rule=at_least(0), architectural=False,
                             flag=True, moe=True, plan=True)
    drop_tokens: bool = knob(True, "tokens beyond an expert's capacity are dropped", architectural=False, moe=True)
    use_residual: bool = knob(False, "PR-MoE: a dense MLP beside the experts", flag=True, moe=True, plan=True)
    # Layer i is MoE when i % moe_layer_freq == moe_layer_freq - 1: the default 2 makes layers 1, 3, ... MoE.
    moe_layer_freq: int = knob(2, "every Nth layer is MoE (the last of each N)", rule=POSITIVE, flag=True, moe=True,
                               plan=True)
    ep_size: int = knob(1, "expert-parallel ranks (must divide the world size)", rule=POSITIVE, architectural=False,
                        flag=True, moe=True, plan=True)
    aux_loss_coef: float = knob(0.01, "weight of the MoE load-balancing loss", rule=at_least(0), architectural=False,
                                flag=True, moe=True)
    preset: str = knob("custom", "the preset it was built from", architectural=False, compare=False)

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
        mine, theirs, architectural = self.to_dict(), other.to_dict(), set(architectural_fields())
        return [
            f"{key}: {mine[key]!r} != {theirs[key]!r}"
            for key in sorted(mine)
            if key in architectural and mine[key] != theirs[key]
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
        checked = [spec for spec in dataclasses.fields(self)
                   if spec.metadata["rule"] is not None and (self.use_moe or not spec.metadata["moe"])]
        failed = {spec.name for spec in checked if not spec.metadata["rule"].holds(getattr(self, spec.name))}
        problems = [spec.metadata["rule"].problem(spec.name, getattr(self, spec.name))
                    for spec in checked if spec.name in failed]
        # The rules between fields, where each field alone is valid.
        if not failed & {"d_model", "n_heads"} and self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        elif not failed & {"d_model", "n_heads"} and self.head_dim % 2:
            problems.append(f"head_dim = d_model / n_heads ({self.head_dim}) must be even for RoPE")
        if not failed & {"n_heads", "n_kv_heads"} and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.use_moe:
            if not failed & {"top_k", "num_experts"} and self.top_k > self.num_experts:
                problems.append(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
            if not failed & {"ep_size", "num_experts"} and self.num_experts % self.ep_size:
                problems.append(f"num_experts ({self.num_experts}) must be divisible by ep_size ({self.ep_size})")
            if not failed & {"moe_layer_freq", "n_layers"} and not self.moe_layers:
                problems.append(
                    f"moe_layer_freq ({self.moe_layer_freq}) exceeds n_layers ({self.n_layers}): no layer would be MoE"
                )
        if problems:
            raise MarjaraError("invalid model config: " + "; ".join(problems))


def architectural_fields() -> list[str]:
    """The fields that define the weights: a checkpoint resumes, or a folder initialises a run, only
    where these agree."""
    return [spec.name for spec in dataclasses.fields(ModelConfig) if spec.metadata["architectural"]]
