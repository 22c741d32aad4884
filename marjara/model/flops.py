"""The one FLOPs-per-token formula: MarjaraModel.flops_per_token (the MFU a training run logs) and
the planner's compute-time estimates (marjara/planner/) both call it, so the two cannot disagree."""

from __future__ import annotations

from marjara.model.config import ModelConfig


def training_flops_per_token(config: ModelConfig, active_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's convention: 6 x active matmul parameters
    + 12 x layers x d_model x seq_len for attention's score and value products.

    active_params: parameters one token passes through, embedding left out (top_k of each MoE
    layer's experts); the output projection is a matmul and is added here, tied or not."""
    matmul_params = active_params + config.vocab_size * config.d_model
    return 6.0 * matmul_params + 12.0 * config.n_layers * config.d_model * seq_len
