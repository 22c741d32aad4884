"""ModelConfig <-> a Hugging Face config.json (Qwen3, Qwen3-MoE), refusing what has no equivalent.

MARJARA's dense model is Qwen3 (pre-norm RMSNorm, GQA with per-head q/k RMSNorm before RoPE,
SwiGLU, no biases). Its MoE layers are Qwen3-MoE's sparse blocks where the routing math agrees:
softmax gates, top-1 keeping the raw probability (DeepSpeed's top1gating) and top-2 renormalising
the two chosen ones (DeepSpeed's top2gating = norm_topk_prob), every moe_layer_freq-th layer sparse
(decoder_sparse_step), dense layers with the same hidden size. MARJARA's inference routes every
token to its top-k experts without capacity limits, as transformers does.

A MARJARA export records itself under the "marjara" key (tokenizer name, where the weights came
from); transformers keeps unknown keys and ignores them.
"""

from __future__ import annotations

from typing import Any

from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig

DENSE, MOE = "qwen3", "qwen3_moe"
ARCHITECTURES = {DENSE: "Qwen3ForCausalLM", MOE: "Qwen3MoeForCausalLM"}
MARJARA_KEY = "marjara"


def check_exportable(config: ModelConfig) -> None:
    """One line naming the first field that transformers' Qwen3 / Qwen3-MoE cannot express."""
    if not config.qk_norm:
        raise MarjaraError("qk_norm is false: Qwen3 always applies RMSNorm to q and k, so this model has no "
                           "transformers equivalent; export it in MARJARA's format (--format marjara)")
    if config.use_moe and config.use_residual:
        raise MarjaraError("use_residual is true: residual MoE (a dense MLP beside the experts) has no transformers "
                           "equivalent in Qwen3-MoE; export it in MARJARA's format (--format marjara)")


def to_hf_config(config: ModelConfig, eos_token_id: int | None, dtype_name: str, marjara: dict) -> dict[str, Any]:
    """config.json for transformers.AutoModelForCausalLM (5.x; the legacy rope_theta key for 4.x)."""
    check_exportable(config)
    c = config
    model_type = MOE if c.use_moe else DENSE
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_theta": c.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        MARJARA_KEY: marjara,
    }
    if c.use_moe:
        out.update({
            "num_experts": c.num_experts,
            "num_experts_per_tok": c.top_k,
            "norm_topk_prob": c.top_k > 1,
            "decoder_sparse_step": c.moe_layer_freq,
            "moe_intermediate_size": c.ffn_hidden_size,
            "mlp_only_layers": [],
            "router_aux_loss_coef": c.aux_loss_coef,
            "output_router_logits": False,
        })
    return out


def from_hf_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """The ModelConfig (ep_size 1) of a transformers config.json; one line naming the first field
    MARJARA cannot express."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MarjaraError(f"{where}: model_type {model_type!r} is not one MARJARA reads; it reads "
                           f"{DENSE!r} (Qwen3ForCausalLM) and {MOE!r} (Qwen3MoeForCausalLM)")

    def refuse(field: str, value: Any, why: str) -> MarjaraError:
        return MarjaraError(f"{where}: {field} = {value!r}: {why}; MARJARA cannot train this model")

    def need(field: str) -> Any:
        if field not in hf:
            raise MarjaraError(f"{where} lacks {field!r}; it is not a complete {model_type} config")
        return hf[field]

    d, heads = need("hidden_size"), need("num_attention_heads")
    for field, value in (("hidden_size", d), ("num_attention_heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise refuse(field, value, "must be a positive integer")
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise refuse("head_dim", head_dim, f"MARJARA's heads split hidden_size exactly (hidden_size / "
                                           f"num_attention_heads = {d / heads:g})")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", hf["hidden_act"], "MARJARA's feed-forward is SwiGLU (silu)")
    if hf.get("attention_bias"):
        raise refuse("attention_bias", True, "MARJARA's projections have no biases")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise refuse("use_sliding_window", True, "MARJARA's attention is always full causal attention")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise refuse("rope_parameters", rope, "must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse("rope_parameters.rope_type", rope_type, "MARJARA's RoPE has no scaling")
    values: dict[str, Any] = dict(
        vocab_size=need("vocab_size"), d_model=d, n_layers=need("num_hidden_layers"), n_heads=heads,
        n_kv_heads=kv_heads, ffn_hidden_size=need("intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=True, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )
    if model_type == MOE:
        values.update(_moe_fields(hf, values, refuse))
    return ModelConfig.from_dict(values)


def _moe_fields(hf: dict[str, Any], values: dict[str, Any], refuse) -> dict[str, Any]:
    experts = hf.get("num_experts", hf.get("num_local_experts", 0))
    k = hf.get("num_experts_per_tok", 1)
    step = hf.get("decoder_sparse_step", 1)
    if not experts:
        raise refuse("num_experts", experts, "a qwen3_moe model needs experts")
    if k not in (1, 2):
        raise refuse("num_experts_per_tok", k, "DeepSpeed's MoE gate routes to 1 or 2 experts")
    if bool(hf.get("norm_topk_prob", False)) != (k == 2):
        raise refuse("norm_topk_prob", hf.get("norm_topk_prob", False),
                     f"DeepSpeed's top-{k} gate {'renormalises' if k == 2 else 'does not renormalise'} the chosen gates")
    if hf.get("mlp_only_layers"):
        raise refuse("mlp_only_layers", hf["mlp_only_layers"], "MARJARA places MoE layers by decoder_sparse_step alone")
    moe_hidden = hf.get("moe_intermediate_size", values["ffn_hidden_size"])
    all_sparse = step == 1
    if moe_hidden != values["ffn_hidden_size"] and not all_sparse:
        raise refuse("moe_intermediate_size", moe_hidden,
                     f"MARJARA's experts and dense layers share one hidden size (intermediate_size = {values['ffn_hidden_size']})")
    return dict(use_moe=True, num_experts=experts, top_k=k, moe_layer_freq=step, ffn_hidden_size=moe_hidden,
                aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
