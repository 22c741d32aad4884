"""Parameter counts and FLOPs of a MarjaraModel, from its ModelConfig alone (no weights built).

tests/test_plan_cli.py holds these equal to what a real MarjaraModel counts, so the two cannot
drift apart silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from marjara.model.config import ModelConfig
from marjara.model.flops import training_flops_per_token


@dataclass(frozen=True)
class ParamCounts:
    embedding: int        # token embedding (and an untied output head)
    dense: int            # every other non-expert parameter (attention, dense FFNs, norms, MoE gates)
    expert: int           # all experts of all MoE layers, whatever the expert parallelism
    largest_layer: int    # the most parameters one module owns directly (DeepSpeed's ZeRO-3 "largest layer")

    @property
    def total(self) -> int:
        return self.embedding + self.dense + self.expert

    @property
    def non_expert(self) -> int:
        return self.embedding + self.dense


def attention_params(c: ModelConfig) -> int:
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    qk_norm = 2 * c.head_dim if c.qk_norm else 0
    return c.d_model * (q_dim + 2 * kv_dim) + q_dim * c.d_model + qk_norm


def swiglu_params(c: ModelConfig) -> int:
    return 3 * c.d_model * c.ffn_hidden_size


def param_counts(c: ModelConfig) -> ParamCounts:
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    dense = c.n_layers * (attention_params(c) + 2 * c.d_model) + c.d_model  # + the two norms per block, final norm
    expert = 0
    for layer in range(c.n_layers):
        if c.is_moe_layer(layer):
            expert += c.num_experts * swiglu_params(c)
            dense += c.d_model * c.num_experts  # the gate (a bias-free Linear)
            if c.use_residual:
                dense += swiglu_params(c) + 2 * c.d_model + 2  # the dense MLP beside the experts and its mixing coefficient
        else:
            dense += swiglu_params(c)
    largest = max(c.vocab_size * c.d_model, c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim,
                  2 * c.d_model * c.ffn_hidden_size)
    return ParamCounts(embedding, dense, expert, largest)


def active_params(c: ModelConfig, counts: ParamCounts) -> int:
    """Parameters one token passes through, without the embedding: top_k of each MoE layer's experts."""
    active_expert = counts.expert * c.top_k // c.num_experts if c.use_moe else 0
    return counts.dense + active_expert


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): the model's own formula
    (marjara/model/flops.py) over the active parameters counted from the config."""
    return training_flops_per_token(c, active_params(c, param_counts(c)), seq_len)


def parameter_numels(c: ModelConfig) -> list[tuple[int, bool]]:
    """(numel, is_expert) of every parameter tensor one replica holds with ep_size 1, in no
    particular order: what ZeRO-3's persistence threshold is applied to."""
    d, hd = c.d_model, c.head_dim
    sizes: list[tuple[int, bool]] = [(c.vocab_size * d, False)] * (1 if c.tie_embeddings else 2) + [(d, False)]
    swiglu = [(2 * d * c.ffn_hidden_size, False), (c.ffn_hidden_size * d, False)]
    for layer in range(c.n_layers):
        sizes += [(d, False), (d, False), (d * (c.n_heads + 2 * c.n_kv_heads) * hd, False), (c.n_heads * hd * d, False)]
        sizes += [(hd, False), (hd, False)] if c.qk_norm else []
        if c.is_moe_layer(layer):
            sizes += [(d * c.num_experts, False)] + [(n, True) for n, _ in swiglu] * c.num_experts
            if c.use_residual:
                sizes += swiglu + [(2 * d, False), (2, False)]
        else:
            sizes += swiglu
    return sizes
