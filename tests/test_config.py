import pytest

from marjara.model.config import PRESETS, ModelConfig
from marjara.errors import MarjaraError


@pytest.mark.parametrize("name, d_model, n_layers, n_heads", [
    ("tiny", 128, 4, 4), ("small", 256, 8, 8), ("medium", 512, 12, 8), ("large", 768, 24, 12),
])
def test_presets_are_those_of_the_original_design(name, d_model, n_layers, n_heads):
    cfg = ModelConfig.from_preset(name)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (d_model, n_layers, n_heads)
    assert cfg.n_heads % cfg.n_kv_heads == 0 and cfg.n_kv_heads < cfg.n_heads  # GQA by default
    assert cfg.ffn_hidden_size % cfg.ffn_multiple_of == 0
    assert cfg.ffn_hidden_size >= 8 * cfg.d_model // 3


def test_from_preset_applies_overrides():
    cfg = ModelConfig.from_preset("small", vocab_size=257, use_moe=True, num_experts=8, top_k=2)
    assert (cfg.vocab_size, cfg.d_model, cfg.num_experts, cfg.top_k, cfg.preset) == (257, 256, 8, 2, "small")
    assert cfg.moe_layers == [1, 3, 5, 7]


def test_json_round_trip_is_exact():
    cfg = ModelConfig.from_preset("medium", vocab_size=1000, use_moe=True, use_residual=True, ep_size=2)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_json(cfg.to_json()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, fields", [
    (dict(d_model=130, n_heads=4), ["d_model", "n_heads"]),
    (dict(n_heads=4, n_kv_heads=3), ["n_heads", "n_kv_heads"]),
    (dict(use_moe=True, num_experts=1, top_k=2), ["top_k", "num_experts"]),
    (dict(use_moe=True, num_experts=6, ep_size=4), ["num_experts", "ep_size"]),
    (dict(use_moe=True, top_k=3), ["top_k"]),
    (dict(vocab_size=0), ["vocab_size"]),
    (dict(dropout=1.5), ["dropout"]),
    (dict(d_model=120, n_heads=8), ["head_dim"]),
    (dict(use_moe=True, moe_layer_freq=9), ["moe_layer_freq", "n_layers"]),
])
def test_invalid_configs_name_the_fields(overrides, fields):
    with pytest.raises(MarjaraError) as err:
        ModelConfig.from_preset("tiny", **overrides)
    message = str(err.value)
    assert "\n" not in message
    for field in fields:
        assert field in message


def test_unknown_preset_and_unknown_field_are_clear():
    with pytest.raises(MarjaraError, match="unknown model preset 'huge'.*tiny, small, medium, large"):
        ModelConfig.from_preset("huge")
    with pytest.raises(MarjaraError, match="unknown model config field.*d_modle"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(MarjaraError, match="not valid JSON"):
        ModelConfig.from_json("{nope")


def test_differences_list_architecture_fields_only():
    a = ModelConfig.from_preset("tiny")
    b = a.replace(d_model=256, dropout=0.1, n_heads=8)
    diffs = a.differences(b)
    assert any(d.startswith("d_model: 128 != 256") for d in diffs)
    assert any(d.startswith("n_heads: 4 != 8") for d in diffs)
    assert not any(d.startswith("dropout") for d in diffs)
    assert a.differences(a.replace(dropout=0.2, ep_size=2)) == []


def test_presets_table_holds_the_seeds_four_and_two_gpu_scale_ones():
    assert list(PRESETS) == ["tiny", "small", "medium", "large", "1b", "7b"]


def test_gpu_scale_presets():
    """1b: about 1.2B parameters; 7b: Llama-2-7B's dimensions with grouped-query attention.
    Built on the meta device: shapes without memory."""
    import torch

    from marjara.model import MarjaraModel

    with torch.device("meta"):
        one_b = MarjaraModel(ModelConfig.from_preset("1b"))
        seven_b = MarjaraModel(ModelConfig.from_preset("7b"))
    assert 1.1e9 < one_b.num_parameters() < 1.3e9
    c = seven_b.config
    assert (c.d_model, c.n_layers, c.n_heads, c.ffn_hidden_size, c.tie_embeddings) == (4096, 32, 32, 11008, False)
    assert c.n_kv_heads < c.n_heads and c.head_dim == 128
    assert 5.9e9 < seven_b.num_parameters() < 6.3e9  # Llama-2-7B's 6.7B has 32 K/V heads and 32k tokens
