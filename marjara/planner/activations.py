"""Activation memory of one micro-batch, from the model's own shapes.

Counted tensor by tensor from what MarjaraModel's forward keeps for backward (checked against
autograd's saved tensors and a profiled step in tests/test_plan_measured.py). Per token and layer,
with s the bytes of the working precision (4 fp32, 2 bf16/fp16):

- each RMSNorm keeps its input in fp32 (an upcast copy under 16 bits), the normalised fp32 values
  for the gain's gradient, and its output (s): (8 + s) x width;
- attention keeps the fused q/k/v projection (s), the q/k norms' fp32 inputs (16-bit runs only)
  and normalised values, the rotated q and k, SDPA's output (which is also the output
  projection's input) and its log-sum-exp (fp32 per head);
- SwiGLU keeps the gate/up projection (2F), silu(gate) (F) and the product (F), all in s;
- an MoE layer's experts keep the same per dispatched slot (num_experts x capacity slots, about
  top_k x capacity_factor per token), plus the gate's per-token state;
- the loss (marjara/model/head.py) runs the output head over slices of at most
  tokens_per_chunk(vocab) tokens and recomputes each slice in backward: at its peak it holds one
  slice's logits as three fp32 tensors (the logits, log-softmax's output, their gradient), plus
  the 16-bit logits beside their fp32 copy in 16-bit runs; the final norm keeps its tensors for
  every token.

While a block's backward runs, the gradients of its FFN's activations exist beside what it kept
(about d + 2F per token, or per expert slot). With activation checkpointing (DeepSpeed's
non-re-entrant checkpoint around each block) a block keeps only its input, and backward recomputes
one block at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from marjara.model.head import tokens_per_chunk
from marjara.planner.sequence import ulysses_bytes_per_token
from marjara.planner.setup import Setup


@dataclass
class Activations:
    layers: float        # what the transformer blocks keep for backward
    recompute: float     # under checkpointing: one block recomputed in backward, at a time
    backward: float      # gradients of one block's activations while its backward runs
    loss: float          # final norm, and one slice's logits at the loss's peak in backward
    host: float = 0.0    # checkpointed block inputs offloaded to host memory (--offload_activations)

    @property
    def peak(self) -> float:
        return self.layers + max(self.recompute + self.backward, self.loss)


def expert_slots_per_token(setup: Setup, tokens: int) -> float:
    """Slots the experts of one MoE layer compute per token of this rank's micro-batch: DeepSpeed's
    gate gives each expert capacity max(ceil(top_k x tokens / experts x capacity_factor), min_capacity)."""
    c = setup.model
    capacity = max(math.ceil(c.top_k * tokens / c.num_experts * c.capacity_factor), c.min_capacity)
    return c.num_experts * capacity / tokens


def layer_bytes_per_token(setup: Setup, moe: bool, tokens: int) -> float:
    c, s = setup.model, setup.bytes_per_value
    d, kv, ffn, heads = c.d_model, c.n_kv_heads * c.head_dim, c.ffn_hidden_size, c.n_heads
    upcast = 4 if s != 4 else 0  # 16-bit q/k norms keep an fp32 copy of their input
    norms = 2 * (8 + s) * d + 4 * 2
    attention = (s * (d + 2 * kv) + ((4 + upcast) * (d + kv) + 4 * (heads + c.n_kv_heads) if c.qk_norm else 0)
                 + s * (d + kv) + s * d + 4 * heads)
    swiglu = s * (d + 4 * ffn)  # the expert's or FFN's input is counted with the norm, except for experts
    if not moe:
        return norms + attention + swiglu - s * d
    slots = expert_slots_per_token(setup, tokens)
    gate = 4 * d * c.top_k + d / 2 * c.top_k * c.capacity_factor
    residual = swiglu - s * d + 4 if c.use_residual else 0.0
    return norms + attention + slots * swiglu + gate + residual


def activations(setup: Setup, micro_batch: int) -> Activations:
    """Per rank: under sequence parallelism each holds seq_len / sp_size tokens of every sample."""
    c, s = setup.model, setup.bytes_per_value
    tokens = micro_batch * setup.local_seq_len
    ulysses = ulysses_bytes_per_token(setup)
    per_layer = [(layer_bytes_per_token(setup, c.is_moe_layer(i), tokens) + ulysses) * tokens
                 for i in range(c.n_layers)]
    rotary = tokens * c.head_dim / 2 * 8  # complex64 rotations, shared by every layer
    chunk = min(tokens, tokens_per_chunk(c.vocab_size))
    loss = tokens * (8 + s) * c.d_model + chunk * (12 + (s if s < 4 else 0)) * c.vocab_size
    slots = expert_slots_per_token(setup, tokens) if c.use_moe else 1.0
    backward = tokens * s * (c.d_model + 2 * c.ffn_hidden_size) * slots
    if setup.grad_checkpointing:
        inputs = c.n_layers * tokens * s * c.d_model
        if setup.offload_activations:  # the block being recomputed has its input back: counted in its layer
            return Activations(rotary, max(per_layer), backward, loss, host=inputs)
        return Activations(inputs + rotary, max(per_layer), backward, loss)
    return Activations(sum(per_layer) + rotary, 0.0, backward, loss)
