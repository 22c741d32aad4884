"""The MARJARA decoder-only transformer: pre-norm blocks of GQA attention and SwiGLU / MoE."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from marjara.model.attention import Attention, RMSNorm
from marjara.model.cache import KVCache
from marjara.model.config import ModelConfig
from marjara.errors import MarjaraError
from marjara.model.ffn import MoEFeedForward, SwiGLU
from marjara.model.flops import training_flops_per_token
from marjara.model.head import OutputHead
from marjara.model.output import ModelOutput
from marjara.model.param_names import is_expert_param
from marjara.model.rope import RotaryEmbedding


_RESIDUAL_OUTPUTS = ("attn.wo.weight", "w_down.weight")


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, inference: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.ffn = (MoEFeedForward(config, inference) if self.is_moe
                    else SwiGLU(config.d_model, config.ffn_hidden_size))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache: KVCache | None = None):
        """Returns (x, aux_loss, expert_counts); the last two are empty tensors in dense blocks."""
        x = x + self.dropout(self.attn(self.attn_norm(x), rotary, cache, self.layer))
        if self.is_moe:
            out, aux_loss, counts = self.ffn(self.ffn_norm(x))
        else:
            out, aux_loss, counts = self.ffn(self.ffn_norm(x)), x.new_zeros(()), x.new_zeros(0)
        return x + self.dropout(out), aux_loss, counts


class MarjaraModel(nn.Module):
    """MarjaraModel(config): the model to train. Its MoE layers are DeepSpeed's (expert-parallel,
    DeepSpeed's training gate), which need DeepSpeed's process group: a launcher's, or
    marjara.distributed.ensure_process_group() in a plain process.

    MarjaraModel(config, inference=True): the model to run (from_pretrained builds it). Its MoE
    layers are plain PyTorch with the same parameter names and eval-mode routing, every expert in
    this process (ep_size 1): no process group needed, copy.deepcopy works, eval mode only. Dense
    models are the same either way."""

    def __init__(self, config: ModelConfig, inference: bool = False) -> None:
        super().__init__()
        if inference and config.use_moe and config.ep_size != 1:
            config = config.replace(ep_size=1)  # ep_size says how training splits the experts; here one holds all
        self.config = config
        self.inference = inference
        if config.use_moe and not inference:
            _check_process_group(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.emb_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, i, inference) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = OutputHead(config.d_model, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(_RESIDUAL_OUTPUTS):
                nn.init.normal_(param, mean=0.0, std=self.init_std_for(name))
        # Set by a trainer: checkpoint_fn(function, *args) recomputes `function` in backward.
        self.checkpoint_fn: Callable | None = None
        # Set by a trainer for sequence parallelism (marjara/train/sequence_parallel.py): each rank
        # holds a slice of every sample; it gives the slice's positions and the sample's mean loss.
        self.sequence_parallel = None

    def init_std_for(self, name: str) -> float:
        """The initial standard deviation of matrix `name`. Residual-branch outputs are scaled by
        1/sqrt(2 * n_layers) (GPT-2): the residual stream's variance then stays independent of depth."""
        if name.endswith(_RESIDUAL_OUTPUTS):
            return self.config.init_std / math.sqrt(2 * self.config.n_layers)
        return self.config.init_std

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ---- forward ------------------------------------------------------------------------
    def _blocks(self, idx: torch.Tensor, positions: torch.Tensor | None, cache: KVCache | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """(final-norm hidden states (B, T, d_model), summed MoE aux loss or None, expert counts by layer)."""
        B, T = idx.shape
        if positions is None and self.sequence_parallel is not None and cache is None:
            positions = self.sequence_parallel.positions(B, T, idx.device)
        elif positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        rotary = self.rotary(positions)
        if cache is not None:
            cache.begin_step(positions)
        x = self.emb_dropout(self.tok_emb(idx))
        aux_losses, expert_counts = [], {}
        for block in self.blocks:
            if self.checkpoint_fn is not None and self.training and cache is None:
                x, aux_loss, counts = self.checkpoint_fn(block, x, rotary)
            else:
                x, aux_loss, counts = block(x, rotary, cache)
            if block.is_moe:
                aux_losses.append(aux_loss)
                expert_counts[block.layer] = counts.detach()
        return self.norm(x), torch.stack(aux_losses).sum() if aux_losses else None, expert_counts

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model), for generation and scoring."""
        return self._blocks(idx, positions, cache)[0]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """idx, targets: (B, T) token ids (targets -1 are ignored). Without targets the output holds
        the logits; with targets, loss = cross-entropy + aux_loss_coef x the summed MoE aux losses,
        where the cross-entropy runs over slices of the tokens (marjara/model/head.py), so the
        whole micro-batch's logits never exist. See marjara/model/output.py."""
        hidden, aux_loss, expert_counts = self._blocks(idx, None, None)
        if targets is None:
            return ModelOutput(self.lm_head(hidden), None, aux_loss, expert_counts)
        ce_sum, ce_tokens = self.lm_head(hidden, targets)
        if self.sequence_parallel is not None:  # the mean over the whole sample's tokens, all slices
            loss = self.sequence_parallel.sample_mean(ce_sum, ce_tokens)
        else:
            loss = ce_sum / ce_tokens
        if aux_loss is not None:
            loss = loss + self.config.aux_loss_coef * aux_loss
        return ModelOutput(None, loss, aux_loss, expert_counts, ce_sum, ce_tokens)

    # ---- sizes --------------------------------------------------------------------------
    def _counts(self) -> tuple[int, int, int]:
        """(embedding, dense non-embedding, expert params of the whole layer set), counting the
        experts held by other expert-parallel ranks too."""
        embedding = _full_numel(self.tok_emb.weight)
        if not self.config.tie_embeddings:
            embedding += _full_numel(self.lm_head.weight)
        expert = dense = 0
        for name, param in self.named_parameters():
            if name in ("tok_emb.weight", "lm_head.weight"):
                continue
            if is_expert_param(name):
                expert += _full_numel(param) * self.config.ep_size
            else:
                dense += _full_numel(param)
        return embedding, dense, expert

    def num_parameters(self, include_embeddings: bool = True) -> int:
        embedding, dense, expert = self._counts()
        return dense + expert + (embedding if include_embeddings else 0)

    def num_active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters a token passes through: top_k of each MoE layer's experts."""
        embedding, dense, expert = self._counts()
        active_expert = expert * self.config.top_k // self.config.num_experts if self.config.use_moe else 0
        return dense + active_expert + (embedding if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): marjara/model/flops.py's formula."""
        return training_flops_per_token(self.config, self.num_active_parameters(include_embeddings=False), seq_len)

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
        from marjara.model.generation import generate

        return generate(self, prompts, max_new_tokens, **sampling)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c, weight = self.config, self.tok_emb.weight
        return KVCache(c.n_layers, batch_size, max_len, c.n_kv_heads, c.head_dim, weight.dtype, weight.device)

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """The model exported in path (python -m marjara.convert, save_pretrained; MARJARA's format or
        the Hugging Face Qwen3 / Qwen3-MoE layout), strictly loaded, in eval mode (dtype None: as
        stored). Built for inference: a MoE model needs no process group."""
        # Imported here: the readers use marjara.hf, whose modules import marjara.model (this package).
        from marjara.model.pretrained import load_weights, read_folder, set_dtype

        folder = read_folder(path)
        model = cls(folder.config, inference=True)
        load_weights(model, folder)
        return set_dtype(model, device, dtype or folder.dtype)


def _full_numel(param: torch.Tensor) -> int:
    # Under ZeRO-3 a parameter's local tensor is a shard; ds_shape holds its full shape.
    return math.prod(getattr(param, "ds_shape", param.shape))


def _check_process_group(config: ModelConfig) -> None:
    """DeepSpeed's MoE layers build their expert groups from DeepSpeed's process group, which
    whoever trains the model sets up: a launcher, or marjara.distributed in a plain process. Checked
    here, at construction, so that the missing group is one line and not a failure at the first
    forward, and so that ep_size is checked against the world before any weight is made."""
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        raise MarjaraError(
            "a MoE model needs DeepSpeed's process group and none is set up; run it under a launcher, or call "
            "marjara.distributed.ensure_process_group() first (a one-rank group in a plain process); to run a "
            "model rather than train it, build it with MarjaraModel(config, inference=True) or from_pretrained"
        )
    world = deepspeed.comm.get_world_size()
    if world % config.ep_size:
        raise MarjaraError(
            f"ep_size ({config.ep_size}) must divide the number of ranks ({world}); "
            f"launch a multiple of {config.ep_size} ranks or lower --ep_size"
        )
