"""Where each MARJARA weight lives in the Hugging Face Qwen3 / Qwen3-MoE layout, both directions.

Pure mapping, no files: the exporter (hf/export.py) sends MARJARA weights through
`to_hf`, piece by piece; the readers (model/pretrained.py) send Hugging Face tensors back through
`from_hf`. A piece is (name, element offset into the flattened tensor, 1-D values).

Two differences besides the names:
- fused tensors: attention's `wqkv` is q_proj, k_proj, v_proj stacked by rows, and SwiGLU's
  `w_gate_up` is gate_proj over up_proj;
- RoPE's pair layout: MARJARA rotates adjacent dimensions (2j, 2j+1) of a head, transformers
  rotates halves (j, j + D/2). Reordering the rows of each q and k head (and the q/k-norm weights)
  as hf[j] = marjara[2j], hf[j + D/2] = marjara[2j + 1] turns one into the other exactly:
  attention scores are dot products, unchanged when q and k are permuted alike, and RMSNorm's
  mean of squares does not depend on the order of a head's dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from marjara.model.config import ModelConfig

Triple = tuple[str, int, torch.Tensor]  # (name, flat offset, 1-D values), as checkpoint.pieces.Piece

EXPERTS = "ffn.moe.deepspeed_moe.experts.deepspeed_experts"
GATE = "ffn.moe.deepspeed_moe.gate.wg.weight"


@dataclass(frozen=True)
class Part:
    """Consecutive rows of a MARJARA tensor that form one Hugging Face tensor."""

    name: str
    rows: int
    head_dim: int = 0  # > 0: rows are permuted within each group of head_dim rows (RoPE layout)


@dataclass(frozen=True)
class Mapping:
    """A MARJARA tensor (rows x width; a vector is rows x 1) and the Hugging Face tensors it splits into."""

    source: str
    rows: int
    width: int
    parts: tuple[Part, ...]


def _rows_first(hd: int) -> torch.Tensor:
    """hf row k of a head = marjara row perm[k]: even dimensions first, then odd ones."""
    return torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])


def _matrix(source: str, rows: int, width: int, *parts: Part) -> Mapping:
    return Mapping(source, rows, width, parts)


def layout(config: ModelConfig) -> list[Mapping]:
    """Every tensor a MARJARA export holds (ep_size 1, global expert numbering; a tied head left
    out), in export order, with its Hugging Face tensors."""
    c, hd = config, config.head_dim
    d, hidden = c.d_model, c.ffn_hidden_size
    q_rows, kv_rows = c.n_heads * hd, c.n_kv_heads * hd
    maps = [_matrix("tok_emb.weight", c.vocab_size, d, Part("model.embed_tokens.weight", c.vocab_size))]

    def swiglu(source_prefix: str, hf_prefix: str) -> list[Mapping]:
        return [
            _matrix(f"{source_prefix}.w_gate_up.weight", 2 * hidden, d,
                    Part(f"{hf_prefix}.gate_proj.weight", hidden), Part(f"{hf_prefix}.up_proj.weight", hidden)),
            _matrix(f"{source_prefix}.w_down.weight", d, hidden, Part(f"{hf_prefix}.down_proj.weight", d)),
        ]

    for i in range(c.n_layers):
        src, hf = f"blocks.{i}", f"model.layers.{i}"
        maps += [
            _matrix(f"{src}.attn_norm.weight", d, 1, Part(f"{hf}.input_layernorm.weight", d)),
            _matrix(f"{src}.attn.wqkv.weight", q_rows + 2 * kv_rows, d,
                    Part(f"{hf}.self_attn.q_proj.weight", q_rows, hd),
                    Part(f"{hf}.self_attn.k_proj.weight", kv_rows, hd),
                    Part(f"{hf}.self_attn.v_proj.weight", kv_rows)),
            _matrix(f"{src}.attn.wo.weight", d, q_rows, Part(f"{hf}.self_attn.o_proj.weight", d)),
        ]
        if c.qk_norm:
            maps += [_matrix(f"{src}.attn.q_norm.weight", hd, 1, Part(f"{hf}.self_attn.q_norm.weight", hd, hd)),
                     _matrix(f"{src}.attn.k_norm.weight", hd, 1, Part(f"{hf}.self_attn.k_norm.weight", hd, hd))]
        maps.append(_matrix(f"{src}.ffn_norm.weight", d, 1, Part(f"{hf}.post_attention_layernorm.weight", d)))
        if c.is_moe_layer(i):
            maps.append(_matrix(f"{src}.{GATE}", c.num_experts, d, Part(f"{hf}.mlp.gate.weight", c.num_experts)))
            for e in range(c.num_experts):
                maps += swiglu(f"{src}.{EXPERTS}.{e}", f"{hf}.mlp.experts.{e}")
        else:
            maps += swiglu(f"{src}.ffn", f"{hf}.mlp")
    maps.append(_matrix("norm.weight", d, 1, Part("model.norm.weight", d)))
    if not c.tie_embeddings:
        maps.append(_matrix("lm_head.weight", c.vocab_size, d, Part("lm_head.weight", c.vocab_size)))
    return maps


def source_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    return {m.source: _shape(m.rows, m.width) for m in layout(config)}


def hf_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """The Hugging Face tensors of `config`, in file order."""
    return {part.name: _shape(part.rows, m.width) for m in layout(config) for part in m.parts}


def _shape(rows: int, width: int) -> torch.Size:
    return torch.Size([rows] if width == 1 else [rows, width])


class HfLayout:
    """`layout(config)` indexed both ways."""

    def __init__(self, config: ModelConfig) -> None:
        self.maps = {m.source: m for m in layout(config)}
        self.by_hf: dict[str, tuple[Mapping, int]] = {}  # hf name -> (mapping, first source row of the part)
        for m in self.maps.values():
            row = 0
            for part in m.parts:
                self.by_hf[part.name] = (m, row)
                row += part.rows

    def to_hf(self, name: str, offset: int, values: torch.Tensor) -> Iterator[Triple]:
        """A piece of MARJARA tensor `name` as pieces of Hugging Face tensors. Whole heads are
        permuted as blocks; a piece that starts or ends inside a head (ZeRO partitions) is split
        into rows there."""
        m = self.maps[name]
        end, first_row = offset + values.numel(), 0
        for part in m.parts:
            lo, hi = first_row * m.width, (first_row + part.rows) * m.width
            a, b = max(offset, lo), min(end, hi)
            if a < b:
                yield from _part_pieces(part, m.width, a - lo, values[a - offset: b - offset])
            first_row += part.rows

    def from_hf(self, hf_name: str, tensor: torch.Tensor) -> Triple:
        """A whole Hugging Face tensor as a piece of its MARJARA tensor (rows back in MARJARA's order)."""
        m, row = self.by_hf[hf_name]
        part = next(p for p in m.parts if p.name == hf_name)
        values = tensor.reshape(part.rows, m.width)
        if part.head_dim:
            inverse = torch.argsort(_rows_first(part.head_dim))
            values = values.view(-1, part.head_dim, m.width)[:, inverse]
        return m.source, row * m.width, values.reshape(-1)


def _part_pieces(part: Part, width: int, start: int, values: torch.Tensor) -> Iterator[Triple]:
    """values = elements start.. of `part` (flat, MARJARA order) as pieces of the Hugging Face tensor:
    the whole heads among them as one permuted block, the rows of a head cut at either end one by one."""
    if not part.head_dim:
        yield part.name, start, values
        return
    group = part.head_dim * width
    perm = _rows_first(part.head_dim)
    inverse = torch.argsort(perm)
    end = start + values.numel()
    first_whole, last_whole = -(-start // group) * group, end // group * group

    def rows(lo: int, hi: int) -> Iterator[Triple]:
        position = lo
        while position < hi:
            head, within = divmod(position, group)
            row, col = divmod(within, width)
            stop = min(hi, head * group + (row + 1) * width)
            yield part.name, head * group + int(inverse[row]) * width + col, values[position - start: stop - start]
            position = stop

    if first_whole >= last_whole:  # within one head
        yield from rows(start, end)
        return
    yield from rows(start, first_whole)
    heads = values[first_whole - start: last_whole - start].view(-1, part.head_dim, width)
    yield part.name, first_whole, heads[:, perm].reshape(-1)
    yield from rows(last_whole, end)
