"""Tiled MLP (ALST): the SwiGLU over slices of the tokens, each slice recomputed in backward.

A SwiGLU over N tokens holds gate, up and their product, 3 x N x ffn_hidden values (about 8 x
d_model per token), for backward: at long sequences the step's largest activations after the
logits. Run over slices of `chunk_tokens` tokens, each under non-re-entrant activation
checkpointing, only the slice's input is kept; forward and backward build one slice's
intermediate at a time. The cost is one more forward of the MLP; outputs and gradients equal
the untiled path's (tests/test_tiled_mlp.py).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def tiled(function, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """function(x) for a token-wise `function` of x (..., d) -> (..., d_out), computed over slices of
    at most chunk_tokens tokens, each recomputed in backward."""
    flat = x.reshape(-1, x.size(-1))
    if not torch.is_grad_enabled() or flat.size(0) <= chunk_tokens:
        return function(x)
    pieces = [checkpoint(function, flat[start:start + chunk_tokens], use_reentrant=False)
              for start in range(0, flat.size(0), chunk_tokens)]
    out = torch.cat(pieces)
    return out.view(*x.shape[:-1], out.size(-1))


def enable_tiled_mlp(model: torch.nn.Module, chunk_tokens: int | None = None) -> int:
    """Tile every dense SwiGLU of `model` (experts aside: DeepSpeed's MoE dispatches its own
    token groups) over slices of chunk_tokens tokens, by default d_model tokens as ALST does (a
    slice's intermediate is then ~8 x d_model^2 values whatever the sequence length). Returns
    the number of MLPs tiled."""
    tiled_count = 0
    for name, module in model.named_modules():
        # SwiGLU (marjara/model/ffn.py) is the module with a chunk_tokens setting
        if hasattr(module, "chunk_tokens") and hasattr(module, "w_gate_up") and "deepspeed_moe" not in name:
            module.chunk_tokens = chunk_tokens or module.w_gate_up.in_features
            tiled_count += 1
    return tiled_count
